"""Bodies of the pipeline's Ray tasks: plain functions of paths and spec dicts, testable without Ray."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.config import JobSpec
from pipeline.data.shards import load_images, scan_shard
from pipeline.data.subsets import selected_keys
from pipeline.features.backbones import decode_args, images_to_tensor, load_model
from pipeline.features.extract import (
    extract_shard,
    forward_features,
    read_column,
    read_metadata,
    to_best_device,
)
from pipeline.features.transforms import fit_pca, load_pca, save_pca
from pipeline.index.faiss_index import merge_parts, populate_part, train_index, write_index
from pipeline.layout import JobLayout
from pipeline.store.softmax_store import write_partition


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def scan_task(url: str) -> dict:
    stats = scan_shard(url)
    return {"num_keys": stats.read, "num_samples": stats.read - sum(stats.skipped.values()),
            **stats.as_dict()}


def train_task(spec: dict, urls: list[str], out_path: str, num_threads: int | None = None) -> dict:
    from pipeline.train.classifier import train_classifier

    _threads(num_threads)
    job = JobSpec.model_validate(spec)
    _, images, labels, skipped = load_images(urls, job.model.in_channels, size=None,
                                             max_pixels=job.data.max_image_pixels)
    result = train_classifier(job.model, job.train, images, labels, out_path, num_threads)
    return {**result, "skipped": skipped}


def _evenly_spaced(items: list, want: int, per_item: int) -> list:
    """Enough items, spread over the list, to supply ``want`` rows at ``per_item`` each."""
    n = min(len(items), max(1, math.ceil(want / max(per_item, 1))))
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def fit_transforms_task(spec: dict, shard_table: list[dict], weights: str, out_dir: str,
                        num_threads: int | None = None) -> dict:
    """Fit a PCA per layer on pooled features of ``features.pca_sample`` database images."""
    _threads(num_threads)
    job = JobSpec.model_validate(spec)
    fs = job.features
    model = load_model(job.model, weights)
    decode = decode_args(model)
    per_shard = max(1, round(np.mean([s["num_samples"] for s in shard_table])))
    shards = _evenly_spaced(shard_table, fs.pca_sample, per_shard)
    take = math.ceil(fs.pca_sample / len(shards))
    pooled: dict[str, list] = {name: [] for name in fs.layers}
    for shard in shards:
        _, images, _, _ = load_images([shard["url"]], decode["channels"], decode["size"],
                                      job.data.max_image_pixels, take, decode["resize"],
                                      decode["interpolation"])
        x = images_to_tensor(images)
        for start in range(0, len(x), fs.batch_size):
            feats, _ = forward_features(model, x[start:start + fs.batch_size], fs.layers, fs.pooling)
            for name, v in feats.items():
                pooled[name].append(v)
    files = {}
    for name in fs.layers:
        sample = np.concatenate(pooled[name])[: fs.pca_sample]
        files[name] = save_pca(fit_pca(sample, fs.pca_dim), Path(out_dir) / f"{name}.npz")
    return {"files": files, "sample_size": int(min(fs.pca_sample, len(sample)))}


def features_task(spec: dict, url: str, shard_index: int, weights: str, job_dir: str,
                  provenance: dict, num_threads: int | None = 1, subset_manifest: str | None = None
                  ) -> dict:
    """Extract one shard (or only its keys in ``subset_manifest``)."""
    job = JobSpec.model_validate(spec)
    only = selected_keys(subset_manifest, shard_index) if subset_manifest else None
    layout = JobLayout(job_dir)
    fs = job.features
    model = to_best_device(load_model(job.model, weights))
    transforms = {name: load_pca(layout.transform_file(name)) for name in fs.layers}
    return extract_shard(model, transforms, url, shard_index, str(layout.features_file(shard_index)),
                         layers=fs.layers, pooling=fs.pooling, dtype=fs.dtype, batch_size=fs.batch_size,
                         decode=decode_args(model),
                         max_pixels=job.data.max_image_pixels, provenance=provenance,
                         num_threads=num_threads, only_keys=only, decode_workers=fs.decode_workers)


def train_index_task(layer: str, feature_files: list[str], factory: str, sample: int, seed: int,
                     out_path: str) -> dict:
    """Train the layer's index on up to ``sample`` vectors spread over the feature shards."""
    rows = [pq.read_metadata(f).num_rows for f in feature_files]
    files = _evenly_spaced(feature_files, sample, max(1, int(np.mean(rows))))
    take = math.ceil(sample / len(files))
    vectors = np.concatenate([read_column(f, layer)[:take] for f in files])[:sample]
    index = train_index(vectors, factory, seed)
    write_index(index, out_path)
    return {"train_vectors": len(vectors), "dim": int(vectors.shape[1])}


