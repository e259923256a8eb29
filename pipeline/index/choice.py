"""Index choice from the number of vectors, their dimension and a memory budget (in the spirit
of autofaiss and the FAISS guidelines), and nprobe tuning to a target recall.

Candidates, best quality first; the first whose estimated memory fits the budget wins:
  N < 100k            Flat (exact)
  otherwise           IVF{nlist}_HNSW32,Flat  -> IVF{nlist}_HNSW32,SQ8  -> OPQ{m},IVF{nlist}_HNSW32,PQ{m}
                      (m = d/2, d/4, ... bytes per vector), nlist ~ 8 sqrt(N) rounded to a power
                      of two, between 2^8 and 2^20 (at least ~30 training points per list).
Binary codes: BFlat below 1M vectors, else BIVF{nlist}.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

ID_BYTES = 8
HNSW_M = 32
TRAIN_PER_LIST = 64  # k-means wants 30-256 points per centroid


@dataclass
class IndexChoice:
    factory: str
    nlist: int
    bytes_per_vector: float  # codes + ids + inverted-list overhead, amortised
    memory_bytes: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)

    def train_size(self, at_least: int) -> int:
        """Training vectors: ``at_least``, raised to TRAIN_PER_LIST per inverted list."""
        return max(at_least, TRAIN_PER_LIST * self.nlist)


def choose_nlist(n: int) -> int:
    """A power of two near 8 sqrt(N), in [2^8, 2^20], with at least ~30 points per list."""
    nlist = 2 ** round(math.log2(8 * math.sqrt(max(n, 1))))
    cap = 2 ** math.floor(math.log2(max(n // 30, 256)))
    return int(min(max(nlist, 256), cap, 1 << 20))


def _coarse_bytes(nlist: int, dim: int) -> int:
    return nlist * dim * 4 + nlist * HNSW_M * 2 * 4  # centroids + their HNSW graph


def choose_index(n: int, dim: int, memory_budget_bytes: int, binary: bool = False) -> IndexChoice:
    """The best index family for ``n`` vectors of ``dim`` dims (bits, for binary codes) that fits
    ``memory_budget_bytes``; raises ValueError when nothing fits."""
    if binary:
        if n < 1_000_000:
            per = dim / 8 + ID_BYTES
            return IndexChoice("BFlat", 0, per, int(n * per), "binary codes, exact Hamming search")
        nlist = choose_nlist(n)
        per = dim / 8 + ID_BYTES
        return IndexChoice(f"BIVF{nlist}", nlist, per, int(n * per + nlist * dim / 8),
                           "binary codes, inverted lists over Hamming centroids")
    candidates = []
    if n < 100_000:
        candidates.append(("Flat", 0, dim * 4 + ID_BYTES, "small N: exact search is cheap"))
    nlist = choose_nlist(n)
    coarse = f"IVF{nlist}_HNSW{HNSW_M}"
    candidates.append((f"{coarse},Flat", nlist, dim * 4 + ID_BYTES, "full vectors in IVF lists"))
    candidates.append((f"{coarse},SQ8", nlist, dim + ID_BYTES, "8-bit scalar codes"))
    m = dim // 2
    while m >= 4:
        if dim % m == 0:
            candidates.append((f"OPQ{m},{coarse},PQ{m}", nlist, m + ID_BYTES,
                               f"OPQ-rotated product quantiser, {m} bytes per vector"))
        m //= 2
    for factory, nl, per, reason in candidates:
        memory = int(n * per + (_coarse_bytes(nl, dim) if nl else 0))
        if memory <= memory_budget_bytes:
            return IndexChoice(factory, nl, per, memory, reason)
    smallest = candidates[-1]
    need = int(n * smallest[2] + _coarse_bytes(smallest[1], dim))
    raise ValueError(f"no index for {n} x {dim} fits {memory_budget_bytes / 2**30:.2f} GiB (the "
                     f"smallest, {smallest[0]}, needs {need / 2**30:.2f} GiB): raise the budget "
                     "or shard the index")


# index.merge: auto merges on disk (the lists in a memory-mapped .ivfdata file, never all in
# one task's RAM) once one merge output would hold this many vectors: N, or N / partitions with
# index.layout: sharded (then each task merges one partition's shards). 5M vectors are ~5 GiB of
# 256-d float lists, ~1.3 GiB as SQ8.
ONDISK_MIN_VECTORS = 5_000_000


def choose_merge(merge: str, n: int, factory: str, layout: str = "merged",
                 partitions: int = 1) -> str:
    """``memory`` or ``ondisk`` for ``index.merge`` (``auto``: on disk once one merge output
    holds ONDISK_MIN_VECTORS vectors, for float IVF factories; binary and exact indexes have no
    on-disk lists and stay in memory). An explicit ``memory`` / ``ondisk`` is kept as it is."""
    if merge != "auto":
        return merge
    if factory.startswith("B") or "IVF" not in factory:
        return "memory"
    per_output = n / max(1, partitions) if layout == "sharded" else n
    return "ondisk" if per_output >= ONDISK_MIN_VECTORS else "memory"


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true k nearest ids that were found."""
    k = truth.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k
                          for a, b in zip(found, truth, strict=True)]))


def tune_nprobe(index, queries: np.ndarray, truth: np.ndarray, k: int, target: float = 0.95
                ) -> tuple[int | None, float, list[dict]]:
    """Smallest power-of-two nprobe whose recall@k reaches ``target`` (None for non-IVF), its
    recall, and the whole curve. For HNSW coarse quantisers efSearch follows nprobe
    (:func:`pipeline.index.faiss_index.set_nprobe`, as when the index is searched later)."""
    from pipeline.index.faiss_index import _has_ivf, _ivf, search

    if not _has_ivf(index):
        _, ids = search(index, queries, k)
        r = recall_at_k(ids, truth)
        return None, r, [{"nprobe": None, "recall": r}]
    ivf = _ivf(index)
    curve, best = [], None
    nprobe = 1
    while nprobe <= ivf.nlist:
        _, ids = search(index, queries, k, nprobe)
        r = recall_at_k(ids, truth)
        curve.append({"nprobe": nprobe, "recall": r})
        if r >= target:
            best = nprobe
            break
        nprobe *= 2
    return best, curve[-1]["recall"], curve
