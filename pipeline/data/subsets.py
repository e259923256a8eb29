"""IG-N-All and IG-N-Targeted subsets: exactly N keys, reproducible, chosen without a global shuffle.

Every eligible key gets a seeded 64-bit hash; the subset is the N smallest hashes. Each shard
keeps its local N smallest (a task per shard, written in ascending hash order); the merge finds
the global N-th smallest hash by hash range (counts per range, streamed in batches) and writes
the rows at or below it, in memory that does not grow with N (N up to 1e9 and beyond).
For a fixed seed the N1-subset is contained in the N2-subset whenever N1 < N2 (nested database
sizes), and the choice is uniform over eligible keys.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.hashtags import extract_tags, load_vocabulary
from pipeline.data.shards import ShardStats, iter_samples

CANDIDATE_SCHEMA = pa.schema([
    ("hash", pa.uint64()), ("shard_index", pa.int64()), ("key", pa.string()),
    ("hashtags", pa.list_(pa.string())), ("classes", pa.list_(pa.int32())),
])  # fmt: skip


class NotEnoughSamples(ValueError):
    pass


def key_hash(key: str, seed: int) -> int:
    """Seeded 64-bit hash of a sample key (blake2b keyed by the seed: stable across runs/platforms)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little")


@dataclass(frozen=True)
class SubsetRule:
    kind: str  # "all" | "targeted"
    size: int
    seed: int = 0
    tag_field: str = "tags"
    vocabulary: str | None = None  # None = the packaged ImageNet-1k hashtag vocabulary


def scan_shard_candidates(url: str, shard_index: int, rule: SubsetRule, out_path: str | os.PathLike,
                          vocab=None) -> dict:
    """Decode-free scan of one shard; writes its (up to) ``rule.size`` smallest-hash eligible
    samples to ``out_path`` (Parquet, atomically) and returns counts."""
    if rule.kind == "targeted" and vocab is None:
        vocab = load_vocabulary(rule.vocabulary)
    stats = ShardStats()
    eligible = 0
    heap: list[tuple[int, str, list, list]] = []  # max-heap via negated hash, bounded to rule.size
    # IG-N-All needs only keys and image presence: json/txt are not even read.
    meta_exts = ("json", "txt", "cls") if vocab is not None else ("cls",)
    for sample in iter_samples(url, stats, decode=False, meta_exts=meta_exts):
        tags, classes = [], []
        if vocab is not None:
            tags, classes = vocab.match(extract_tags(sample.meta, sample.caption, rule.tag_field))
            if not tags:
                continue
        eligible += 1
        item = (-key_hash(sample.key, rule.seed), sample.key, list(tags), list(classes))
        if len(heap) < rule.size:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    rows = sorted(heap, reverse=True)  # ascending hash
    table = pa.table({
        "hash": pa.array([-r[0] for r in rows], pa.uint64()),
        "shard_index": pa.array([shard_index] * len(rows), pa.int64()),
        "key": pa.array([r[1] for r in rows], pa.string()),
        "hashtags": pa.array([r[2] for r in rows], pa.list_(pa.string())),
        "classes": pa.array([r[3] for r in rows], pa.list_(pa.int32())),
    }, schema=CANDIDATE_SCHEMA)
    _write_parquet(table, out_path)
    return {"scanned": stats.read, "eligible": eligible, "candidates": len(rows),
            "valid": stats.read - sum(stats.skipped.values()), **stats.as_dict()}


def _write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# The merge reads candidate hashes in batches of this many rows, counts them in HIST_BINS hash
# ranges, narrows to the range holding the N-th smallest, and sorts only that range once it holds
# at most RANGE_CAP hashes: memory O(batch + bins + cap), whatever N and the number of shards.
READ_BATCH = 1 << 16
HIST_BINS = 1 << 16
RANGE_CAP = 1 << 20


def _hash_batches(candidate_files: list):
    for path in candidate_files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH, columns=["hash"]):
            yield batch.column(0).to_numpy()


