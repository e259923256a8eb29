"""Where a query's neighbours come from: a local index + store (``LocalSearcher``), or any
searcher with the same ``neighbours`` / ``close`` methods handed to the classifier, such as the
co-located partition actors that runtime builds (pipeline/runtime/colocated.py: one actor per
index shard and its store partition, answers joined by ``merge_topk``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.index.faiss_index import search


@dataclass
class Neighbours:
    distances: np.ndarray  # [N, K] squared L2 (Hamming for binary codes)
    ids: np.ndarray  # [N, K] int64, -1 = no result
    softmax: np.ndarray  # [N, K, C]
    found: np.ndarray  # [N, K] bool
    weights: np.ndarray | None = None  # [N, K, 2] stored (CBW-E, CBW-D) weights, topk stores

    FIELDS = ("distances", "ids", "softmax", "found", "weights")

    def arrays(self) -> tuple:
        return tuple(getattr(self, f) for f in self.FIELDS)


def concat(parts: list[Neighbours]) -> Neighbours:
    """Stack batches (along the query axis)."""
    return Neighbours(*(None if getattr(parts[0], f) is None else
                        np.concatenate([getattr(p, f) for p in parts]) for f in Neighbours.FIELDS))


def merge_topk(parts: list[Neighbours], k: int) -> Neighbours:
    """The k nearest over several shards' answers for the same queries (along the K axis)."""
    joined = [None if getattr(parts[0], f) is None else
              np.concatenate([getattr(p, f) for p in parts], axis=1) for f in Neighbours.FIELDS]
    dist = joined[0].astype(np.float64)
    dist[joined[1] == -1] = np.inf  # "no result" goes last whatever the distance type
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    out = []
    for a in joined:
        if a is None:
            out.append(None)
        else:
            idx = order.reshape(order.shape + (1,) * (a.ndim - 2))
            out.append(np.take_along_axis(a, idx, axis=1))
    return Neighbours(*out)


class LocalSearcher:
    """Indexes and the store opened in this process; ``exclude``: removed ids that read-only
    on-disk lists still hold (tombstones), skipped inside the search."""

    def __init__(self, indexes: dict, store, nprobe: int | None = None, stored_weights: bool = False,
                 m: int = 20, p: float = 3.0, exclude: np.ndarray | None = None):
        self.indexes, self.store, self.nprobe = indexes, store, nprobe
        self.stored_weights, self.m, self.p = stored_weights, m, p
        self.exclude = exclude

    def neighbours(self, layer: str, vectors: np.ndarray, k: int) -> Neighbours:
        dist, ids = search(self.indexes[layer], vectors, k, self.nprobe, self.exclude)
        if self.stored_weights:
            return Neighbours(dist, ids, *self.store.get_many(ids, True, self.m, self.p))
        return Neighbours(dist, ids, *self.store.get_many(ids))

    def close(self) -> None:
        self.store.close()
