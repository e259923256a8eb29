"""FAISS index per layer: train once on a sample, populate one part per feature shard, merge.

Parts are empty copies of the trained index filled with one shard's vectors and their
invertible ids (pipeline.ids), so populating is embarrassingly parallel and retryable. Merging
concatenates the parts' inverted lists in memory, or into one on-disk ``.ivfdata`` file
(faiss.contrib.ondisk) that is memory-mapped at search time, for indexes larger than RAM.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path

import faiss
import numpy as np

from pipeline.devices import current_device
from pipeline.ids import split_ids


class IndexInputError(ValueError):
    """Vectors or ids an index step cannot take; one line naming the file and what to do."""


def num_gpus() -> int:
    """GPUs FAISS can use here (0 with faiss-cpu, or faiss-gpu on a machine without GPUs)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def is_binary_factory(factory: str) -> bool:
    """Binary (Hamming) index factories start with B: BFlat, BIVF<nlist>, BHNSW<m>."""
    return factory.startswith("B")


def new_index(dim: int, factory: str):
    """An index from a factory string (``dim`` in bits for binary ones); indexes without
    inverted lists get an id map so they keep our ids. IVF ones (also behind an OPQ/PCA
    pre-transform) store the ids in their lists: an id map there would hide them from merges."""
    if is_binary_factory(factory):
        index = faiss.index_binary_factory(dim, factory)
        return index if isinstance(index, faiss.IndexBinaryIVF) else faiss.IndexBinaryIDMap2(index)
    index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    if not _has_ivf(index) and not isinstance(index, faiss.IndexIDMap):
        index = faiss.IndexIDMap2(index)
    return index


def _as_vectors(vectors: np.ndarray, binary: bool) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.uint8 if binary else np.float32)


def train_index(vectors: np.ndarray, factory: str, seed: int = 0):
    """Train (k-means for IVF, codebooks for PQ/SQ) on a sample; IVF k-means runs on this
    work's GPU when it has one (:func:`kmeans_gpu`). Binary factories take packed uint8 codes
    [N, bits / 8]."""
    binary = is_binary_factory(factory)
    vectors = _as_vectors(vectors, binary)
    index = new_index(vectors.shape[1] * (8 if binary else 1), factory)
    if binary:
        if isinstance(index, faiss.IndexBinaryIVF) and len(vectors) < index.nlist:
            raise ValueError(f"index factory {factory!r} needs at least {index.nlist} training "
                             f"vectors, got {len(vectors)}: lower nlist or raise index.train_sample")
        if not index.is_trained:
            index.train(vectors)
        return index
    ivf = faiss.extract_index_ivf(index) if _has_ivf(index) else None
    if ivf is not None:
        nlist = ivf.nlist
        if len(vectors) < nlist:
            raise ValueError(f"index factory {factory!r} needs at least {nlist} training vectors, "
                             f"got {len(vectors)}: lower nlist or raise index.train_sample")
        ivf.cp.seed = seed
        gpu = kmeans_gpu()
        if gpu is not None and not index.is_trained:  # the index itself stays a CPU index
            with _gpu_flat(gpu) as make_flat, clustering_with(ivf, make_flat):
                index.train(vectors)
    if not index.is_trained:
        index.train(vectors)
    return index


def kmeans_gpu() -> int | None:
    """The GPU ordinal IVF k-means runs on: the one this work was given (pipeline.devices:
    under Ray the task's assigned GPU, ordinal 0 of the visible ones), when FAISS has GPU
    support and sees a GPU; None: on the CPU, also when a GPU is visible but not assigned."""
    if num_gpus() == 0:  # faiss-cpu: decided without asking torch
        return None
    device = current_device()
    if not device.startswith("cuda"):
        return None
    return int(device.partition(":")[2] or 0)


def clustering_index_for(ivf, make_flat):
    """The flat index the IVF's k-means assigns vectors with, ``make_flat(d, metric)``: in the
    IVF's own dimension ``ivf.d`` (behind a PCA/OPQ pre-transform it trains on the transform's
    output, not on the data's width) and with its metric (inner product or L2)."""
    return make_flat(ivf.d, ivf.metric_type)


