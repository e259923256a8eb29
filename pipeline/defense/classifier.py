"""DefendedClassifier: image -> features -> K nearest neighbours -> their stored softmax -> vote."""

from __future__ import annotations

import os

import numpy as np
import torch

from pipeline.defense.searchers import LocalSearcher, Neighbours, concat
from pipeline.features.backbones import images_to_tensor
from pipeline.features.extract import forward_features, stack_poolers
from pipeline.weighting import neighbour_weights, vote

DEFAULT_WEIGHTING = "cbw_d"
NO_EVALUATION = ("the last tap: the job has no evaluation to choose from "
                 "(run `knn-defense evaluate`), or pass --layer")


def default_layer(job_dir: str | os.PathLike, layers: list[str]) -> tuple[str, str]:
    """(layer, reason): the layer the job's evaluation chose (eval/default_layer.json, written by
    the evaluate stage: best worst-case accuracy at the headline budget, the better clean
    accuracy among layers within noise of it), else the last tap."""
    from pipeline.layout import JobLayout, read_json

    path = JobLayout(job_dir).default_layer
    if path.is_file():
        choice = read_json(path)
        if choice.get("layer") in layers:
            return choice["layer"], choice["reason"]
    return layers[-1], f"{layers[-1]}: {NO_EVALUATION}"


