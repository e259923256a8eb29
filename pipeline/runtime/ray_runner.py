"""Ray at the edge: start/attach, and run plain functions as retried tasks with a progress bar.

``run_units`` keeps at most ``max_in_flight`` tasks submitted at a time and reads the units
lazily, so a stage of a million units holds a bounded number of object refs and unit objects in
the driver; what it has done lives in the SQLite manifest, not in memory. With ``actors=True``
the units run on a pool of long-lived actors instead of one task each, so what a worker loads
(a model, CUDA) is loaded once per actor, not once per unit.

Every unit runs through :func:`_call`, which sets the device the unit's code uses
(``pipeline.devices.current_device()``) from the GPUs Ray assigned: Ray decides devices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice

from tqdm import tqdm

from pipeline.runtime.manifest import Manifest

log = logging.getLogger(__name__)

# Allocator settings that stop glibc returning memory to the OS after every batch: measured
# to roughly double CPU inference throughput (DESIGN.md); and torch's CPU allocator advising
# transparent huge pages for large tensors (fewer TLB misses in the memory-bound layers: +7%
# for EfficientNet-Lite0 on 2 cores, benchmarks/extraction.py). Workers inherit them.
#
# RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1: since ray-project/ray#54868 (in Ray 2.60) a task or actor
# assigned zero GPUs keeps the CUDA_VISIBLE_DEVICES its worker inherited (all the node's GPUs),
# so torch in a CPU task would see, initialise and use GPUs that Ray gave to other tasks. With
# this variable Ray sets CUDA_VISIBLE_DEVICES="" for them again (the pre-2.60 behaviour). Ray
# reads it in the worker process, before each task and at an actor's creation
# (ray._private.utils.set_visible_accelerator_ids, through env_bool), not in the raylet or GCS:
# so it belongs in the workers' environment (the job's runtime_env, which ray_session and
# pipeline.runtime.submit pass), not the driver's. `_call` hides GPUs itself as a fallback.
WORKER_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000",
              "THP_MEM_ALLOC_ENABLE": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}
# Units queued on one actor at a time. One: when an actor dies, Ray retries (and charges a retry
# to) every unit queued on it, so a unit that kills its worker every time would also use up the
# retries of a unit queued behind it; the cost is the driver's round trip between two units.
UNITS_PER_ACTOR = 1

DEFAULT_MAX_IN_FLIGHT = 256
_FAILURES_KEPT = 20  # failures listed in a report; the manifest keeps all of them


@dataclass
class StageReport:
    """What one run of a stage did: units done now / failed / already done (cached),
    samples and skips (from the units' counts), wall time, and units per node."""

    stage: str
    units: int = 0
    done: int = 0
    failed: int = 0
    cached: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    nodes: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)  # the first few (unit, error)
    results: dict[str, dict] = field(default_factory=dict)  # only when run_units(collect=True)

    @property
    def ran(self) -> int:
        return self.done + self.failed

    def as_dict(self) -> dict:
        return {"units": self.units, "done": self.done, "failed": self.failed,
                "cached": self.cached, "samples": self.samples, "skipped": dict(self.skipped),
                "seconds": round(self.seconds, 3),
                "samples_per_s": round(self.samples / self.seconds, 1) if self.seconds and self.samples else None,
                "units_per_s": round(self.done / self.seconds, 2) if self.seconds and self.done else None,
                "nodes": len(self.nodes),
                "failures": [{"unit": u, "error": e} for u, e in self.failures]}


