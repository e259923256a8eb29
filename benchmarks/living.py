"""Benchmark: the living database's `add` and `remove` against the database's size.

What is measured, on the scale benchmark's finished jobs (``runs/scale/<N>/job``, written by
``python benchmarks/scale.py``: replicated Fashion-MNIST, 4 layers of 64-d float16 vectors,
IVF sqrt(N) lists in memory, 4 store partitions; their database shards, which scale.py deletes
after each point, are regenerated here at ~57k img/s):

* **add**: one new shard of 4,000 images (unique keys) to the jobs at N = 1e4, 1e5, 1e6, through
  ``pipeline.runtime.living.add_shards`` on a local Ray: the wall time, and each journal step's
  seconds (scan, features, index = populate + the generation's own index file, store). The
  per-shard steps should not grow with N; restoring the job's state (its stages' manifest
  lookups) is O(shards). Reported: add seconds at 1e6 / at 1e4, side by side in one run.
* **remove**: 10,000 random keys from the 1e6 job (each layer: a 1M-vector in-memory IVF index
  plus the touched shards' parts; the store): the wall time and the journal's step seconds.
  Side by side, on copies of one layer's 1M-vector index: one batched ``remove_ids`` of the
  10,000 ids vs single-id calls (``--single`` of them, timed and extrapolated to 10,000): the
  ratio is what batching saves (faiss #1021: each call passes over every list).

The jobs are changed in place (scale.py rebuilds them from scratch). Writes
benchmarks/results/living.json. CLI: ``python benchmarks/living.py [--sizes 10000 100000
1000000] [--remove 10000] [--single 50]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "living.json"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _scale():
    spec = importlib.util.spec_from_file_location("scale", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def new_shard(out_dir: Path, tag: str, n: int, encoded) -> Path:
    """One shard of ``n`` replicated Fashion-MNIST images with keys of their own."""
    import webdataset as wds

    pngs, labels = encoded
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{tag}.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"{tag}-{i:06d}", "png": pngs[i % len(pngs)],
                        "cls": int(labels[i % len(labels)])})
    return path


def step_seconds(journal: Path) -> dict:
    """Seconds between consecutive journal records, by step (the first from the plan file)."""
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    start = (journal.parent / "plan.json").stat().st_mtime
    out = {}
    for e in entries:
        out[e["step"]] = round(e["at"] - start, 2)
        start = e["at"]
    return out


def bench_add(n: int, work: Path, scale, encoded) -> dict:
    from pipeline.runtime.living import add_shards

    job = work / "job"
    if not (work / "db").is_dir():
        scale.replicate_shards(work / "db", n, encoded=encoded)
    shard = new_shard(work / "added", f"add{time.time_ns()}", scale.SAMPLES_PER_SHARD, encoded)
    t = time.perf_counter()
    result = add_shards(job, [str(shard)], progress=False)
    seconds = time.perf_counter() - t
    (change,) = [c for c in (job / "changes").glob(f"{result['generation']:03d}-add")]
    return {"n": n, "added": result["images"], "seconds": round(seconds, 2),
            "steps": step_seconds(change / "journal.jsonl")}


def bench_remove(n: int, work: Path, count: int, single: int, seed: int = 0) -> dict:
    import faiss
    import pyarrow.parquet as pq

    from pipeline.index.faiss_index import read_index
    from pipeline.jobfolder import database_shards
    from pipeline.layout import JobLayout
    from pipeline.runtime.living import remove_keys

    layout = JobLayout(work / "job")
    rng = np.random.default_rng(seed)
    shards = database_shards(layout)
    picked = rng.choice(len(shards), min(len(shards), count), replace=False)
    keys, ids = [], []
    per = -(-count // len(picked))
    for i in picked:
        table = pq.read_table(layout.features_file(shards[i]["shard_index"]), columns=["key", "id"])
        rows = rng.choice(table.num_rows, min(per, table.num_rows), replace=False)
        keys += [table.column("key")[int(r)].as_py() for r in rows]
        ids += [table.column("id")[int(r)].as_py() for r in rows]
    keys, ids = keys[:count], np.asarray(ids[:count], np.int64)
    # side by side on copies of one layer's index: batched vs one id per call
    layer = "conv_4_2"
    batched = read_index(layout.merged_index(layer))
    t = time.perf_counter()
    removed = batched.remove_ids(faiss.IDSelectorBatch(ids))
    batch_s = time.perf_counter() - t
    del batched
    one_by_one = read_index(layout.merged_index(layer))
    t = time.perf_counter()
    for i in ids[:single]:
        one_by_one.remove_ids(faiss.IDSelectorBatch(np.asarray([i])))
    single_s = (time.perf_counter() - t) / single
    del one_by_one
    keys_file = work / "remove-keys.txt"
    keys_file.write_text("\n".join(keys) + "\n")
    t = time.perf_counter()
    report = remove_keys(layout.root, keys_file)
    seconds = time.perf_counter() - t
    change = Path(report["journal"]).parent
    steps = step_seconds(change / "journal.jsonl")
    index_steps = {k: v for k, v in steps.items() if k.startswith("index:")}
    return {"n": n, "keys": count, "removed": report["found"], "seconds": round(seconds, 2),
            "resolve_s": steps.get("resolve"), "index_files": len(index_steps),
            "index_s": round(sum(index_steps.values()), 2),
            "store_s": round(sum(v for k, v in steps.items() if k.startswith("store:")), 2),
            "layer_index": {"layer": layer, "vectors": n, "batched_removed": int(removed),
                            "batched_s": round(batch_s, 3), "single_id_call_s": round(single_s, 4),
                            "single_calls_timed": single,
                            "single_extrapolated_s": round(single_s * count, 1),
                            "batched_vs_single": round(single_s * count / batch_s, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--remove", type=int, default=10_000)
    ap.add_argument("--single", type=int, default=50)
    ap.add_argument("--work", default=str(ROOT / "runs" / "scale"))
    args = ap.parse_args()
    scale = _scale()
    work = Path(args.work)
    encoded = scale.encoded_fashion_mnist(work / "fm-train-png.pkl")
    missing = [n for n in args.sizes if not (work / str(n) / "job" / "summary.json").is_file()]
    if missing:
        raise SystemExit(f"{work}: no finished scale job for N = {missing}: run "
                         "`python benchmarks/scale.py` first")
    adds = [bench_add(n, work / str(n), scale, encoded) for n in args.sizes]
    largest = max(args.sizes)
    removal = bench_remove(largest, work / str(largest), args.remove, args.single)
    doc = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "add": adds, "add_ratio_largest_vs_smallest": round(adds[-1]["seconds"] / adds[0]["seconds"], 2),
           "remove": removal}
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