def global_threshold(candidate_files: list, size: int) -> tuple[int | None, int]:
    """(largest hash of the global ``size`` smallest, eligible candidates seen), by hash range:
    each pass streams every shard's candidate hashes in batches and counts them per range of
    [lo, lo + width) (HIST_BINS ranges), then keeps only the range holding the ``size``-th
    smallest; once that range holds <= RANGE_CAP hashes they are collected and the answer
    picked among them. Uniform 64-bit hashes need two passes; memory does not grow with N."""
    lo, width_bits = 0, 64  # the search range [lo, lo + 2^width_bits)
    below = 0  # candidates with a hash under lo
    total = in_range = None
    largest = None
    while True:
        hi = lo + (1 << width_bits)
        if in_range is not None and (in_range <= RANGE_CAP or width_bits <= 16):
            picked = [p for h in _hash_batches(candidate_files)
                      if len(p := h[(h >= np.uint64(lo)) & (h <= np.uint64(hi - 1))])]
            picked = np.concatenate(picked) if picked else np.zeros(0, np.uint64)
            k = size - below - 1  # 0-based rank of the answer inside the range
            return int(np.partition(picked, k)[k]), total
        shift = width_bits - 16
        counts = np.zeros(HIST_BINS, np.int64)
        for h in _hash_batches(candidate_files):
            if total is None:
                largest = max(largest or 0, int(h.max())) if len(h) else largest
            else:
                h = h[(h >= np.uint64(lo)) & (h <= np.uint64(hi - 1))]
            counts += np.bincount(((h - np.uint64(lo)) >> np.uint64(shift)).astype(np.int64),
                                  minlength=HIST_BINS)
        if total is None:
            total = int(counts.sum())
            if total <= size:  # every candidate is selected
                return largest, total
        cum = below + np.cumsum(counts)
        b = int(np.searchsorted(cum, size, side="left"))  # first range reaching `size`
        below = int(cum[b - 1]) if b else below
        in_range = int(counts[b])
        lo, width_bits = lo + (b << shift), shift


def write_subset_manifest(candidate_files: list, threshold: int | None, out_path: str | os.PathLike,
                          num_classes: int = 1000) -> dict:
    """Write the selected rows (hash <= threshold), shard by shard in row batches, to one Parquet
    manifest; returns the selected count and per-class coverage."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    coverage = np.zeros(num_classes, np.int64)
    selected = 0
    with pq.ParquetWriter(tmp, CANDIDATE_SCHEMA) as writer:
        for path in candidate_files:
            if threshold is None:
                break
            for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH):
                table = pa.Table.from_batches([batch])
                keep = table.column("hash").to_numpy() <= np.uint64(threshold)
                if not keep.any():
                    continue
                table = table.filter(pa.array(keep))
                classes = table.column("classes").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                np.add.at(coverage, classes[classes < num_classes], 1)
                writer.write_table(table)
                selected += table.num_rows
    os.replace(tmp, out_path)
    return {"selected": selected, "coverage": coverage}


def coverage_report(coverage: np.ndarray, vocab) -> dict:
    """Per-class counts and the classes no selected image maps to."""
    names = vocab.class_names if vocab is not None else [str(i) for i in range(len(coverage))]
    wnids = vocab.synsets if vocab is not None else [""] * len(coverage)
    missing = [{"class": i, "wnid": wnids[i], "name": names[i]}
               for i in np.flatnonzero(coverage == 0).tolist()]
    return {"classes_covered": int((coverage > 0).sum()), "classes_without_images": missing,
            "images_per_class": {"min": int(coverage.min()), "median": float(np.median(coverage)),
                                 "max": int(coverage.max())},
            "per_class": coverage.tolist()}


def finish_subset(rule: SubsetRule, candidate_files: list, out_dir: str | os.PathLike,
                  shard_counts: list[dict], allow_smaller: bool = False) -> dict:
    """Merge the shards' candidates into ``out_dir/subset.parquet`` + ``summary.json``."""
    threshold, eligible = global_threshold(candidate_files, rule.size)
    if eligible < rule.size and not allow_smaller:
        what = "carry a vocabulary hashtag" if rule.kind == "targeted" else "are valid samples"
        raise NotEnoughSamples(f"only {eligible} samples {what}, fewer than the {rule.size} asked for; "
                               "lower the size or allow a smaller subset (--allow-smaller / "
                               "subset.allow_smaller: true)")
    vocab = load_vocabulary(rule.vocabulary) if rule.kind == "targeted" else None
    out_dir = Path(out_dir)
    result = write_subset_manifest(candidate_files, threshold, out_dir / "subset.parquet",
                                   len(vocab.synsets) if vocab else 1)
    skipped: dict[str, int] = {}
    for c in shard_counts:
        for reason, n in c.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
    summary = {
        "kind": rule.kind, "size": rule.size, "seed": rule.seed, "tag_field": rule.tag_field,
        "shards": len(shard_counts), "scanned": sum(c["scanned"] for c in shard_counts),
        "eligible": sum(c["eligible"] for c in shard_counts), "selected": result["selected"],
        "skipped": skipped, "threshold_hash": threshold,
    }
    if vocab is not None:
        summary["matched"] = summary.pop("eligible")
        summary["coverage"] = coverage_report(result["coverage"], vocab)
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "summary.json")
    return summary


def selected_keys(manifest_path: str | os.PathLike, shard_index: int) -> set[str]:
    """Keys of one shard in a subset manifest."""
    table = pq.read_table(manifest_path, columns=["key"], filters=[("shard_index", "=", shard_index)])
    return set(table.column("key").to_pylist())
