"""Ray at the edge: start/attach, and run plain functions as retried tasks with a progress bar."""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from pipeline.runtime.manifest import Manifest

log = logging.getLogger(__name__)

# Allocator settings that stop glibc returning memory to the OS after every batch: measured
# to roughly double CPU inference throughput (DESIGN.md). Workers inherit them.
WORKER_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


class StageFailed(RuntimeError):
    pass


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Start a local Ray (``address="local"``, loopback only) or attach to ``address``.
    A bare ``ray.init()`` would silently attach to whatever ``ray start`` left running."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address in (None, "local"):
        # On Linux Ray binds the machine's network address unless this is 0: keep it on 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": WORKER_ENV}, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_resources() -> tuple[int, int]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    res = ray.cluster_resources()
    return int(res.get("CPU", 1)), int(res.get("GPU", 0))


@dataclass
class Unit:
    name: str
    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _call(fn, args, kwargs):
    return fn(*args, **kwargs)


def run_units(manifest: Manifest, stage: str, units: list[Unit], fingerprint: str, *,
              num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 2,
              progress: bool = True, desc: str | None = None) -> dict[str, dict]:
    """Run the units of ``stage`` not already done (same fingerprint) as Ray tasks.

    Each task returns a counts dict recorded in the manifest. Failed units are recorded with
    their error and the stage raises StageFailed after the others finish, so a re-run only
    redoes what is missing. Returns {unit: counts} of the units run now.
    """
    import ray

    done = manifest.done_units(stage, fingerprint)
    todo = [u for u in units if u.name not in done]
    if not todo:
        return {}
    remote = ray.remote(_call).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                                       retry_exceptions=False, name=f"knn-defense:{stage}")
    manifest.mark_running(stage, [u.name for u in todo], fingerprint)
    pending = {remote.remote(u.fn, u.args, u.kwargs): u.name for u in todo}
    results, failed = {}, []
    # A bar for stages of many units; single-task stages show their own progress inside.
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=desc or stage,
               unit="unit", disable=not progress or len(units) == 1, dynamic_ncols=True)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            try:
                counts = ray.get(ready[0]) or {}
            except Exception as exn:  # noqa: BLE001 - record every failure, keep the others going
                cause = getattr(exn, "cause", None) or exn
                text = "".join(traceback.format_exception_only(type(cause), cause)).strip()
                manifest.mark_failed(stage, name, text)
                failed.append((name, text))
                bar.update(1)
                continue
            manifest.mark_done(stage, name, counts)
            results[name] = counts
            bar.update(1)
    finally:
        bar.close()
    if failed:
        first_name, first_err = failed[0]
        raise StageFailed(f"stage {stage}: {len(failed)} of {len(todo)} unit(s) failed; first: "
                          f"{first_name}: {first_err.splitlines()[-1]} (re-run the job to retry them)")
    return results
