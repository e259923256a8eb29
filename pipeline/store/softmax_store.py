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

from pipeline.ids import NO_RESULT, partition, split_ids
from pipeline.weighting import diversity_weights, entropy_weights

# Value header: 1-byte encoding version, uint16 class count. Old versions stay decodable.
ENCODING_FLOAT16 = 1
ENCODING_TOPK = 2
_HEADER = struct.Struct(">BH")
ENCODINGS = ("float16", "topk")

# Version 2 ("topk"), after the header (all big-endian):
#   B  k        entries stored (min(k, C))
#   B  m        CBW-D M the stored weight was computed with (as requested; capped at C-1 in use)
#   e  p        CBW-D P (float16; 3.0 is exact)
#   e  w_e      CBW-E weight of the full vector (float16)
#   e  w_d      CBW-D weight of the full vector for (m, p) (float16)
#   e  residual mass outside the top k (float16)
#   k x 3 bytes entries, probability-descending: 24-bit word = class << qb | q, with
#               ib = bits for C - 1 (10 for 1000 classes), qb = 24 - ib (14), and the
#               probability linear-quantised: q = round(s * (2^qb - 1)).
# 13 + 3k bytes: k = 16 gives 61 bytes for any C <= 65535 (1000 classes: 14-bit probabilities).
_TOPK = struct.Struct(">BBeeee")
TOPK_DEFAULT_K = 16


def id_key(i: int) -> bytes:
    return struct.pack(">q", int(i))


def encode_float16(softmax: np.ndarray) -> bytes:
    v = np.asarray(softmax, dtype="<f2")
    return _HEADER.pack(ENCODING_FLOAT16, v.shape[-1]) + v.tobytes()


def _topk_bits(num_classes: int) -> tuple[int, int]:
    """(index bits, probability bits) of one 24-bit top-k entry."""
    ib = max(1, (num_classes - 1).bit_length())
    return ib, 24 - ib


def _check_topk_options(num_classes: int, k: int, m: int, p: float) -> None:
    if not 1 <= num_classes <= 0xFFFF:
        raise ValueError(f"topk encoding needs 1..65535 classes, got {num_classes}")
    if not 1 <= k <= 255:
        raise ValueError(f"topk encoding needs 1 <= k <= 255, got {k}")
    if not 1 <= m <= 255:
        raise ValueError(f"CBW-D m must be in [1, 255] to be stored, got {m}")
    if float(np.float16(p)) != float(p):
        raise ValueError(f"CBW-D p={p} is not exactly representable as float16; use e.g. 3.0")


def encode_topk_many(softmax: np.ndarray, k: int = TOPK_DEFAULT_K, m: int = 20, p: float = 3.0
                     ) -> list[bytes]:
    """Version-2 values of a batch [n, C] of softmax vectors (vectorised; see the layout above).
    The CBW-E / CBW-D weights are computed here from the full vectors, since they need them."""
    s = np.asarray(softmax, np.float64)
    if s.ndim == 1:
        s = s[None]
    n, num_classes = s.shape
    _check_topk_options(num_classes, k, m, p)
    ke = min(k, num_classes)
    ib, qb = _topk_bits(num_classes)
    qmax = (1 << qb) - 1
    order = np.argsort(-s, axis=-1, kind="stable")[:, :ke]  # descending, ties -> lower index
    top = np.take_along_axis(s, order, -1)
    q = np.clip(np.rint(np.clip(top, 0.0, 1.0) * qmax), 0, qmax).astype(np.uint32)
    words = (order.astype(np.uint32) << qb) | q
    entries = np.stack([(words >> 16) & 0xFF, (words >> 8) & 0xFF, words & 0xFF], -1).astype(np.uint8)
    residual = np.clip(s.sum(-1) - top.sum(-1), 0.0, None)
    w_e, w_d = entropy_weights(s), diversity_weights(s, m, p)
    head = _HEADER.pack(ENCODING_TOPK, num_classes)
    return [head + _TOPK.pack(ke, m, p, w_e[i], w_d[i], residual[i]) + entries[i].tobytes()
            for i in range(n)]


def encode(softmax: np.ndarray, encoding: str = "float16", k: int = TOPK_DEFAULT_K, m: int = 20,
           p: float = 3.0) -> bytes:
    """One store value. ``float16``: the whole vector (3 + 2C bytes, version 1). ``topk``: the k
    largest probabilities, the residual mass and the precomputed CBW-E / CBW-D(m, p) weights
    (13 + 3k bytes, version 2). ``k``, ``m`` and ``p`` only apply to ``topk``."""
    if encoding == "float16":
        return encode_float16(softmax)
    if encoding == "topk":
        s = np.asarray(softmax)
        if s.ndim != 1:
            raise ValueError(f"encode takes one softmax vector, got shape {s.shape}; "
                             "use encode_many for a batch")
        return encode_topk_many(s, k, m, p)[0]
    raise ValueError(f"unknown softmax encoding {encoding!r}; use one of {ENCODINGS}")


