"""Where a query's neighbours come from: a local index + store, or co-located Ray actors that
each own one index shard and the matching store partition (same ``partition(id)``), so a query
fans out once and every neighbour comes back with its softmax vector attached."""

from __future__ import annotations

import os
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
    """Indexes and the store opened in this process."""

    def __init__(self, indexes: dict, store, nprobe: int | None = None, stored_weights: bool = False,
                 m: int = 20, p: float = 3.0):
        self.indexes, self.store, self.nprobe = indexes, store, nprobe
        self.stored_weights, self.m, self.p = stored_weights, m, p

    def neighbours(self, layer: str, vectors: np.ndarray, k: int) -> Neighbours:
        dist, ids = search(self.indexes[layer], vectors, k, self.nprobe)
        if self.stored_weights:
            return Neighbours(dist, ids, *self.store.get_many(ids, True, self.m, self.p))
        return Neighbours(dist, ids, *self.store.get_many(ids))

    def close(self) -> None:
        self.store.close()


class PartitionServer:
    """One partition's index shards (every layer) and store partition; a plain class that a Ray
    actor hosts (``ColocatedSearcher``), testable without Ray."""

    def __init__(self, job_dir: str | os.PathLike, partition_index: int, layers: list[str]):
        from pipeline.jobfolder import load_layer_index, load_spec
        from pipeline.layout import JobLayout, read_json
        from pipeline.store.softmax_store import SoftmaxStore

        spec = load_spec(job_dir)
        layout = JobLayout(job_dir)
        self.partition_index = partition_index
        indexes = {layer: load_layer_index(layout, layer, None, [partition_index])
                   for layer in layers}
        store = SoftmaxStore(layout.store_dir, spec.store.partitions, only=[partition_index])
        stored_weights = read_json(layout.store_info)["encoding"] == "topk"
        self.local = LocalSearcher(indexes, store, None, stored_weights,
                                   spec.evaluate.cbw_d.m, spec.evaluate.cbw_d.p)

    def neighbours(self, layer: str, vectors: np.ndarray, k: int) -> Neighbours:
        return self.local.neighbours(layer, vectors, k)

    def ntotal(self) -> dict[str, int]:
        return {layer: int(index.ntotal) for layer, index in self.local.indexes.items()}

    def close(self) -> None:
        self.local.close()


class ColocatedSearcher:
    """Fan a query out to one Ray actor per partition and merge their top-k. Needs a job built
    with ``index.layout: sharded``; the store partitions are opened by the actors only."""

    def __init__(self, job_dir: str | os.PathLike, layers: list[str], num_partitions: int,
                 num_cpus: float = 0.5):
        import ray

        actor = ray.remote(PartitionServer).options(num_cpus=num_cpus)
        self.actors = [actor.remote(str(job_dir), p, list(layers)) for p in range(num_partitions)]
        self.store = None  # owned by the actors

    def neighbours(self, layer: str, vectors: np.ndarray, k: int) -> Neighbours:
        import ray

        parts = ray.get([a.neighbours.remote(layer, vectors, k) for a in self.actors])
        return merge_topk(parts, k)

    def ntotal(self) -> dict[str, int]:
        import ray

        totals = ray.get([a.ntotal.remote() for a in self.actors])
        return {layer: sum(t[layer] for t in totals) for layer in totals[0]}

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.get(a.close.remote())
            ray.kill(a)
        self.actors = []