class StageFailed(RuntimeError):
    """Some units of a stage failed after their retries; the others finished."""

    def __init__(self, message: str, report: StageReport | None = None):
        super().__init__(message)
        self.report = report


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, *,
                num_gpus: int | None = None, env_vars: dict[str, str] | None = None):
    """Start a local Ray (``address="local"``, loopback only) or attach to ``address``.
    A bare ``ray.init()`` would silently attach to whatever ``ray start`` left running.
    Workers get WORKER_ENV plus ``env_vars``; ``num_gpus`` overrides a local Ray's detected GPUs."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    env = {**WORKER_ENV, **(env_vars or {})}
    if address in (None, "local"):
        # On Linux Ray binds the machine's network address unless this is 0: keep it on 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 runtime_env={"env_vars": env}, logging_level=logging.WARNING)
    else:
        from pipeline.runtime.auth import enable_token_auth

        enable_token_auth()  # a token-protected cluster rejects a driver without it
        # A driver of a submitted job already has WORKER_ENV in the job's runtime_env (submit.py),
        # and Ray refuses a ray.init runtime_env naming the same variables again.
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
            env = dict(env_vars or {})
        ray.init(address=address, logging_level=logging.WARNING,
                 runtime_env={"env_vars": env} if env else None)
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class ClusterShape:
    """Totals and the largest node: a task asking more than the largest node has never starts."""

    cpus: int
    gpus: int
    node_cpus: float
    node_gpus: float
    node_memory: float  # bytes
    nodes: int = 1  # running nodes plus node types an autoscaler may add

    def problems(self, stage: str, options: dict) -> list[str]:
        """Why a task with these Ray options could never be scheduled (empty when it can)."""
        out = []
        for key, have, what in (("num_cpus", self.node_cpus, "CPUs"), ("num_gpus", self.node_gpus, "GPUs"),
                                ("memory", self.node_memory, "bytes of memory")):
            want = options.get(key) or 0
            if want > have:
                shown = f"memory_gb={want / 2**30:g}" if key == "memory" else f"{key}={want:g}"
                largest = f"{have / 2**30:.1f} GB" if key == "memory" else f"{have:g} {what}"
                out.append(f"runtime.resources.{stage}: {shown} but the largest node of the "
                           f"cluster has {largest}: such a task could never start")
        return out


def _autoscaler_node_types() -> list[dict]:
    """Resources of the node types an autoscaling cluster may still start (none otherwise).
    Ray keeps them in the GCS; the accessor is internal (Ray Data and Train use it), so any
    failure means "unknown" and only the running nodes count."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an internal API; its absence is not an error
        return []
    if config is None:
        return []
    return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]


def cluster_shape() -> ClusterShape:
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")] + _autoscaler_node_types()
    total = ray.cluster_resources()
    return ClusterShape(
        cpus=int(total.get("CPU", 1)), gpus=int(total.get("GPU", 0)),
        node_cpus=max((r.get("CPU", 0) for r in nodes), default=0),
        node_gpus=max((r.get("GPU", 0) for r in nodes), default=0),
        node_memory=max((r.get("memory", 0) for r in nodes), default=0),
        nodes=len(nodes))


def cluster_resources() -> tuple[int, int]:
    """(CPUs, GPUs) of the connected cluster."""
    shape = cluster_shape()
    return shape.cpus, shape.gpus


@dataclass
class Unit:
    name: str
    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@contextlib.contextmanager
def _gpus_hidden_unless_assigned(gpu_ids):
    """A unit assigned no GPU sees none (CUDA_VISIBLE_DEVICES=""), as Ray does with
    RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1 in the workers' environment; this covers clusters
    whose workers lack it. No-op (no setenv) when Ray already hid them or GPUs were assigned."""
    if gpu_ids or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _call(fn, args, kwargs):
    """The body of every task and actor call: the device decided from the GPUs Ray assigned
    (``pipeline.devices.current_device()`` inside ``fn``), the plain function, and the node it
    ran on (recorded per unit)."""
    import ray

    from pipeline.devices import cuda_available, set_current_device, task_device

    gpu_ids = ray.get_gpu_ids()
    with _gpus_hidden_unless_assigned(gpu_ids):
        # CUDA is probed only when GPUs were assigned: torch fixes its device count at the first
        # probe, so a probe in a CPU unit would initialise CUDA for this worker's lifetime.
        # a fraction of a GPU (num_gpus < 1): memory-sized choices keep to that share
        share = ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0) if gpu_ids else 1.0
        set_current_device(task_device(gpu_ids, cuda_available() if gpu_ids else False),
                           gpu_share=min(1.0, float(share) or 1.0))
        try:
            return fn(*args, **kwargs), ray.get_runtime_context().get_node_id()
        finally:
            set_current_device(None)


class _UnitActor:
    """A long-lived worker for a stage's units: the process, and whatever the plain functions
    cache in it (a loaded model, an initialised CUDA context), outlives each unit. Its device
    is fixed for its life: Ray sets CUDA_VISIBLE_DEVICES once, when it creates the actor."""

    def run(self, fn, args, kwargs):
        return _call(fn, args, kwargs)


