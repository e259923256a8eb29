"""Co-located search: one Ray actor per partition owns that partition's index shard of every
layer and its store partition (same ``partition(id)``), so a query fans out once and every
neighbour comes back with its softmax vector attached. Needs a job built with
``index.layout: sharded``. The classifier gets the searcher from its caller::

    defense = open_colocated(job_dir, k=10)  # DefendedClassifier.from_job(..., searcher=...)
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.defense.searchers import LocalSearcher, Neighbours, merge_topk


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

    @classmethod
    def for_job(cls, job_dir: str | os.PathLike, num_cpus: float = 0.5) -> ColocatedSearcher:
        """One actor per store partition of a finished job folder, searching every layer."""
        from pipeline.jobfolder import load_spec

        spec = load_spec(job_dir)
        if spec.index.layout != "sharded":
            raise ValueError(f"{job_dir}: co-located search needs index.layout: sharded")
        return cls(job_dir, spec.features.layers, spec.store.partitions, num_cpus)

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


def open_colocated(job_dir: str | os.PathLike, num_cpus: float = 0.5, **overrides):
    """``DefendedClassifier.from_job`` searching through co-located partition actors (in the
    current Ray session); the actors are released if the classifier cannot be built."""
    from pipeline.defense.classifier import DefendedClassifier

    searcher = ColocatedSearcher.for_job(job_dir, num_cpus)
    try:
        return DefendedClassifier.from_job(job_dir, searcher=searcher, **overrides)
    except BaseException:
        searcher.close()
        raise