@contextlib.contextmanager
def clustering_with(ivf, make_flat):
    """``ivf.clustering_index`` set to :func:`clustering_index_for` while the block trains, then
    reset to None: the IVF does not own it, so it must not keep a pointer to it once freed."""
    index = clustering_index_for(ivf, make_flat)
    ivf.clustering_index = index
    try:
        yield index
    finally:
        ivf.clustering_index = None


@contextlib.contextmanager
def _gpu_flat(device: int):
    """``make_flat(d, metric)`` building flat indexes on GPU ``device`` only; on exit the
    indexes it made and their GPU resources (memory, streams, cuBLAS handle) are freed."""
    resources = faiss.StandardGpuResources()
    made = []

    def make_flat(d: int, metric: int):
        made.append(faiss.index_cpu_to_gpu(resources, device, faiss.IndexFlat(d, metric)))
        return made[-1]

    try:
        yield make_flat
    finally:
        made.clear()  # the GPU indexes go before the resources they were made with
        resources = None


def _has_ivf(index) -> bool:
    if isinstance(index, faiss.IndexBinary):
        return isinstance(index, faiss.IndexBinaryIVF)
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def _ivf(index):
    return index if isinstance(index, faiss.IndexBinaryIVF) else faiss.extract_index_ivf(index)


def write_index(index, path: str | os.PathLike) -> None:
    """Atomic write (temp name + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(index, faiss.IndexBinary):
        faiss.write_index_binary(index, str(tmp))
    else:
        faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def read_index(path: str | os.PathLike, io_flags: int = 0):
    """A float or binary index file (``io_flags``: FAISS IO_FLAG_*, float indexes only)."""
    try:
        return faiss.read_index(str(path), io_flags)
    except RuntimeError:
        return faiss.read_index_binary(str(path))


def _describe_id(i: int) -> str:
    shard, row = split_ids(np.int64(i))
    return f"id {i} = shard {int(shard)} row {int(row)}"


def populate_part(trained_path: str | os.PathLike, vectors: np.ndarray, ids: np.ndarray,
                  out_path: str | os.PathLike, source: str = "vectors") -> int:
    """Add one shard's vectors with their ids to an empty copy of the trained index. An empty
    shard (every image corrupt, or none in the subset) gives an empty part. ``source`` names
    the vectors' file in errors."""
    index = read_index(trained_path)
    if index.ntotal:
        raise IndexInputError(f"{trained_path}: trained index is not empty ({index.ntotal} "
                              "vectors): re-run the index train step")
    binary = isinstance(index, faiss.IndexBinary)
    vectors = _as_vectors(vectors, binary)
    ids = np.ascontiguousarray(ids, np.int64)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise IndexInputError(f"{source}: expected [N, d] vectors and N ids, got {vectors.shape} "
                              f"and {ids.shape}")
    width = vectors.shape[1] * (8 if binary else 1)
    if width != index.d:
        raise IndexInputError(
            f"{source}: {width}-{'bit' if binary else 'd'} vectors but {trained_path} was trained "
            f"on {index.d}: the features changed since the index was trained; re-run the index "
            "train step (knn-defense index train JOB) or re-extract this shard")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise IndexInputError(f"{source}: {int((counts > 1).sum())} ids repeat (e.g. "
                              f"{_describe_id(unique[counts > 1][0])}): re-extract this shard")
    index.add_with_ids(vectors, ids)
    write_index(index, out_path)
    return index.ntotal


def check_disjoint_ids(part_paths: list) -> None:
    """Raise IndexInputError when two parts hold the same id. Parts whose [min, max] id ranges
    do not overlap cannot share one (with shard-derived ids that is every pair), so only
    overlapping pairs are compared id by id; memory stays at two parts' ids."""
    ranges = []
    for path in part_paths:
        ids = _part_ids(path)
        if len(ids):
            ranges.append((int(ids.min()), int(ids.max()), str(path)))
    ranges.sort()
    for j, (_, hi, path) in enumerate(ranges):
        for lo2, _, path2 in ranges[j + 1:]:
            if lo2 > hi:
                break
            shared = np.intersect1d(_part_ids(path), _part_ids(path2))
            if len(shared):
                raise IndexInputError(
                    f"index parts {path} and {path2} share {len(shared)} ids (e.g. "
                    f"{_describe_id(shared[0])}): a feature shard holds another shard's ids; "
                    "re-extract the wrong shard and re-run the index populate step")


