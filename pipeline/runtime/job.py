"""The job runner: stages in order, each a set of Ray tasks recorded in the manifest.

A stage's units are skipped when already done with the same fingerprint (hash of the settings
and upstream outputs they depend on), so re-running a job redoes only what changed or failed.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from pipeline import __version__
from pipeline.config import ConfigError, JobSpec, is_url
from pipeline.data.shards import expand_shards
from pipeline.features.backbones import build_model, file_sha256
from pipeline.features.recipe import FeatureRecipe, make_recipe
from pipeline.fingerprints import fingerprint
from pipeline.ids import MAX_SHARDS, partition_of_shard
from pipeline.layout import JobLayout, read_json, write_json
from pipeline.runtime import tasks
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.ray_runner import (
    ClusterShape,
    StageFailed,
    StageReport,
    Unit,
    cluster_shape,
    ray_session,
    run_units,
)
from pipeline.validate import check_paths

log = logging.getLogger(__name__)

STAGES = ["import", "shards", "subset", "train", "transforms", "features", "index", "store", "verify", "evaluate"]
# Stages whose units load a model: they run on long-lived actors (one per GPU, or per CPU slot),
# so a worker loads the model and initialises CUDA once, not once per shard (Ray's default for a
# GPU task is a fresh worker each time); the shard stays the unit of retry, manifest and resume.
ACTOR_STAGES = frozenset({"features"})
# Single big tasks: by default the largest node's CPUs (at most this many).
BIG_TASK_MAX_CPUS = 8


@dataclass
class JobRun:
    spec: JobSpec
    layout: JobLayout
    manifest: Manifest
    progress: bool = True
    shape: ClusterShape = field(default_factory=lambda: ClusterShape(1, 0, 1, 0, 0))
    state: dict = field(default_factory=dict)  # fingerprints and paths passed between stages
    times: dict = field(default_factory=dict)
    reports: dict[str, StageReport] = field(default_factory=dict)  # manifest stage -> last report

    @property
    def cpus(self) -> int:
        return self.shape.cpus

    @property
    def gpus(self) -> int:
        return self.shape.gpus

    @property
    def retries(self) -> int:
        return self.spec.runtime.max_retries

    @property
    def task_cpus(self) -> int:
        """CPUs for a single big task (training, evaluation): the largest node's, at most 8."""
        return max(1, min(int(self.shape.node_cpus), BIG_TASK_MAX_CPUS))

    def resources(self, section: str, big: bool = False) -> dict:
        """Ray options for a task of ``section`` (runtime.resources.<section>): the spec's values
        over the stage's defaults (one CPU per shard task, the largest node's CPUs up to 8 for a
        big single task; a GPU for features, training and transforms when the cluster has one)."""
        gpu_default = 1 if self.shape.node_gpus >= 1 and section in ("features", "train", "transforms") else 0
        cpus = self.task_cpus if big else 1
        if section == "features" and gpu_default:
            # One GPU forwards EfficientNet-Lite0 faster than all of a node's cores decode web
            # photos for it (docs/gpu.md: img/s per decode core vs the GPU's forward img/s), so a
            # GPU's extraction task takes its node's CPUs per GPU, not one.
            cpus = max(1, int(self.shape.node_cpus // max(1, self.shape.node_gpus)))
        options = {"num_cpus": cpus, "num_gpus": gpu_default}
        options.update(getattr(self.spec.runtime.resources, section).ray_options())
        return options

    def threads(self, options: dict) -> int:
        """Torch threads for a task: the CPUs it asked for."""
        return max(1, int(options.get("num_cpus") or 1))

    def max_in_flight(self) -> int:
        return self.spec.runtime.max_in_flight or max(16, 4 * self.shape.cpus)

    def run(self, stage: str, units, fp: str, section: str | None = None, *, big: bool = False,
            **options) -> StageReport:
        """Run a stage's units with the resources of ``section`` (default: the stage's name)."""
        section = section or stage.split(".")[0]
        ray_options = self.resources(section, big)
        ray_options.update(options)
        ray_options.setdefault("actors", not big and section in ACTOR_STAGES)
        ray_options.setdefault("max_retries", self.retries)
        ray_options.setdefault("retry_exceptions", self.spec.runtime.retryable())
        ray_options.setdefault("max_in_flight", self.max_in_flight())
        if not big and self.spec.runtime.scheduling == "spread":
            ray_options.setdefault("scheduling_strategy", "SPREAD")
        try:
            report = run_units(self.manifest, stage, units, fp, progress=self.progress, **ray_options)
        except StageFailed as err:
            self.reports[stage] = err.report
            raise
        self.reports[stage] = report
        return report

    def single(self, stage: str, fn, fp: str, *args, section: str | None = None,
               big: bool = True, **kwargs) -> dict | None:
        """One task; returns its result, or None when already done with this fingerprint."""
        report = self.run(stage, [Unit(stage, fn, args, kwargs)], fp, section, big=big, collect=True)
        return report.results.get(stage)


def resource_problems(spec: JobSpec, shape: ClusterShape) -> list[str]:
    """Stage resources that no node of the connected cluster can give: such tasks would wait
    forever, so the job refuses to start. Also a URL output staged in a folder of the driver's
    machine while tasks may run on other nodes (they would write their outputs elsewhere)."""
    problems = [p for stage, res in spec.runtime.resources.requested()
                for p in shape.problems(stage, res.ray_options())]
    if is_url(spec.output_dir) and spec.runtime.staging_dir is None and shape.nodes > 1:
        problems.append(f"output_dir is a URL and the cluster has {shape.nodes} nodes (or node "
                        "types): set runtime.staging_dir to a folder every node mounts at the same "
                        "path (tasks write their outputs there before the driver uploads them)")
    return problems


# --- stages -----------------------------------------------------------------------------------

def stage_import(run: JobRun) -> None:
    fm = run.spec.data.fashion_mnist
    if fm is None:
        return
    from pipeline.data.fashion_mnist import import_fashion_mnist

    t = time.time()
    import_fashion_mnist(fm.source_dir, fm.out_dir, fm.samples_per_shard, fm.limit, fm.image_format)
    log.info("fashion-mnist shards ready in %s (%.1fs)", fm.out_dir, time.time() - t)


def stage_shards(run: JobRun) -> None:
    """The shard table (shard_index, url, num_keys, num_samples), fixed once written, and each
    shard's offsets file (where its images lie, for fetching one by id)."""
    urls = expand_shards(run.spec.data.database)
    if not urls:
        raise ConfigError(f"data.database {run.spec.data.database!r} matches no .tar shard")
    if len(urls) > MAX_SHARDS:
        raise ConfigError(f"{len(urls)} shards exceed the id scheme's {MAX_SHARDS}")
    path, layout = run.layout.shards_table, run.layout
    if path.is_file():
        table = pq.read_table(path).to_pylist()
        if [r["url"] for r in table] != urls:
            raise ConfigError(f"{path}: the job's shard list changed since it was written; "
                              "use a new output_dir for different data")
        # job folders from before offsets files existed: re-scan just the shards lacking one
        missing = [(i, u) for i, u in enumerate(urls) if not layout.offsets_file(i).is_file()]
        if missing:
            run.run("shards.offsets", [Unit(f"{i:05d}", tasks.scan_task,
                                            (u, str(layout.offsets_file(i)))) for i, u in missing],
                    fingerprint(urls, "offsets"), desc="scan shard offsets", samples_key="num_keys")
    else:
        fp = fingerprint(urls)
        run.run("shards", [Unit(f"{i:05d}", tasks.scan_task, (u, str(layout.offsets_file(i))))
                           for i, u in enumerate(urls)], fp,
                desc="scan shards", samples_key="num_keys")
        counts = dict(run.manifest.unit_counts("shards", fp))
        table = [{"shard_index": i, "url": u, "num_keys": counts[f"{i:05d}"]["num_keys"],
                  "num_samples": counts[f"{i:05d}"]["num_samples"]} for i, u in enumerate(urls)]
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(table), tmp)
        tmp.replace(path)
    run.state["shards"] = table


def run_subset(manifest: Manifest, rule, urls: list[str], out_dir, *, allow_smaller: bool = False,
               progress: bool = True, max_retries: int = 2, shard_indexes: list[int] | None = None,
               run: JobRun | None = None) -> dict:
    """Scan every shard (one task each) for its smallest-hash eligible keys, then merge them into
    ``out_dir/subset.parquet`` and ``summary.json``. Shared by the job stage (``run``: the job's
    resources and retries) and `subset build`."""
    from pipeline.data.subsets import finish_subset, scan_shard_candidates

    out_dir = Path(out_dir)
    shard_indexes = shard_indexes or list(range(len(urls)))
    candidates = [str(out_dir / "candidates" / f"{i:05d}.parquet") for i in shard_indexes]
    fp = fingerprint(urls, rule)
    units = [Unit(f"{i:05d}", scan_shard_candidates, (u, i, rule, c))
             for i, u, c in zip(shard_indexes, urls, candidates, strict=True)]
    desc = f"subset scan ({rule.kind}, N={rule.size})"
    if run is not None:
        run.run("subset.scan", units, fp, desc=desc, samples_key="scanned")
    else:
        run_units(manifest, "subset.scan", units, fp, progress=progress, max_retries=max_retries,
                  desc=desc, samples_key="scanned")
    counts = [c for _, c in manifest.unit_counts("subset.scan", fp)]
    return finish_subset(rule, candidates, out_dir, counts, allow_smaller)


def _subset_rule(spec: JobSpec):
    from pipeline.data.subsets import SubsetRule

    s = spec.subset
    return SubsetRule(s.kind, s.size, s.seed, s.tag_field, s.vocabulary)


def stage_subset(run: JobRun) -> None:
    """IG-N-All / IG-N-Targeted manifest under subset/ (no-op without a `subset` section)."""
    spec, layout = run.spec, run.layout
    run.state.update(subset_manifest=None, subset_fp=None)
    if spec.subset is None:
        return
    rule = _subset_rule(spec)
    fp = fingerprint([s["url"] for s in run.state["shards"]], rule, spec.subset.allow_smaller)
    summary_path = layout.subset_dir / "summary.json"
    if not (run.manifest.is_done("subset", "merge", fp) and layout.subset_manifest.is_file()):
        from pipeline.data.subsets import NotEnoughSamples

        run.manifest.mark_running("subset", ["merge"], fp)
        try:
            summary = run_subset(run.manifest, rule, [s["url"] for s in run.state["shards"]],
                                 layout.subset_dir, allow_smaller=spec.subset.allow_smaller,
                                 shard_indexes=[s["shard_index"] for s in run.state["shards"]],
                                 run=run)
        except NotEnoughSamples as err:
            run.manifest.mark_failed("subset", "merge", str(err))
            raise StageFailed(f"stage subset: {err}") from None
        run.manifest.mark_done("subset", "merge", {k: summary[k] for k in ("selected", "scanned")})
    summary = read_json(summary_path)
    run.state.update(subset_manifest=str(layout.subset_manifest), subset_fp=fp,
                     subset_summary={k: v for k, v in summary.items() if k != "coverage"})


def _subset_for(run: JobRun, apply: str) -> str | None:
    """The subset manifest when the subset applies at this point (features or index)."""
    sub = run.spec.subset
    return run.state["subset_manifest"] if sub is not None and sub.apply == apply else None


def stage_train(run: JobRun) -> None:
    """Train the demo classifier (cached by content hash of settings and data); or take the
    given / pretrained weights; or save one seeded random init every task then loads."""
    spec, layout = run.spec, run.layout
    if not spec.model.trained_here:
        from pipeline.features.backbones import build_model, pretrained_weights

        path = pretrained_weights(spec.model)
        source = path
        if path is None:  # weights: random -> one seeded init shared by every task
            path = layout.model_dir / f"{spec.model.arch}-random-seed{spec.seed}.pt"
            if not path.is_file():
                torch.manual_seed(spec.seed)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(build_model(spec.model).state_dict(), str(path) + ".tmp")
                Path(str(path) + ".tmp").replace(path)
            source, path = "random", str(path.relative_to(layout.root))
        else:
            path = str(Path(path).resolve())
        write_json(layout.model_info, {"path": path, "sha256": file_sha256(layout.root / path),
                                       "training_hash": None, "source": source,
                                       "arch": spec.model.arch})
    else:
        from pipeline.train.classifier import training_hash

        urls = [s["url"] for s in run.state["shards"]]
        fp = training_hash(spec.model, spec.train, [file_sha256(u) if "://" not in u else u for u in urls])
        path = layout.model_dir / f"classifier-{fp}.pt"
        result = run.single("train", tasks.train_task, fp, spec.model_dump(), urls, str(path),
                            run.threads(run.resources("train", big=True)))
        if result is not None or not layout.model_info.is_file():
            if not path.is_file():
                raise RuntimeError(f"{path}: the train stage is marked done but its output is gone; "
                                   "delete the job's manifest/ entry or use a new output_dir")
            write_json(layout.model_info, {
                "path": str(path.relative_to(layout.root)), "sha256": file_sha256(path),
                "training_hash": fp, "history": (result or {}).get("history"),
                "train_seconds": (result or {}).get("seconds"), "arch": spec.model.arch})
    info = read_json(layout.model_info)
    run.state.update(weights=str(layout.root / info["path"]), weights_sha256=info["sha256"])


def stage_transforms(run: JobRun) -> None:
    spec, layout = run.spec, run.layout
    fs = spec.features
    fp = fingerprint(run.state["weights_sha256"], fs.layers, fs.pooling, fs.rmac_sample, fs.pca_dim,
                     fs.pca_sample, fs.whiten, fs.storage, spec.seed,
                     [s["url"] for s in run.state["shards"]])
    result = run.single("transforms", tasks.fit_transforms_task, fp, spec.model_dump(),
                        run.state["shards"], run.state["weights"], str(layout.root),
                        run.threads(run.resources("transforms", big=True)))
    if result is not None:
        write_json(layout.transforms_info, {"weights_sha256": run.state["weights_sha256"],
                                            "files": result["files"], "fingerprint": fp,
                                            "sample_size": result["sample_size"]})
    info = read_json(layout.transforms_info)
    run.state.update(transform_sha256=info["files"], transforms_fp=fp)


def stage_features(run: JobRun) -> None:
    spec = run.spec
    subset = _subset_for(run, "features")
    fp = fingerprint(run.state["transforms_fp"], run.state["transform_sha256"],
                     spec.data.max_image_pixels, __version__, run.state["subset_fp"] if subset else None)
    resources = run.resources("features")
    recipe = feature_recipe(run, "cuda" if resources.get("num_gpus") else "cpu")
    # The recipe is part of the fingerprint: features made by other arithmetic (another
    # precision, decoder or device kind) are features of another database.
    fp = fingerprint(fp, recipe.id)
    run.state["features_fp"] = fp
    run.state["recipe"] = recipe.as_dict()
    run.run("features", features_units(run, run.state["shards"], subset), fp, desc="features",
            total=len(run.state["shards"]), samples_key="written")


def features_units(run: JobRun, shards: list[dict], subset: str | None = None):
    """One features unit per shard, with the job's weights, transforms and recipe (also the
    units of shards added to a finished database: pipeline/runtime/living.py)."""
    spec = run.spec
    provenance = {"backbone": spec.model.arch, "weights_sha256": run.state["weights_sha256"],
                  "transform_sha256": run.state["transform_sha256"], "recipe": run.state["recipe"]}
    threads = run.threads(run.resources("features"))
    return (Unit(f"{s['shard_index']:05d}", tasks.features_task,
                 (spec.model_dump(), s["url"], s["shard_index"], run.state["weights"],
                  str(run.layout.root), provenance, threads, subset)) for s in shards)


def feature_recipe(run: JobRun, device_kind: str) -> FeatureRecipe:
    """The recipe the features stage runs with on ``device_kind`` (from the spec's precision and
    decoder, the model's preprocessing, the weights and the fitted transforms)."""
    fs = run.spec.features
    preprocess = build_model(run.spec.model).preprocess
    return make_recipe(preprocess, device_kind, fs.precision, fs.decode_backend,
                       run.state["weights_sha256"], run.state["transform_sha256"])


INDEX_STEPS = ["train", "populate", "merge"]


@dataclass
class LayerIndexPlan:
    """What the index steps of one layer need; every step derives it the same way."""

    factory: str
    train_size: int
    train_fp: str  # the trained index and the parts depend on this alone
    merge_fp: str  # ... and the merged index / shards also on the layout, merge mode and nprobe


def index_plans(run: JobRun) -> dict[str, LayerIndexPlan]:
    spec, ix = run.spec, run.spec.index
    subset = _subset_for(run, "index")
    plans = {}
    for layer in spec.features.layers:
        factory, train_size = _index_factory(run, layer, subset)
        train_fp = fingerprint(run.state["features_fp"], layer, factory, train_size, spec.seed,
                               run.state["subset_fp"] if subset else None)
        tuned = ix.factory == "auto" or ix.nprobe == "auto"
        merge_fp = fingerprint(train_fp, ix.layout, ix.merge, ix.nprobe, ix.target_recall,
                               spec.store.partitions if ix.layout == "sharded" else None,
                               spec.evaluate.k if tuned else None)
        plans[layer] = LayerIndexPlan(factory, train_size, train_fp, merge_fp)
    return plans


def index_train(run: JobRun, plans: dict[str, LayerIndexPlan]) -> None:
    """One task per layer: train on a sample spread over the feature shards."""
    layout = run.layout
    files = [str(layout.features_file(s["shard_index"])) for s in run.state["shards"]]
    for layer, plan in plans.items():
        run.single(f"index.train.{layer}", tasks.train_index_task, plan.train_fp, layer, files,
                   plan.factory, plan.train_size, run.spec.seed,
                   str(layout.trained_index(layer)), str(layout.root))


def index_populate(run: JobRun, plans: dict[str, LayerIndexPlan]) -> None:
    """One task per (layer, shard), each writing one part atomically; retried, resumable."""
    units = populate_units(run, list(plans), run.state["shards"], _subset_for(run, "index"))
    # One run over every layer's units keeps all workers busy; its fingerprint combines the
    # layers' (each unit names its layer).
    run.run("index.populate", units, fingerprint({k: p.train_fp for k, p in plans.items()}),
            desc="index populate", samples_key="added")


def populate_units(run: JobRun, layers: list[str], shards: list[dict],
                   subset: str | None = None) -> list[Unit]:
    """One part per (layer, shard): the shard's vectors added to the layer's trained index."""
    layout = run.layout
    return [Unit(f"{layer}/{s['shard_index']:05d}", tasks.populate_task,
                 (layer, str(layout.trained_index(layer)), str(layout.features_file(s["shard_index"])),
                  str(layout.index_part(layer, s["shard_index"])), str(layout.root), subset,
                  s["shard_index"]))
            for layer in layers for s in shards]


def index_merge(run: JobRun, plans: dict[str, LayerIndexPlan]) -> None:
    """Per layer: merge the parts into one index or into one shard per store partition (in
    memory or on disk), tune nprobe when asked, and write index.json."""
    from pipeline.index.choice import choose_merge

    spec, layout = run.spec, run.layout
    shards = run.state["shards"]
    num_parts = spec.store.partitions
    if spec.index.layout == "merged":
        groups = {None: [s["shard_index"] for s in shards]}
    else:  # one index shard per store partition: co-locatable with it
        groups = {p: [s["shard_index"] for s in shards
                      if partition_of_shard(s["shard_index"], num_parts) == p]
                  for p in range(num_parts)}
    files = [str(layout.features_file(s["shard_index"])) for s in shards]
    subset = _subset_for(run, "index")
    populate_fp = fingerprint({k: p.train_fp for k, p in plans.items()})
    for layer, plan in plans.items():
        fp = plan.merge_fp
        # factory: auto may pick an exact Flat index, which has no inverted lists to put on disk;
        # merge: auto goes on disk above a size (index/choice.py)
        n = sum(c.get("added", 0) for u, c in run.manifest.unit_counts("index.populate", populate_fp)
                if u.startswith(f"{layer}/"))
        ondisk = choose_merge(spec.index.merge, n, plan.factory, spec.index.layout,
                              num_parts) == "ondisk" and "IVF" in plan.factory \
            and not plan.factory.startswith("B")
        units = [Unit(f"{layer}/{'merged' if p is None else f'shard-{p:03d}'}", tasks.merge_task,
                      (str(layout.trained_index(layer)),
                       [str(layout.index_part(layer, i)) for i in members],
                       str(layout.merged_index(layer) if p is None else layout.index_shard(layer, p)),
                       ondisk))
                 for p, members in groups.items()]
        merged = run.run(f"index.merge.{layer}", units, fp, desc=f"index merge {layer}",
                         samples_key="ntotal")
        if merged.ran or not layout.index_info(layer).is_file():
            counts = dict(run.manifest.unit_counts(f"index.merge.{layer}", fp))
            fixed_nprobe = None if spec.index.nprobe == "auto" else spec.index.nprobe
            write_json(layout.index_info(layer), {
                "factory": plan.factory, "nprobe": fixed_nprobe or 1,
                "layout": spec.index.layout, "shards": None if None in groups else num_parts,
                "merge": "ondisk" if ondisk else "memory",
                "ntotal": sum(c["ntotal"] for c in counts.values()),
                "transform_sha256": run.state["transform_sha256"][layer],
                "weights_sha256": run.state["weights_sha256"],
                "recipe": run.state.get("recipe"), "fingerprint": fp})
            if spec.index.factory == "auto" or spec.index.nprobe == "auto":
                tuned = run.single(f"index.tune.{layer}", tasks.tune_task, fp,
                                   str(layout.root), layer, files, spec.evaluate.k,
                                   spec.index.target_recall, subset)
                info = read_json(layout.index_info(layer))
                info["recall"] = {k: tuned[k] for k in ("recall", "curve", "queries", "k")}
                info["nprobe"] = fixed_nprobe or tuned["nprobe"] or tuned["curve"][-1]["nprobe"] or 1
                write_json(layout.index_info(layer), info)


INDEX_STEP_FUNCS = {"train": index_train, "populate": index_populate, "merge": index_merge}


def stage_index(run: JobRun, until_step: str = "merge") -> None:
    """train -> populate -> merge (``until_step`` stops earlier: the CLI's index steps)."""
    plans = index_plans(run)
    for step in INDEX_STEPS[: INDEX_STEPS.index(until_step) + 1]:
        INDEX_STEP_FUNCS[step](run, plans)


def _index_factory(run: JobRun, layer: str, subset: str | None) -> tuple[str, int]:
    """The layer's FAISS factory and training-sample size: the spec's, or chosen from N, the
    dimension and the memory budget (written to index/<layer>/choice.json)."""
    spec, layout = run.spec, run.layout
    if spec.index.factory != "auto":
        return spec.index.factory, spec.index.train_sample
    from pipeline.features.stack import load_stack
    from pipeline.index.choice import choose_index

    if subset:
        n = read_json(layout.subset_dir / "summary.json")["selected"]
    else:
        n = sum(c.get("written", 0) for _, c in run.manifest.unit_counts("features", run.state["features_fp"]))
    stack = load_stack(layout.transform_dir(layer))
    choice = choose_index(n, stack.dim, int(spec.index.memory_budget_gb * 2**30), stack.binary)
    train = choice.train_size(spec.index.train_sample)
    write_json(layout.index_dir(layer) / "choice.json",
               {**choice.as_dict(), "n": n, "dim": stack.dim, "binary": stack.binary,
                "memory_budget_gb": spec.index.memory_budget_gb, "train_sample": train})
    return choice.factory, train


def stage_store(run: JobRun) -> None:
    spec, layout = run.spec, run.layout
    encoding = spec.store.encoding
    num_parts = spec.store.partitions
    subset = _subset_for(run, "index")
    fp = fingerprint(run.state["features_fp"], spec.store.model_dump(),
                     run.state["subset_fp"] if subset else None,
                     spec.evaluate.cbw_d.model_dump() if encoding == "topk" else None)
    units = store_units(run, run.state["shards"], layout.store_dir, subset, every_partition=True)
    stored = run.run("store", units, fp, desc="store", samples_key="written")
    if stored.ran or not layout.store_info.is_file():
        counts = dict(run.manifest.unit_counts("store", fp))
        write_json(layout.store_info, {"partitions": num_parts, "encoding": encoding,
                                       "count": sum(c["written"] for c in counts.values()),
                                       "weights_sha256": run.state["weights_sha256"], "fingerprint": fp})
    run.state["store_fp"] = fp


def store_units(run: JobRun, shards: list[dict], store_dir, subset: str | None = None,
                every_partition: bool = False) -> list[Unit]:
    """One unit per store partition (``every_partition``: also those without shards) writing
    the softmax of its shards' rows into ``store_dir``."""
    spec, layout = run.spec, run.layout
    num_parts = spec.store.partitions
    groups: dict[int, list[str]] = {p: [] for p in range(num_parts)} if every_partition else {}
    for s in shards:
        groups.setdefault(partition_of_shard(s["shard_index"], num_parts), []).append(
            str(layout.features_file(s["shard_index"])))
    encoding = spec.store.encoding
    options = {} if encoding == "float16" else {
        "k": spec.store.topk, "m": spec.evaluate.cbw_d.m, "p": spec.evaluate.cbw_d.p}
    return [Unit(f"part-{p:03d}", tasks.store_task,
                 (str(store_dir), p, files, subset, encoding, options))
            for p, files in sorted(groups.items())]


def stage_verify(run: JobRun) -> None:
    """The invariant, as tasks bounded by one shard, hash bucket, index file or store partition
    (pipeline/runtime/verify.py): verify.shards, verify.keys, verify.index.<layer>, verify.store
    (and verify.diagnose when digests differ); the driver keeps O(shards). Done once per
    fingerprint (the `verify` unit); a run that did not finish re-runs every unit."""
    from pipeline.runtime.verify import VerifyFailed, verify_job

    fp = fingerprint(run.state["features_fp"], run.state.get("store_fp"), run.spec.index.model_dump(),
                     run.state["subset_fp"])
    if run.manifest.is_done("verify", "verify", fp):
        return
    run_fp = fingerprint(fp, time.time_ns())  # the units' scratch files last one run only

    def run_stage(stage, units):
        run.run(stage, units, run_fp, section="verify", desc=stage, total=len(units))
        return run.manifest.unit_counts(stage, run_fp)

    sub = run.spec.subset
    run.manifest.mark_running("verify", ["verify"], fp)
    try:
        from pipeline.jobfolder import database_shards

        # the whole database: the job's shards and any added generations' (runtime/living.py)
        result = verify_job(str(run.layout.root), database_shards(run.layout), run.spec.features.layers,
                            run.spec.store.partitions, run.state["subset_manifest"],
                            sub.apply if sub else None, run_stage=run_stage)
    except (VerifyFailed, FileNotFoundError) as err:
        run.manifest.mark_failed("verify", "verify", str(err))
        raise StageFailed(f"stage verify: {err}") from None
    except StageFailed as err:
        run.manifest.mark_failed("verify", "verify", str(err))
        raise
    run.manifest.mark_done("verify", "verify", result)
    run.state["verify"] = result


def stage_evaluate(run: JobRun) -> None:
    spec = run.spec
    duplicates = None
    if spec.evaluate.decontaminate != "off":
        duplicates = decontaminate_before_evaluate(run)
    fp = fingerprint(run.state["features_fp"], run.state.get("store_fp"), spec.index.model_dump(),
                     spec.evaluate.model_dump(), expand_shards(spec.data.queries), duplicates)
    result = run.single("evaluate", tasks.evaluate_task, fp, str(run.layout.root),
                        run.threads(run.resources("evaluate", big=True)), run.progress)
    results_md = run.layout.eval_dir / "results.md"
    run.state["eval_markdown"] = result["markdown"] if result else results_md.read_text()


def decontaminate_before_evaluate(run: JobRun) -> str:
    """``evaluate.decontaminate``: the duplicates list (``knn-defense decontaminate``) must
    exist; with ``remove`` its database images are removed (pipeline/runtime/living.py) before
    the evaluate stage, once per list. Returns the list's hash (the evaluation depends on it)."""
    from pipeline.evaluate.decontaminate import duplicates_path

    layout = run.layout
    path = duplicates_path(layout.root)
    if not path.is_file():
        raise ConfigError(f"{path}: missing (evaluate.decontaminate: "
                          f"{run.spec.evaluate.decontaminate}): run `knn-defense decontaminate "
                          f"{layout.root} --queries SHARDS`, then run the job again")
    digest = file_sha256(path)
    if run.spec.evaluate.decontaminate == "remove":
        from pipeline.runtime.living import remove_keys

        marker = path.with_name("removed.json")
        if not marker.is_file() or read_json(marker).get("duplicates_sha256") != digest:
            keys = sorted(set(pq.read_table(path, columns=["db_key"]).column("db_key").to_pylist()))
            keys_file = path.with_name("remove-keys.txt")
            keys_file.write_text("".join(f"{k}\n" for k in keys))
            report = remove_keys(layout.root, keys_file, require_finished=False)
            write_json(marker, {"duplicates_sha256": digest, "report": report})
        run.state["decontaminate"] = read_json(marker)["report"]
    return digest


STAGE_FUNCS = {name: globals()[f"stage_{name}"] for name in STAGES}


def write_resolved_spec(spec: JobSpec, layout: JobLayout) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    raw = spec.model_dump(mode="json")
    raw["code_version"] = __version__
    tmp = layout.job_yaml.with_name("job.yaml.tmp")
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    tmp.replace(layout.job_yaml)


class JobFailed(StageFailed):
    """The job stopped after a stage with failed units; ``summary`` says what failed and how to
    retry (the summary was also written to summary.json)."""

    def __init__(self, message: str, summary: dict, report: StageReport | None = None):
        super().__init__(message, report)
        self.summary = summary


def retry_command(output_dir: str) -> str:
    return f"knn-defense resume {shlex.quote(str(output_dir))}"


def _remote_for(spec: JobSpec):
    """The uploader of a job whose output_dir is an fsspec URL (None for a local folder)."""
    if not is_url(spec.output_dir):
        return None
    from pipeline.runtime.remote import RemoteJob, default_staging

    remote = RemoteJob(spec.output_dir, spec.runtime.staging_dir or default_staging(spec.output_dir))
    if not JobLayout(remote.staging).manifest.is_file() and remote.has_job():
        remote.fetch()  # staged elsewhere before: start from what was uploaded
    return remote


def run_job(spec: JobSpec, until: str | None = None, *, address: str | None = None,
            num_cpus: int | None = None, progress: bool | None = None,
            announce: bool | None = None, check_inputs: bool = True) -> dict:
    """Run a validated job up to and including stage ``until`` (default: all stages; or
    ``index.train`` / ``index.populate`` / ``index.merge``: up to that step of the index stage),
    like make: units already done with the same fingerprint are not run again. Returns the
    summary written to ``summary.json``; raises JobFailed (after writing it) when units of a
    stage failed: the stage's other units finish, later stages do not start.

    With an fsspec URL as output_dir the job runs in a local staging folder and each finished
    stage is uploaded, then marked complete (pipeline/runtime/remote.py).

    Missing inputs (shards, weights, unknown taps: pipeline/validate.py) raise one ConfigError
    listing them before any work; ``check_inputs=False`` when the caller has just checked them."""
    last, _, step = (until or STAGES[-1]).partition(".")
    if last not in STAGES or (step and (last != "index" or step not in INDEX_STEPS)):
        raise ConfigError(f"unknown stage {until!r}; stages are {STAGES} "
                          f"(and {['index.' + s for s in INDEX_STEPS]})")
    if check_inputs:
        check_paths(spec, f"job {spec.name}")
    to_run = STAGES[: STAGES.index(last) + 1]
    progress = spec.runtime.progress if progress is None else progress
    announce = progress if announce is None else announce
    with ray_session(address or spec.runtime.address, num_cpus or spec.runtime.num_cpus):
        shape = cluster_shape()
        problems = resource_problems(spec, shape)
        if problems:  # before any work: such tasks would wait forever
            raise ConfigError.listing(f"job {spec.name}", problems)
        remote = _remote_for(spec)
        layout = JobLayout(remote.staging if remote else spec.output_dir)
        write_resolved_spec(spec, layout)
        if remote is not None:
            remote.upload_state()  # job.yaml: resume finds the spec even if stage 1 never ends
        manifest = Manifest(layout.manifest)
        try:
            run = JobRun(spec, layout, manifest, progress, shape)
            failure = None
            for stage in to_run:
                t = time.time()
                try:
                    if stage == "index" and step:
                        stage_index(run, step)
                    else:
                        STAGE_FUNCS[stage](run)
                except StageFailed as err:
                    failure = err
                    break
                finally:
                    run.times[stage] = round(time.time() - t, 2)
                if remote is not None and stage in _uploaded_stages():
                    remote.upload_stage(stage)
                    remote.upload_state(manifest)
                if announce:
                    done = until if stage == "index" and step else stage
                    print(f"[{spec.name}] {done} done ({run.times[stage]:.1f}s)", flush=True)
            summary = build_summary(run, failure)
            write_json(layout.summary, summary)
            if remote is not None:
                remote.upload_state(manifest)
        finally:
            manifest.close()
    if failure is not None:
        raise JobFailed(f"{failure}\nretry: {summary['retry']}", summary, failure.report) from None
    return {**summary, "eval_markdown": run.state.get("eval_markdown")}


def _uploaded_stages() -> set[str]:
    from pipeline.runtime.remote import STAGE_OUTPUTS

    return set(STAGE_OUTPUTS)


_FAILED_LISTED = 50


def build_summary(run: JobRun, failure: StageFailed | None = None) -> dict:
    skipped: dict[str, int] = {}
    written = read = 0
    for _, counts in run.manifest.unit_counts("features", run.state.get("features_fp")):
        read += counts.get("read", 0)
        written += counts.get("written", 0)
        for reason, n in counts.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
    summary = {"job": run.spec.name, "status": "failed" if failure else "done",
               "output_dir": run.spec.output_dir, "code_version": __version__,
               "stage_seconds": run.times,
               "stages": {name: report.as_dict() for name, report in run.reports.items()},
               "shards": len(run.state.get("shards", [])), "keys_read": read, "written": written,
               "skipped": skipped, "verify": run.state.get("verify"),
               "subset": run.state.get("subset_summary"),
               "cluster": {"cpus": run.cpus, "gpus": run.gpus}}
    if failure is not None:
        stage = failure.report.stage if failure.report else None
        failed = run.manifest.failures(stage, limit=_FAILED_LISTED)
        summary["failed_stage"] = stage
        summary["failed_total"] = failure.report.failed if failure.report else len(failed)
        summary["failed_units"] = [{"stage": st, "unit": unit, "error": error}
                                   for st, unit, error in failed]
        summary["error"] = str(failure)
        summary["retry"] = retry_command(run.spec.output_dir)
    return summary


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def format_summary(summary: dict) -> str:
    """The summary as a table (one row per stage run), then failures and the retry command."""
    rows = [("stage", "units", "done", "cached", "failed", "samples", "samples/s", "seconds",
             "skipped")]
    for name, r in summary.get("stages", {}).items():
        rows.append((name, r["units"], r["done"], r["cached"], r["failed"], r["samples"] or "",
                     r["samples_per_s"] or "", f"{r['seconds']:.1f}",
                     ", ".join(f"{k}={v}" for k, v in sorted(r["skipped"].items()))))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) if i in (0, 8) else str(v).rjust(w)
                       for i, (v, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    lines.append(f"job {summary['job']}: {summary['status']}; {summary['written']} images written, "
                 f"skipped {summary['skipped'] or 0}; outputs in {summary['output_dir']}")
    if summary["status"] == "failed":
        total, listed = summary["failed_total"], summary["failed_units"]
        lines.append(f"FAILED: {total} unit(s) of stage {summary['failed_stage']}"
                     + (f" (first {len(listed)} below; all in the manifest)" if total > len(listed) else ""))
        lines += [f"  {u['stage']}/{u['unit']}: {_last_line(u['error'])}" for u in listed]
        lines.append(f"retry: {summary['retry']}")
    return "\n".join(lines)
