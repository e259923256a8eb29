"""Paths inside a job folder (DESIGN.md's layout), in one place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class JobLayout:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    job_yaml = property(lambda self: self.root / "job.yaml")
    manifest = property(lambda self: self.root / "manifest" / "manifest.sqlite")
    shards_table = property(lambda self: self.root / "shards.parquet")
    subset_dir = property(lambda self: self.root / "subset")
    subset_manifest = property(lambda self: self.root / "subset" / "subset.parquet")
    model_dir = property(lambda self: self.root / "model")
    model_info = property(lambda self: self.root / "model" / "model.json")
    transforms_dir = property(lambda self: self.root / "transforms")
    transforms_info = property(lambda self: self.root / "transforms" / "transforms.json")
    features_dir = property(lambda self: self.root / "features")
    index_root = property(lambda self: self.root / "index")
    store_dir = property(lambda self: self.root / "store")
    store_info = property(lambda self: self.root / "store" / "store.json")
    eval_dir = property(lambda self: self.root / "eval")
    # the query side's default layer, chosen from the evaluation (pipeline/evaluate/layer_choice)
    default_layer = property(lambda self: self.root / "eval" / "default_layer.json")
    summary = property(lambda self: self.root / "summary.json")
    # a living database (pipeline/runtime/living.py): added generations and removals, recorded
    # in generation.json, which is written last by every change
    generation = property(lambda self: self.root / "generation.json")
    generations_dir = property(lambda self: self.root / "generations")
    removed_dir = property(lambda self: self.root / "removed")
    removed_table = property(lambda self: self.root / "removed" / "removed.parquet")

    def generation_shards(self, generation: int) -> Path:
        return self.generations_dir / f"shards-{generation:03d}.parquet"

    def generation_index(self, layer: str, generation: int) -> Path:
        return self.index_dir(layer) / f"gen-{generation:03d}.faiss"

    def generation_store(self, generation: int) -> Path:
        return self.store_dir / f"gen-{generation:03d}"

    def change_dir(self, kind: str, number: int) -> Path:
        """The journal folder of one change (``kind``: add, remove, compact)."""
        return self.root / "changes" / f"{number:03d}-{kind}"

    # where each sample's image bytes lie in its tar (pipeline/data/offsets.py), one file per shard
    offsets_dir = property(lambda self: self.root / "shards" / "offsets")

    def offsets_file(self, shard_index: int) -> Path:
        return self.offsets_dir / f"{shard_index:05d}.parquet"

    def features_file(self, shard_index: int) -> Path:
        return self.features_dir / f"{shard_index:05d}.parquet"

    def transform_dir(self, layer: str) -> Path:
        return self.transforms_dir / layer

    def index_dir(self, layer: str) -> Path:
        return self.index_root / layer

    def trained_index(self, layer: str) -> Path:
        return self.index_dir(layer) / "trained.faiss"

    def index_part(self, layer: str, shard_index: int) -> Path:
        return self.index_dir(layer) / "parts" / f"{shard_index:05d}.faiss"

    def merged_index(self, layer: str) -> Path:
        return self.index_dir(layer) / "index.faiss"

    def index_shard(self, layer: str, partition_index: int) -> Path:
        return self.index_dir(layer) / f"shard-{partition_index:03d}.faiss"

    def index_info(self, layer: str) -> Path:
        return self.index_dir(layer) / "index.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a unique temp file beside ``path`` and rename it into place: readers see the
    old file or the new one, never half of one; a failed write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomic JSON write."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path: str | os.PathLike, what: str = "") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing{' (' + what + ')' if what else ''}")
    return json.loads(path.read_text())