def _part_ids(path) -> np.ndarray:
    return all_ids(read_index(path, faiss.IO_FLAG_MMAP))  # mapped: only the ids are read


def ivfdata_path(index_path: str | os.PathLike) -> Path:
    """Where an on-disk merged index keeps its inverted lists: beside the index file."""
    return Path(index_path).with_suffix(".ivfdata")


def merge_parts(trained_path: str | os.PathLike, part_paths: list, out_path: str | os.PathLike,
                ondisk: bool = False) -> int:
    """Merge populated parts into one index after checking that no id is in two parts. In
    memory: IVF inverted lists are concatenated (flat parts re-added). ``ondisk``: the lists go
    into ``<out>.ivfdata`` (faiss ``merge_ondisk``), so the merge never holds them in RAM."""
    check_disjoint_ids(part_paths)
    if ondisk:
        return _merge_ondisk(trained_path, part_paths, out_path)
    merged = read_index(trained_path)
    for path in part_paths:
        part = read_index(path)
        if isinstance(part, faiss.IndexBinaryIDMap2):  # FAISS has no merge for these: re-add
            codes = faiss.vector_to_array(faiss.downcast_IndexBinary(part.index).xb)
            merged.add_with_ids(codes.reshape(part.ntotal, -1),
                                faiss.vector_to_array(part.id_map).astype(np.int64))
        else:
            merged.merge_from(part, 0)
    write_index(merged, out_path)
    ivfdata_path(out_path).unlink(missing_ok=True)  # left by an earlier on-disk merge
    return merged.ntotal