def encode_many(softmax: np.ndarray, encoding: str = "float16", **options) -> list[bytes]:
    """Values of a batch [n, C] of softmax vectors."""
    if encoding == "float16":
        if options:
            raise ValueError(f"float16 encoding takes no options, got {sorted(options)}")
        return [encode_float16(s) for s in np.asarray(softmax)]
    if encoding == "topk":
        return encode_topk_many(softmax, **options)
    raise ValueError(f"unknown softmax encoding {encoding!r}; use one of {ENCODINGS}")


def _unknown_version(version: int) -> ValueError:
    return ValueError(f"unknown softmax encoding version {version}; upgrade knn-defense")


def _decode_topk(value: bytes, num_classes: int) -> tuple[np.ndarray, int, float, float, float]:
    """(dense vector, m, p, w_e, w_d) of a version-2 value."""
    start = _HEADER.size + _TOPK.size
    if len(value) < start:
        raise ValueError(f"truncated topk softmax value ({len(value)} bytes)")
    ke, m, p, w_e, w_d, residual = _TOPK.unpack_from(value, _HEADER.size)
    if len(value) != start + 3 * ke or ke > num_classes:
        raise ValueError(f"corrupt topk softmax value: {len(value)} bytes for k={ke}, "
                         f"{num_classes} classes")
    ib, qb = _topk_bits(num_classes)
    b = np.frombuffer(value, np.uint8, offset=start).reshape(ke, 3).astype(np.uint32)
    words = (b[:, 0] << 16) | (b[:, 1] << 8) | b[:, 2]
    idx, q = words >> qb, words & ((1 << qb) - 1)
    if ke and idx.max() >= num_classes:
        raise ValueError(f"corrupt topk softmax value: class {idx.max()} >= {num_classes}")
    rest = num_classes - ke
    out = np.full(num_classes, residual / rest if rest else 0.0, np.float32)
    out[idx] = q / float((1 << qb) - 1)
    return out, m, p, w_e, w_d


def decode(value: bytes) -> np.ndarray:
    """Dense float32 softmax of a value of any known version (topk: the residual mass is spread
    uniformly over the classes outside the top k)."""
    version, num_classes = _HEADER.unpack_from(value)
    if version == ENCODING_FLOAT16:
        return np.frombuffer(value, dtype="<f2", offset=_HEADER.size, count=num_classes).astype(np.float32)
    if version == ENCODING_TOPK:
        return _decode_topk(value, num_classes)[0]
    raise _unknown_version(version)


def value_version(value: bytes) -> int:
    return _HEADER.unpack_from(value)[0]


def decode_with_weights(value: bytes, m: int = 20, p: float = 3.0
                        ) -> tuple[np.ndarray, float, float]:
    """(dense vector, CBW-E weight, CBW-D weight). topk values carry weights computed from the
    full vector; asking for a CBW-D (m, p) other than the stored one raises ValueError. float16
    values have the whole vector, so their weights are computed here for any (m, p)."""
    version, num_classes = _HEADER.unpack_from(value)
    if version == ENCODING_FLOAT16:
        s = decode(value)
        return s, float(entropy_weights(s)), float(diversity_weights(s, m, p))
    if version == ENCODING_TOPK:
        s, m_stored, p_stored, w_e, w_d = _decode_topk(value, num_classes)
        cap = num_classes - 1
        if min(m, cap) != min(m_stored, cap) or float(p) != p_stored:
            raise ValueError(f"softmax store holds CBW-D weights for m={m_stored}, p={p_stored}; "
                             f"asked for m={m}, p={p}: rebuild the store with these values or "
                             "use evaluate.cbw_d m/p matching the store")
        return s, float(w_e), float(w_d)
    raise _unknown_version(version)


def partition_dir(store_dir: str | os.PathLike, p: int) -> Path:
    return Path(store_dir) / f"part-{p:03d}"


