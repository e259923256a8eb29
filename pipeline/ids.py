"""Invertible int64 sample ids and the partition function shared by index shards and store partitions.

FAISS ids are int64 and -1 means "no result", so ids are derived, not hashed:
``id = shard_index << 24 | row_in_shard`` (16M samples per shard, 2^39 shards).
"""

from __future__ import annotations

import numpy as np

ROW_BITS = 24
MAX_ROWS_PER_SHARD = 1 << ROW_BITS
MAX_SHARDS = 1 << (63 - ROW_BITS)
NO_RESULT = -1


def make_ids(shard_index: int, rows) -> np.ndarray:
    """Ids of ``rows`` (positions in the shard's Parquet file) of shard ``shard_index``."""
    rows = np.asarray(rows, dtype=np.int64)
    if not 0 <= shard_index < MAX_SHARDS:
        raise ValueError(f"shard_index {shard_index} outside [0, {MAX_SHARDS})")
    if rows.size and (rows.min() < 0 or rows.max() >= MAX_ROWS_PER_SHARD):
        raise ValueError(f"row outside [0, {MAX_ROWS_PER_SHARD}) in shard {shard_index}")
    return (np.int64(shard_index) << ROW_BITS) | rows


def split_ids(ids) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`make_ids`: (shard_index, row) arrays."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids >> ROW_BITS, ids & (MAX_ROWS_PER_SHARD - 1)


def partition(ids, num_partitions: int) -> np.ndarray:
    """Partition of each id: by shard, so an index shard or store partition is a union of whole
    input shards and populate/store tasks never regroup rows across shards."""
    shard, _ = split_ids(ids)
    return (shard % num_partitions).astype(np.int64)


def partition_of_shard(shard_index: int, num_partitions: int) -> int:
    return int(shard_index % num_partitions)