class DefendedClassifier:
    """kNN defense around a classifier.

    ``predict`` returns the weighted vote of the K nearest database images' stored softmax
    vectors; ``neighbours_all_layers`` gives the undefended logits and every layer's neighbours
    from one forward pass, for evaluation grids and attacks that need them.
    """

    def __init__(self, model, transforms: dict, indexes: dict | None = None, store=None, *,
                 searcher=None, layer: str | None = None,
                 weighting: str = DEFAULT_WEIGHTING, k: int = 50, nprobe: int | None = None,
                 cbw_d_m: int = 20, cbw_d_p: float = 3.0, batch_size: int = 256,
                 stored_weights: bool = False, recipe: dict | None = None,
                 layer_reason: str | None = None, exclude: np.ndarray | None = None):
        self.model = model.eval()
        # The database's feature recipe, the one this query path runs, and what differs
        # (pipeline/features/recipe.py); None for a model not loaded from a job folder.
        self.recipe = recipe or {"database": None, "query": None, "differs": {}}
        self.transforms, self.indexes, self.store = transforms, indexes, store
        self.layers = list(transforms)
        self.layer = layer or self.layers[-1]
        if self.layer not in self.layers:
            raise ValueError(f"layer {self.layer!r}: this defense has {self.layers}")
        # why this layer answers by default (shown by /info and classify)
        self.layer_reason = layer_reason or (f"{self.layer}: chosen by the caller" if layer
                                             else f"{self.layer}: the last tap")
        self.weighting, self.k = weighting, k
        self.cbw_d_m, self.cbw_d_p, self.batch_size = cbw_d_m, cbw_d_p, batch_size
        # A compact (topk) store keeps each vector's CBW weights, computed from the full vector
        # before truncation; use those instead of recomputing them from the truncated one.
        self.stored_weights = stored_weights
        self.job_dir, self.generation = None, 0  # the database's folder and version (from_job)
        self.keys_of = None  # id -> key lookup, set by from_job
        self.image_of = None  # id -> encoded image bytes (one ranged read), set by from_job
        # Neighbours come from the local indexes + store, or from a searcher given by the
        # caller (e.g. co-located partition actors, pipeline/runtime/colocated.py).
        self.searcher = searcher or LocalSearcher(indexes, store, nprobe, stored_weights,
                                                  cbw_d_m, cbw_d_p, exclude)

    @classmethod
    def from_job(cls, job_dir: str | os.PathLike, *, searcher=None,
                 **overrides) -> DefendedClassifier:
        """Load a finished job folder (checks that its recorded hashes agree). ``searcher``:
        where neighbours come from instead of the folder's indexes and store, which are then not
        opened, e.g. co-located partition actors (``pipeline.runtime.colocated``). Without
        ``layer``, the default layer is the one the job's evaluation chose (:func:`default_layer`)."""
        from pipeline.jobfolder import load_defense_parts, read_generations
        from pipeline.layout import JobLayout, read_json

        # the generation first: a change published while the parts load is then a newer one,
        # which the next reload picks up (read after, it would be claimed and never loaded)
        generation = read_generations(JobLayout(job_dir))["generation"]
        parts = load_defense_parts(job_dir, local_search=searcher is None)
        spec = parts.pop("spec")
        if searcher is not None:
            parts["searcher"] = searcher
            parts.pop("exclude", None)
        # nprobe: each index keeps the one index.json records (configured or tuned)
        kwargs = dict(k=spec.evaluate.k, cbw_d_m=spec.evaluate.cbw_d.m, cbw_d_p=spec.evaluate.cbw_d.p,
                      stored_weights=read_json(JobLayout(job_dir).store_info)["encoding"] == "topk")
        if overrides.get("layer") is None:
            overrides.pop("layer", None)
            kwargs["layer"], kwargs["layer_reason"] = default_layer(job_dir, spec.features.layers)
        kwargs.update(overrides)
        try:
            defense = cls(**parts, **kwargs)
        except BaseException:  # a bad override: release the store (LevelDB allows one opener)
            if parts.get("store") is not None:
                parts["store"].close()
            raise
        from pipeline.jobfolder import ImageLookup, KeyLookup

        defense.job_dir, defense.generation = job_dir, generation
        defense.keys_of = KeyLookup(job_dir)  # id -> sample key, for inspection
        defense.image_of = ImageLookup(job_dir, defense.keys_of)
        return defense

    def prepare_reload(self):
        """The database's newer generation (after `knn-defense add` / `remove`), loaded beside
        the current one; None when up to date or not searched locally. :meth:`swap` puts it in
        place, so a caller that swaps between batches never answers from half of a change."""
        from pipeline.jobfolder import load_layer_index, open_store, read_generations, tombstones
        from pipeline.layout import JobLayout

        if self.job_dir is None or not isinstance(self.searcher, LocalSearcher):
            return None
        layout = JobLayout(self.job_dir)
        generation = read_generations(layout)["generation"]
        if generation == self.generation:
            return None
        from pipeline.jobfolder import ImageLookup, KeyLookup

        old = self.searcher
        indexes = {name: load_layer_index(layout, name) for name in self.layers}
        store = open_store(layout, self.store.num_partitions, current=self.store)
        searcher = LocalSearcher(indexes, store, old.nprobe, old.stored_weights, old.m, old.p,
                                 tombstones(layout, self.layers))
        if read_generations(layout)["generation"] != generation:  # changed while loading
            return None  # the next poll loads the newer one whole
        keys_of = KeyLookup(self.job_dir)  # new shards, removed ids
        return generation, searcher, keys_of, ImageLookup(self.job_dir, keys_of)

    def swap(self, prepared) -> None:
        """Put a :meth:`prepare_reload` result in place (attribute assignments only)."""
        self.generation, self.searcher, self.keys_of, self.image_of = prepared
        self.indexes, self.store = self.searcher.indexes, self.searcher.store

    def image(self, image_id: int) -> bytes:
        """A database image's encoded bytes (e.g. a neighbour's, ``Neighbours.ids``), read with
        one ranged read of its shard; ``ImageNotFound`` says why an id has none."""
        if self.image_of is None:
            raise LookupError("no job folder behind this classifier: load it with from_job")
        return self.image_of(int(image_id))

    @property
    def decoder(self) -> str:
        """How query images are decoded: the way the database's were (Pillow by default)."""
        return (self.recipe["query"] or {}).get("decoder", "pil")

    def decode(self, data: bytes, max_pixels: int = 89_478_485) -> np.ndarray:
        """Encoded image bytes -> HWC uint8 as the database's images were decoded."""
        from pipeline.features.backbones import decode_args
        from pipeline.features.tensor_decode import decode_like_database

        return decode_like_database(data, max_pixels, self.decoder, **decode_args(self.model))

    def _as_tensor(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            return images
        return images_to_tensor(images)

    def neighbours_all_layers(self, images, layers=None, k: int | None = None
                              ) -> tuple[np.ndarray, dict[str, Neighbours]]:
        """Undefended logits-softmax [N, C] and neighbours per layer, batched."""
        layers = list(layers or self.layers)
        k = k or self.k
        x = self._as_tensor(images)
        probs, found = [], {name: [] for name in layers}
        for start in range(0, len(x), self.batch_size):
            pooled, softmax = forward_features(self.model, x[start:start + self.batch_size], layers,
                                               stack_poolers(self.transforms))
            probs.append(softmax)
            for name, feats in pooled.items():
                vectors = self.transforms[name].query_vectors(feats)
                found[name].append(self.searcher.neighbours(name, vectors, k))
        return np.concatenate(probs), {name: concat(parts) for name, parts in found.items()}

    def close(self) -> None:
        self.searcher.close()

    def weights_for(self, neighbours: Neighbours, weighting: str | None = None) -> np.ndarray:
        """Each neighbour's vote weight [N, K] under ``weighting`` (0 for missing neighbours):
        stored CBW weights for compact stores, else computed from the softmax vectors."""
        rule = weighting or self.weighting
        if neighbours.weights is not None and rule in ("cbw_e", "cbw_d"):
            weights = neighbours.weights[..., 0 if rule == "cbw_e" else 1]
        else:
            weights = neighbour_weights(neighbours.softmax, rule, self.cbw_d_m, self.cbw_d_p)
        return weights * neighbours.found

    def vote(self, neighbours: Neighbours, weighting: str | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """(labels [N], class scores [N, C]) of the weighted vote."""
        scores = vote(neighbours.softmax, self.weights_for(neighbours, weighting))
        return scores.argmax(-1), scores

    def predict(self, images, layer: str | None = None, weighting: str | None = None,
                return_neighbours: bool = False):
        """(labels [N], scores [N, C]) and, on request, the neighbours used."""
        layer = layer or self.layer
        _, by_layer = self.neighbours_all_layers(images, [layer])
        labels, scores = self.vote(by_layer[layer], weighting)
        return (labels, scores, by_layer[layer]) if return_neighbours else (labels, scores)