def actors_that_fit(num_cpus: float = 1, num_gpus: float = 0, memory: int | None = None) -> int:
    """How many actors asking for these resources the running nodes hold at once (at least 1):
    one per GPU for a stage asking a GPU each, else one per CPU slot."""
    import ray

    fit = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        per_node = [have.get(key, 0) // want for key, want in
                    (("CPU", num_cpus), ("GPU", num_gpus), ("memory", memory or 0)) if want]
        fit += int(min(per_node)) if per_node else int(have.get("CPU", 0))
    return max(1, fit)


class _Tasks:
    """Submits each unit as a task of its own (what ``run_units`` does without actors).

    The options go to ``ray.remote`` itself, not to ``.options()``: only there does Ray give a
    task asking GPUs its default ``max_calls=1`` (``.options()`` drops max_calls), i.e. a fresh
    worker per GPU task. A reused worker would keep the GPU (CUDA context) of its first task
    while Ray accounts the next one on another GPU."""

    def __init__(self, options: dict):
        import ray

        self._remote = ray.remote(**options)(_call)

    def submit(self, unit: Unit):
        return self._remote.remote(unit.fn, unit.args, unit.kwargs)

    def release(self, ref) -> None:
        pass

    def close(self) -> None:
        pass


class _ActorPool:
    """Submits units to at most ``size`` long-lived actors, created as units need them, each
    with at most UNITS_PER_ACTOR units queued (``submit`` returns None when all are busy). An
    actor that dies is restarted by Ray (``max_restarts=-1``) and the units it had are retried
    on it (``max_task_retries``, ``retry_exceptions``), each at most ``max_retries`` times, so a
    unit that keeps failing ends failed as a task would. ``close`` kills the actors."""

    def __init__(self, size: int, options: dict, call_name: str):
        import ray

        actor_options = {k: v for k, v in options.items()
                         if k in ("num_cpus", "num_gpus", "memory", "scheduling_strategy")}
        self._class = ray.remote(_UnitActor).options(
            max_restarts=-1, max_task_retries=options["max_retries"], **actor_options)
        # the name is the process title while a unit runs (what ps shows, like a task's name)
        self._call = {"name": call_name, "max_task_retries": options["max_retries"],
                      "retry_exceptions": options["retry_exceptions"]}
        self.size = max(1, size)
        self.actors: list = []
        self.queued: list[int] = []
        self._owner: dict = {}  # object ref -> index of the actor it was submitted to

    def submit(self, unit: Unit):
        free = [i for i, n in enumerate(self.queued) if n < UNITS_PER_ACTOR]
        if free:
            i = min(free, key=self.queued.__getitem__)
        elif len(self.actors) < self.size:
            self.actors.append(self._class.remote())
            self.queued.append(0)
            i = len(self.actors) - 1
        else:
            return None
        ref = self.actors[i].run.options(**self._call).remote(unit.fn, unit.args, unit.kwargs)
        self.queued[i] += 1
        self._owner[ref] = i
        return ref

    def release(self, ref) -> None:
        self.queued[self._owner.pop(ref)] -= 1

    def close(self) -> None:
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors, self.queued, self._owner = [], [], {}


def _error_text(exn: BaseException) -> str:
    cause = getattr(exn, "cause", None) or exn
    return "".join(traceback.format_exception_only(type(cause), cause)).strip()