def write_partition(store_dir: str | os.PathLike, partition_index: int, rows,
                    encoding: str = "float16", **encoding_options) -> int:
    """Write one partition from an iterable of (ids [n], softmax [n, C]) chunks; returns count.
    Values use ``encoding`` (float16 | topk, options k, m, p as :func:`encode`).
    Written into ``part-PPP.tmp`` and renamed, so a crash leaves no half-written partition."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown softmax encoding {encoding!r}; use one of {ENCODINGS}")
    final = partition_dir(store_dir, partition_index)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    db = plyvel.DB(str(tmp), create_if_missing=True, error_if_exists=True)
    try:
        for ids, softmax in rows:
            with db.write_batch(sync=False) as wb:
                values = encode_many(softmax, encoding, **encoding_options)
                for i, v in zip(np.asarray(ids).tolist(), values, strict=True):
                    wb.put(id_key(i), v)
            count += len(ids)
    finally:
        db.close()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return count


class StoreLocked(RuntimeError):
    pass


class SoftmaxStore:
    """Read side: opens every partition of a store in this process, or only ``only`` (a
    co-located server owns one partition). The owning process may read from many threads."""

    def __init__(self, store_dir: str | os.PathLike, num_partitions: int,
                 only: list[int] | None = None):
        self.store_dir = Path(store_dir)
        self.num_partitions = num_partitions
        self._dbs: dict[int, plyvel.DB] = {}
        for p in range(num_partitions) if only is None else only:
            path = partition_dir(store_dir, p)
            if not path.is_dir():
                self.close()
                raise FileNotFoundError(f"{path}: store partition missing; run the store stage")
            try:
                self._dbs[p] = plyvel.DB(str(path), create_if_missing=False)
            except plyvel.IOError as err:
                self.close()
                if "lock" in str(err).lower():
                    raise StoreLocked(
                        f"{path}: already open (LevelDB allows one opener per partition: another "
                        "process, or another SoftmaxStore in this one); query through its owner, "
                        "e.g. the `knn-defense serve` service or a co-located Ray actor") from None
                raise

    @property
    def loaded(self) -> bool:
        return bool(self._dbs)

    def get_many(self, ids: np.ndarray, with_weights: bool = False, m: int = 20, p: float = 3.0):
        """Softmax vectors for an id array of any shape -> (values [..., C], found mask [...]),
        plus, with ``with_weights``, weights [..., 2] = (CBW-E, CBW-D(m, p)): stored ones for
        topk values (ValueError when stored for another (m, p)), computed from the vector for
        float16 values. Id -1 (FAISS's "no result") gives a zero vector, zero weights and
        found=False; an id absent from a store is a broken database and raises KeyError."""
        # Neighbour lists of a batch overlap a lot (popular database images): read each id once.
        flat, inverse = np.unique(np.asarray(ids, np.int64).reshape(-1), return_inverse=True)
        parts = partition(np.where(flat == NO_RESULT, 0, flat), self.num_partitions)
        rows, weights, found = [], [], flat != NO_RESULT
        for i, part, ok in zip(flat.tolist(), parts.tolist(), found.tolist(), strict=True):
            if not ok:
                rows.append(None)
                weights.append((0.0, 0.0))
                continue
            db = self._dbs.get(part)
            if db is None:
                raise KeyError(f"id {i} is in partition {part}, not open in this process")
            value = db.get(id_key(i))
            if value is None:
                raise KeyError(f"id {i} not in softmax store {self.store_dir} (partition {part})")
            if with_weights:
                s, w_e, w_d = decode_with_weights(value, m, p)
                rows.append(s)
                weights.append((w_e, w_d))
            else:
                rows.append(decode(value))
        num_classes = next((len(r) for r in rows if r is not None), 0)
        out = np.zeros((len(rows), num_classes), np.float32)
        for j, r in enumerate(rows):
            if r is not None:
                if len(r) != num_classes:
                    raise ValueError(f"softmax store {self.store_dir} mixes class counts "
                                     f"({len(r)} and {num_classes})")
                out[j] = r
        shape = np.shape(ids)
        result = (out[inverse].reshape(*shape, num_classes), found[inverse].reshape(shape))
        if with_weights:
            result += (np.asarray(weights, np.float64).reshape(-1, 2)[inverse].reshape(*shape, 2),)
        return result

    def delete_many(self, ids: np.ndarray) -> int:
        """Delete ids through this process's open partitions (the owner of a served store
        applies removals itself); absent ids are no-ops. Returns how many were there."""
        ids = np.asarray(ids, np.int64)
        parts = partition(ids, self.num_partitions)
        return sum(_delete_from(db, ids[parts == p]) for p, db in self._dbs.items())

    def iter_ids(self):
        for db in self._dbs.values():
            for key in db.iterator(include_value=False):
                yield struct.unpack(">q", key)[0]

    def iter_id_chunks(self, partition_index: int, chunk: int = 1 << 16,
                       lo: int | None = None, hi: int | None = None):
        """The ids of one open partition in ascending order (keys are big-endian, ids >= 0), as
        int64 arrays of at most ``chunk``; only ids in [lo, hi) when given (a range scan: e.g.
        one input shard's ids, ``shard << 24`` up to ``shard + 1 << 24``)."""
        db = self._dbs[partition_index]
        keys = db.iterator(include_value=False, start=None if lo is None else id_key(lo),
                           stop=None if hi is None else id_key(hi))
        buf: list[bytes] = []
        for key in keys:
            buf.append(key)
            if len(buf) >= chunk:
                yield np.frombuffer(b"".join(buf), ">i8").astype(np.int64)
                buf = []
        if buf:
            yield np.frombuffer(b"".join(buf), ">i8").astype(np.int64)

    def close(self) -> None:
        for db in self._dbs.values():
            db.close()
        self._dbs = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_unheld(path: Path) -> plyvel.DB:
    """A partition for writing; StoreLocked while another process (or opener) holds it."""
    try:
        return plyvel.DB(str(path), create_if_missing=False)
    except plyvel.IOError as err:
        if "lock" in str(err).lower():
            raise StoreLocked(f"{path}: held by another process (a running `knn-defense serve`?): "
                              "stop it and run the same command again to finish") from None
        raise


def delete_ids(store_dir: str | os.PathLike, partition_index: int, ids: np.ndarray) -> int:
    """Delete ``ids`` from one partition (absent ids are no-ops, so a repeat does nothing);
    returns how many were there. Refuses with StoreLocked while another process holds it."""
    db = _open_unheld(partition_dir(store_dir, partition_index))
    try:
        return _delete_from(db, ids)
    finally:
        db.close()


def _delete_from(db: plyvel.DB, ids) -> int:
    """Delete the ids one open partition holds (one synced batch); how many it held."""
    present = 0
    with db.write_batch(sync=True) as wb:
        for i in np.asarray(ids, np.int64).tolist():
            if db.get(id_key(i)) is not None:
                present += 1
                wb.delete(id_key(i))
    return present


def copy_partition(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                   partition_index: int) -> int:
    """Copy every entry of one partition into the same partition of another store (puts are
    idempotent, so a repeat after a crash writes the same values); returns the count."""
    src = _open_unheld(partition_dir(src_dir, partition_index))
    try:
        dst = _open_unheld(partition_dir(dst_dir, partition_index))
    except BaseException:
        src.close()
        raise
    try:
        count = 0
        with dst.write_batch(sync=True) as wb:
            for key, value in src.iterator():
                wb.put(key, value)
                count += 1
        return count
    finally:
        src.close()
        dst.close()


class StoreSet:
    """Several stores read as one (a living database: the base store and one per added
    generation): an id is looked up in the store of its shard's generation."""

    def __init__(self, base: SoftmaxStore, generations: list[tuple[SoftmaxStore, list[int]]]):
        self.base, self.generations = base, generations
        self.num_partitions = base.num_partitions
        self.store_dir = base.store_dir

    @property
    def loaded(self) -> bool:
        return self.base.loaded and all(s.loaded for s, _ in self.generations)

    def get_many(self, ids: np.ndarray, with_weights: bool = False, m: int = 20, p: float = 3.0):
        """As :meth:`SoftmaxStore.get_many`; each store reads only the ids it owns."""
        ids = np.asarray(ids, np.int64)
        shards, _ = split_ids(ids)
        owner = np.zeros(ids.shape, np.int64)  # 0: the base store, g: generation g's
        for g, (_, shard_indexes) in enumerate(self.generations, 1):
            owner[np.isin(shards, shard_indexes)] = g
        stores = [self.base] + [store for store, _ in self.generations]
        parts = [store.get_many(np.where((owner == g) & (ids != NO_RESULT), ids, NO_RESULT),
                                with_weights, m, p)
                 for g, store in enumerate(stores) if ((owner == g) & (ids != NO_RESULT)).any()]
        if not parts:  # nothing but "no result"
            return self.base.get_many(ids, with_weights, m, p)
        # each id's values come from its one owner; the others gave zeros and found=False
        return tuple(np.logical_or.reduce([q[j] for q in parts]) if j == 1 else sum(q[j] for q in parts)
                     for j in range(len(parts[0])))

    def delete_many(self, ids: np.ndarray) -> int:
        return sum(store.delete_many(ids) for store in [self.base] + [s for s, _ in self.generations])

    def close(self) -> None:
        self.base.close()
        for store, _ in self.generations:
            store.close()
