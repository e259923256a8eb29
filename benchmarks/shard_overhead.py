"""Per-shard overhead of the features stage: a task per shard vs long-lived extraction actors.

Many small shards (40 of 50 Fashion-MNIST images, the demo's SmallResNet), so what a shard
costs besides its extraction shows. The same job's features stage runs three ways on one local
Ray, side by side in one process (a fresh manifest each, so every shard runs each time):

task, fresh worker   = one task per shard with max_calls=1: a new worker process per shard that
                       imports torch and the pipeline and loads the model (Ray's default for a
                       task asking a GPU, which also initialises CUDA each time; the features
                       stage before it ran on actors)
task, reused worker  = one task per shard on reused workers (Ray's default for a CPU task)
actors               = the features stage now: one actor per CPU slot, killed at the stage's end

seconds_per_shard    = stage wall time / shards (the shards run 2 at a time on 2 CPUs)
overhead_s_per_shard = wall time x CPU slots / shards - in-process extraction of one shard
in_process_s_per_shard: features_task called in this process on a warm model, per shard.

Writes benchmarks/results/shard_overhead.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARDS = 40
PER_SHARD = 50
WIDTHS, BLOCKS = [32, 64, 128], [2, 2, 2]  # jobs/demo.yaml's model
MODES = {"task, fresh worker": {"actors": False, "max_calls": 1},
         "task, reused worker": {"actors": False},
         "actors": {"actors": True}}


def fashion_mnist(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The first ``n`` Fashion-MNIST training images, or generated ones of the same kind."""
    from pipeline.data.fashion_mnist import load_split

    source = os.environ.get("KNN_DEFENSE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
    try:
        images, labels = load_split(source, "train")
        return images[:n], labels[:n], f"fashion-mnist ({source})"
    except (FileNotFoundError, ValueError):
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):  # a bright band whose height is the class
            images[i, 2 + 2 * c:6 + 2 * c, 3:25] = 200
        return images, labels.astype(np.int64), "generated (no Fashion-MNIST found)"


def job_spec(work: Path):
    import torch
    import yaml

    from pipeline.data.fashion_mnist import write_split_shards
    from pipeline.features.backbones import SmallResNet
    from pipeline.validate import load_job

    images, labels, source = fashion_mnist(SHARDS * PER_SHARD)
    write_split_shards(images, labels, work / "db", "train", samples_per_shard=PER_SHARD)
    write_split_shards(images[:50], labels[:50], work / "q", "test", samples_per_shard=50)
    torch.manual_seed(0)
    torch.save(SmallResNet(widths=WIDTHS, blocks=BLOCKS).state_dict(), work / "weights.pt")
    raw = {"name": "shard-overhead", "output_dir": str(work / "job"),
           "data": {"database": str(work / "db"), "queries": str(work / "q")},
           "model": {"widths": WIDTHS, "blocks": BLOCKS, "weights": str(work / "weights.pt")},
           "features": {"layers": ["conv_2_2", "conv_3_2", "conv_4_1", "conv_4_2"], "pca_dim": 64,
                        "pca_sample": 500, "batch_size": 50},
           "index": {"factory": "Flat"}, "store": {"partitions": 2},
           "runtime": {"progress": False, "max_retries": 2}}
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_job(path), source


def main() -> None:
    from pipeline.layout import JobLayout
    from pipeline.runtime import job as job_module
    from pipeline.runtime import tasks
    from pipeline.runtime.job import STAGE_FUNCS, JobRun
    from pipeline.runtime.manifest import Manifest
    from pipeline.runtime.ray_runner import cluster_shape, ray_session

    class Run(JobRun):
        """The job's own features stage, with the units' way of running chosen here."""

        mode: dict = {}

        def run(self, stage, units, fp, section=None, **options):
            if stage == "features":
                options.update(self.mode)
            return super().run(stage, units, fp, section, **options)

    cpus = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="shard-overhead-") as tmp:
        work = Path(tmp)
        spec, source = job_spec(work)
        layout = JobLayout(spec.output_dir)
        t = time.perf_counter()
        with ray_session(num_cpus=cpus):
            startup = time.perf_counter() - t
            job_module.write_resolved_spec(spec, layout)
            run = Run(spec, layout, Manifest(work / "setup.sqlite"), False, cluster_shape())
            for stage in job_module.STAGES[: job_module.STAGES.index("features")]:
                STAGE_FUNCS[stage](run)  # shard table, weights, fitted transforms

            # in process: the same plain function on a warm model (the first call loads it)
            captured = {}
            Run.mode = {}
            run.run = lambda stage, units, fp, section=None, **o: captured.setdefault("units", list(units))
            job_module.stage_features(run)
            del run.run
            units = captured["units"]
            units[0].fn(*units[0].args, **units[0].kwargs)
            t = time.perf_counter()
            for unit in units[1:6]:
                unit.fn(*unit.args, **unit.kwargs)
            in_process = (time.perf_counter() - t) / 5

            results = {}
            for name, mode in MODES.items():
                Run.mode = mode
                run.manifest = Manifest(work / f"{name.replace(' ', '_').replace(',', '')}.sqlite")
                t = time.perf_counter()
                job_module.stage_features(run)
                wall = time.perf_counter() - t
                report = run.reports["features"]
                assert report.done == SHARDS, report.as_dict()
                results[name] = {"wall_s": round(wall, 2),
                                 "seconds_per_shard": round(wall / SHARDS, 3),
                                 "overhead_s_per_shard": round(wall * cpus / SHARDS - in_process, 3)}
                print(name, json.dumps(results[name]), flush=True)
    fresh, actors = results["task, fresh worker"], results["actors"]
    out = {"benchmark": "shard_overhead", "cpus": cpus, "python": platform.python_version(),
           "data": source, "shards": SHARDS, "images_per_shard": PER_SHARD,
           "model": f"small_resnet widths={WIDTHS} blocks={BLOCKS}",
           "ray_startup_s": round(startup, 1), "in_process_s_per_shard": round(in_process, 3),
           "modes": results,
           "speedup_actors_vs_fresh_worker": round(fresh["seconds_per_shard"] / actors["seconds_per_shard"], 1),
           "model_cache_in_tasks": hasattr(tasks, "cached_model")}
    path = ROOT / "benchmarks" / "results" / "shard_overhead.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
