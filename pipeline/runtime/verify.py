"""The invariant: every database key is in Parquet, every index and the store exactly once,
and every key read from a shard is either written or skipped with a reason."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipeline.features.extract import read_metadata
from pipeline.index.faiss_index import all_ids, load_index
from pipeline.layout import JobLayout
from pipeline.store.softmax_store import SoftmaxStore


class VerifyFailed(RuntimeError):
    pass


def _check_same(name: str, got: np.ndarray, expected: np.ndarray) -> None:
    uniq, counts = np.unique(got, return_counts=True)
    dups = int((counts > 1).sum())
    missing = np.setdiff1d(expected, uniq).size
    extra = np.setdiff1d(uniq, expected).size
    if dups or missing or extra:
        raise VerifyFailed(f"{name}: {dups} duplicated, {missing} missing, {extra} unexpected ids "
                           f"(of {expected.size})")


def verify_job(job_dir: str, shard_table: list[dict], layers: list[str], partitions: int) -> dict:
    layout = JobLayout(job_dir)
    ids, keys, skipped = [], [], {}
    for shard in shard_table:
        path = layout.features_file(shard["shard_index"])
        table = pq.read_table(path, columns=["key", "id"])
        stats = read_metadata(path)["stats"]
        written = table.num_rows
        lost = sum(stats["skipped"].values())
        if stats["read"] != shard["num_keys"] or written + lost != stats["read"]:
            raise VerifyFailed(f"{path}: read {stats['read']} keys (shard table says "
                               f"{shard['num_keys']}) but wrote {written} + skipped {lost}")
        for reason, n in stats["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        ids.append(table.column("id").to_numpy())
        keys += table.column("key").to_pylist()
    expected = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    _check_same("parquet", expected, np.unique(expected))
    if len(set(keys)) != len(keys):
        raise VerifyFailed(f"parquet: {len(keys) - len(set(keys))} duplicated sample keys")
    for layer in layers:
        _check_same(f"index {layer}", all_ids(load_index(layout.merged_index(layer))), expected)
    with SoftmaxStore(layout.store_dir, partitions) as store:
        _check_same("store", np.fromiter(store.iter_ids(), np.int64), expected)
    return {"keys": int(expected.size), "skipped": skipped, "layers": list(layers),
            "partitions": partitions}