def run_units(manifest: Manifest, stage: str, units: Iterable[Unit], fingerprint: str, *,
              total: int | None = None, num_cpus: float = 1, num_gpus: float = 0,
              memory: int | None = None, max_retries: int = 2,
              retry_exceptions: list[type[BaseException]] | None = None,
              max_in_flight: int | None = None, progress: bool = True, desc: str | None = None,
              samples_key: str | None = None, collect: bool = False,
              scheduling_strategy: str | None = None, actors: bool = False,
              max_calls: int | None = None) -> StageReport:
    """Run the units of ``stage`` not already done (same fingerprint) as Ray tasks, or with
    ``actors=True`` as calls to a pool of long-lived actors with the same resources (one per
    GPU, or per CPU slot, that the cluster holds; at most one per unit), killed at the end.

    Each unit returns a counts dict recorded in the manifest with the node it ran on. Units are
    retried ``max_retries`` times when their worker or node dies, and on the exception types in
    ``retry_exceptions``. Failed units are recorded with their error and the stage raises
    StageFailed after the others finish, so a re-run only redoes what is missing. At most
    ``max_in_flight`` units are read and not finished at once (submitted, or waiting for a free
    actor). ``max_calls`` is Ray's limit of tasks per worker (tasks only; Ray's default: 1 for a
    task asking GPUs, else unlimited). Returns the stage's report; with ``collect=True`` it holds each unit's counts in
    ``results`` (for stages of a few units).
    """
    import ray

    if total is None and hasattr(units, "__len__"):
        total = len(units)
    max_in_flight = max(1, max_in_flight or DEFAULT_MAX_IN_FLIGHT)
    report = StageReport(stage)
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_retries": max_retries,
               "retry_exceptions": list(retry_exceptions) if retry_exceptions else False,
               "name": f"knn-defense:{stage}"}
    if memory:
        options["memory"] = memory
    if scheduling_strategy:
        options["scheduling_strategy"] = scheduling_strategy
    if actors:
        size = actors_that_fit(num_cpus, num_gpus, memory)
        runner = _ActorPool(min(size, total) if total else size, options, options["name"])
    else:
        if max_calls is not None:
            options["max_calls"] = max_calls
        runner = _Tasks(options)
    manifest.start_stage(stage, fingerprint, total)
    started = time.time()
    # A bar for stages of many units; single-task stages show their own progress inside.
    bar = tqdm(total=total, desc=desc or stage, unit="unit", dynamic_ncols=True,
               disable=not progress or total == 1)
    pending = iter(units)
    in_flight: dict = {}  # object ref -> unit name
    waiting: deque[Unit] = deque()  # read, not done, not yet submitted (all actors busy)
    exhausted = False
    try:
        while True:
            while not exhausted and len(in_flight) + len(waiting) < max_in_flight:
                chunk = list(islice(pending, max_in_flight - len(in_flight) - len(waiting)))
                if not chunk:
                    exhausted = True
                    break
                names = [u.name for u in chunk]
                done = manifest.done_among(stage, fingerprint, names)
                todo = [u for u in chunk if u.name not in done]
                report.units += len(chunk)
                report.cached += len(chunk) - len(todo)
                bar.update(len(chunk) - len(todo))
                manifest.mark_running(stage, [u.name for u in todo], fingerprint)
                waiting.extend(todo)
                del chunk, todo
            while waiting:  # submitted units' objects are dropped: only their refs stay alive
                ref = runner.submit(waiting[0])
                if ref is None:
                    break
                in_flight[ref] = waiting.popleft().name
            if not in_flight:
                break
            refs = list(in_flight)
            ready, _ = ray.wait(refs, num_returns=1)
            more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # whatever else is ready
            finished = []
            for ref in more or ready:  # `more` includes `ready` unless it was freed meanwhile
                name = in_flight.pop(ref)
                runner.release(ref)
                try:
                    counts, node = ray.get(ref)
                except Exception as exn:  # noqa: BLE001 - record every failure, keep the others going
                    text = _error_text(exn)
                    manifest.mark_failed(stage, name, text)
                    report.failed += 1
                    if len(report.failures) < _FAILURES_KEPT:
                        report.failures.append((name, text))
                    continue
                counts = counts or {}
                finished.append((name, counts, node))
                report.done += 1
                report.nodes[node] += 1
                if samples_key:
                    report.samples += int(counts.get(samples_key) or 0)
                if isinstance(counts.get("skipped"), dict):
                    report.skipped.update(counts["skipped"])
                if collect:
                    report.results[name] = counts
            manifest.mark_done_many(stage, finished)
            bar.update(len(more or ready))
            if samples_key or report.failed:
                elapsed = max(time.time() - started, 1e-9)
                bar.set_postfix_str(
                    (f"{report.samples} samples, {report.samples / elapsed:.0f}/s" if samples_key else "")
                    + (f" {report.failed} failed" if report.failed else ""), refresh=False)
    finally:
        runner.close()
        bar.close()
        report.seconds = time.time() - started
        manifest.finish_stage(stage, report.as_dict())
    if report.failed:
        first_name, first_err = report.failures[0]
        raise StageFailed(f"stage {stage}: {report.failed} of {report.units} unit(s) failed; "
                          f"first: {first_name}: {first_err.splitlines()[-1]}", report)
    return report