def _subset_rows(feature_file: str, subset_manifest: str | None) -> np.ndarray | slice:
    """Rows of a feature shard that belong to the subset (all rows without one)."""
    if not subset_manifest:
        return slice(None)
    keys = read_column(feature_file, "key")
    wanted = selected_keys(subset_manifest, int(read_metadata(feature_file)["shard_index"]))
    return np.fromiter((k in wanted for k in keys), bool, len(keys))


def populate_task(layer: str, trained_path: str, feature_file: str, out_path: str,
                  subset_manifest: str | None = None) -> dict:
    rows = _subset_rows(feature_file, subset_manifest)
    vectors, ids = read_column(feature_file, layer)[rows], read_column(feature_file, "id")[rows]
    return {"added": populate_part(trained_path, vectors, ids.astype(np.int64), out_path)}


def merge_task(trained_path: str, part_paths: list[str], out_path: str) -> dict:
    return {"ntotal": merge_parts(trained_path, part_paths, out_path)}


def store_task(store_dir: str, partition_index: int, feature_files: list[str],
               subset_manifest: str | None = None, encoding: str = "float16",
               encoding_options: dict | None = None) -> dict:
    """Write one LevelDB partition from the softmax columns of its shards' feature files."""
    def rows():
        for f in feature_files:
            keep = _subset_rows(f, subset_manifest)
            yield read_column(f, "id").astype(np.int64)[keep], read_column(f, "softmax")[keep]

    return {"written": write_partition(store_dir, partition_index, rows(), encoding,
                                       **(encoding_options or {}))}


def evaluate_task(job_dir: str, num_threads: int | None = None, progress: bool = True) -> dict:
    """Run the evaluation grid on the job's query sample and write eval/."""
    from pipeline.data.shards import expand_shards
    from pipeline.defense.classifier import DefendedClassifier
    from pipeline.evaluate.grid import evaluate_grid, write_results

    _threads(num_threads)
    defense = DefendedClassifier.from_job(job_dir)
    try:
        from pipeline.runtime.artifacts import load_spec

        job = load_spec(job_dir)
        ev = job.evaluate
        decode = decode_args(defense.model)
        _, images, labels, skipped = load_images(
            expand_shards(job.data.queries), decode["channels"], decode["size"],
            job.data.max_image_pixels, None, decode["resize"], decode["interpolation"])
        if (labels < 0).any():
            raise ValueError("evaluation needs a label (.cls) for every query image")
        if ev.num_queries is not None and ev.num_queries < len(images):
            pick = np.sort(np.random.default_rng(ev.seed).choice(len(images), ev.num_queries, replace=False))
            images, labels = images[pick], labels[pick]
        rows, attack_stats = evaluate_grid(defense, images, labels, ev, job.features.layers, progress)
        out = write_results(JobLayout(job_dir).eval_dir, rows, attack_stats)
    finally:
        defense.store.close()
    return {"num_queries": len(images), "query_skipped": skipped, "markdown": out["markdown"],
            "rows": rows, "attacks": attack_stats}