def _merge_ondisk(trained_path, part_paths: list, out_path) -> int:
    from faiss.contrib.ondisk import merge_ondisk

    merged = read_index(trained_path)
    if isinstance(merged, faiss.IndexBinary) or not _has_ivf(merged):
        raise IndexInputError(f"{trained_path}: on-disk merging needs a float IVF index: set "
                              "index.merge: memory or an IVF index.factory")
    out_path, data = Path(out_path), ivfdata_path(out_path)
    tmp_data = data.with_name(data.name + ".tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_data.unlink(missing_ok=True)  # left by a killed attempt
    merge_ondisk(merged, [str(p) for p in part_paths], str(tmp_data))
    # Record the final name; load_index reads it from the index file's own folder
    # (IO_FLAG_ONDISK_SAME_DIR), so the job folder can move. The index file goes last: it is
    # the completion marker (re-merging under a searcher that opens the index between the two
    # renames would pair old offsets with new lists: re-merge while nothing serves).
    faiss.downcast_InvertedLists(_ivf(merged).invlists).filename = str(data.resolve())
    tmp_index = out_path.with_name(out_path.name + ".tmp")
    faiss.write_index(merged, str(tmp_index))
    os.replace(tmp_data, data)
    os.replace(tmp_index, out_path)
    return merged.ntotal


class ShardedIndex:
    """Several index shards searched as one: FAISS IndexShards sends each query to every shard
    (in threads) and merges the top-k; our ids are kept, not renumbered."""

    def __init__(self, members: list):
        self.members = list(members)  # FAISS does not own the shards: keep them alive here
        self.binary = isinstance(members[0], faiss.IndexBinary)
        cls = faiss.IndexBinaryShards if self.binary else faiss.IndexShards
        self.combined = cls(members[0].d, True, False)  # threaded, successive_ids=False
        for index in self.members:
            self.combined.add_shard(index)

    @property
    def ntotal(self) -> int:
        return sum(m.ntotal for m in self.members)

    @property
    def d(self) -> int:
        return self.members[0].d


def shard_set(indexes: list) -> ShardedIndex | object:
    return indexes[0] if len(indexes) == 1 else ShardedIndex(indexes)


def _members(index) -> list:
    return index.members if isinstance(index, ShardedIndex) else [index]


def _is_binary(index) -> bool:
    return index.binary if isinstance(index, ShardedIndex) else isinstance(index, faiss.IndexBinary)


@contextlib.contextmanager
def _c_stdout_to_stderr():
    """FAISS notes where it finds on-disk lists with a C printf on stdout, which carries the
    CLI's results: send C-level stdout to stderr meanwhile (flushing C buffers both ways)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def load_index(path: str | os.PathLike, nprobe: int | None = None) -> faiss.Index:
    """An index for searching; on-disk inverted lists are mapped read-only from the index
    file's folder (so a job folder can move)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: index not found; run the index stage")
    with _c_stdout_to_stderr():
        index = read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    set_nprobe(index, nprobe)
    return index


def set_nprobe(index, nprobe: int | None) -> None:
    """IVF lists searched per query; an HNSW coarse quantiser searches with efSearch =
    max(2 nprobe, 16), so its nprobe nearest lists are found (the setting tuning measured)."""
    if nprobe is None:
        return
    for member in _members(index):
        if _has_ivf(member):
            ivf = _ivf(member)
            ivf.nprobe = nprobe
            if not isinstance(member, faiss.IndexBinary):
                quantizer = faiss.downcast_index(ivf.quantizer)
                if isinstance(quantizer, faiss.IndexHNSW):
                    quantizer.hnsw.efSearch = max(2 * nprobe, 16)


def search(index, queries: np.ndarray, k: int, nprobe: int | None = None,
           exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distances [N, k], ids [N, k]): squared L2, or Hamming for binary indexes over packed
    uint8 codes; id -1 where fewer than k results exist. ``exclude``: ids no result may be
    (tombstones of removed images in read-only on-disk lists; float indexes only, the binary
    ones remove ids for real), filtered inside the scan, so k results still come back."""
    set_nprobe(index, nprobe)
    target = index.combined if isinstance(index, ShardedIndex) else index
    vectors = _as_vectors(queries, _is_binary(index))
    if exclude is None or not len(exclude):
        return target.search(vectors, k)
    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(exclude, np.int64)))
    member = _members(index)[0]
    params = (faiss.SearchParametersIVF(sel=selector, nprobe=_ivf(member).nprobe)
              if _has_ivf(member) else faiss.SearchParameters(sel=selector))
    return target.search(vectors, k, params=params)


def remove_ids_from_file(path: str | os.PathLike, ids: np.ndarray) -> int:
    """Remove ``ids`` from an index file whose lists live in it (not on disk): batched, one pass
    over the lists for the whole batch (a call per id would pass over them every time), then
    the file rewritten under a temp name and renamed. Absent ids are no-ops; returns how many
    were removed."""
    index = read_index(path)
    removed = int(index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64))))
    if removed:
        write_index(index, path)
    return removed


def has_ondisk_lists(path: str | os.PathLike) -> bool:
    """Whether an index file's inverted lists are read-only on disk (merge: ondisk)."""
    return ivfdata_path(path).is_file()


def all_ids(index) -> np.ndarray:
    """Every id stored in the index (for verification), in no particular order."""
    if isinstance(index, ShardedIndex):
        return np.concatenate([all_ids(m) for m in index.members])
    if _has_ivf(index):
        ivf = _ivf(index)
        invlists = ivf.invlists
        out = []
        for lst in range(ivf.nlist):
            n = invlists.list_size(lst)
            if n:
                out.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy())
        return np.concatenate(out) if out else np.zeros(0, np.int64)
    if isinstance(index, faiss.IndexBinary):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def iter_id_chunks(path: str | os.PathLike, chunk: int = 1 << 16):
    """The ids stored in an index file, in chunks of at most ``chunk``, one inverted list at a
    time: the file is memory-mapped (an on-disk merged index's lists are mapped from its
    ``.ivfdata``), so a whole index is never loaded into the process, whatever its size. Flat
    indexes (an id map, no lists; chosen only for small N) are read whole."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: index not found; run the index stage")
    # on-disk lists: mapped from the .ivfdata beside; in-file lists: the file itself mapped
    # (IO_FLAG_MMAP would skip an on-disk index's lists: reading them then crashes)
    flags = (faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
             if ivfdata_path(path).is_file() else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    with _c_stdout_to_stderr():
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError:
            index = faiss.read_index_binary(str(path), flags)
    if not _has_ivf(index):
        ids = all_ids(index)
        for s in range(0, len(ids), chunk):
            yield ids[s:s + chunk]
        return
    invlists = _ivf(index).invlists
    for lst in range(_ivf(index).nlist):
        n = invlists.list_size(lst)
        if n:
            # a view of the mapped list (no copy); consumers take what they need chunk by chunk
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), n)
            for s in range(0, n, chunk):
                yield ids[s:s + chunk]
