"""LevelDB (plyvel) store of every database image's softmax vector, keyed by its 8-byte id.

Partitioned by :func:`pipeline.ids.partition`; each partition is written by one task (LevelDB
allows one process per database) into a temp folder renamed when complete. Readers: the process
that opens a store owns it; threads in that process may read concurrently.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import plyvel

from pipeline.ids import NO_RESULT, partition

# Value header: 1-byte encoding version, uint16 class count. Old versions stay decodable.
ENCODING_FLOAT16 = 1
_HEADER = struct.Struct(">BH")


def id_key(i: int) -> bytes:
    return struct.pack(">q", int(i))


def encode_float16(softmax: np.ndarray) -> bytes:
    v = np.asarray(softmax, dtype="<f2")
    return _HEADER.pack(ENCODING_FLOAT16, v.shape[-1]) + v.tobytes()


def decode(value: bytes) -> np.ndarray:
    version, num_classes = _HEADER.unpack_from(value)
    if version == ENCODING_FLOAT16:
        return np.frombuffer(value, dtype="<f2", offset=_HEADER.size, count=num_classes).astype(np.float32)
    raise ValueError(f"unknown softmax encoding version {version}; upgrade knn-defense")


def partition_dir(store_dir: str | os.PathLike, p: int) -> Path:
    return Path(store_dir) / f"part-{p:03d}"


def write_partition(store_dir: str | os.PathLike, p: int, rows) -> int:
    """Write partition ``p`` from an iterable of (ids [n], softmax [n, C]) chunks; returns count.
    Written into ``part-PPP.tmp`` and renamed, so a crash leaves no half-written partition."""
    final = partition_dir(store_dir, p)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    db = plyvel.DB(str(tmp), create_if_missing=True, error_if_exists=True)
    try:
        for ids, softmax in rows:
            with db.write_batch(sync=False) as wb:
                for i, s in zip(ids.tolist(), softmax, strict=True):
                    wb.put(id_key(i), encode_float16(s))
            count += len(ids)
    finally:
        db.close()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return count


class SoftmaxStore:
    """Read side: opens every partition of a store in this process."""

    def __init__(self, store_dir: str | os.PathLike, num_partitions: int):
        self.store_dir = Path(store_dir)
        self.num_partitions = num_partitions
        self._dbs = []
        for p in range(num_partitions):
            path = partition_dir(store_dir, p)
            if not path.is_dir():
                self.close()
                raise FileNotFoundError(f"{path}: store partition missing; run the store stage")
            self._dbs.append(plyvel.DB(str(path), create_if_missing=False))

    def get_many(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Softmax vectors for an id array of any shape -> (values [..., C], found mask [...]).
        Id -1 (FAISS's "no result") gives a zero vector and found=False; an id absent from a
        store is a broken database and raises KeyError."""
        flat = np.asarray(ids, np.int64).reshape(-1)
        parts = partition(np.where(flat == NO_RESULT, 0, flat), self.num_partitions)
        rows, found = [], flat != NO_RESULT
        for i, p, ok in zip(flat.tolist(), parts.tolist(), found.tolist(), strict=True):
            if not ok:
                rows.append(None)
                continue
            value = self._dbs[p].get(id_key(i))
            if value is None:
                raise KeyError(f"id {i} not in softmax store {self.store_dir} (partition {p})")
            rows.append(decode(value))
        num_classes = next((len(r) for r in rows if r is not None), 0)
        out = np.zeros((len(rows), num_classes), np.float32)
        for j, r in enumerate(rows):
            if r is not None:
                out[j] = r
        return out.reshape(*np.shape(ids), num_classes), found.reshape(np.shape(ids))

    def iter_ids(self):
        for db in self._dbs:
            for key in db.iterator(include_value=False):
                yield struct.unpack(">q", key)[0]

    def close(self) -> None:
        for db in self._dbs:
            db.close()
        self._dbs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
