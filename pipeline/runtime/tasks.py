"""Bodies of the pipeline's Ray tasks: plain functions of paths and spec dicts, testable without Ray."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.config import JobSpec
from pipeline.data.offsets import write_offsets
from pipeline.data.shards import NoDecodableImage, load_images, scan_shard
from pipeline.data.subsets import selected_keys
from pipeline.devices import current_device
from pipeline.features.backbones import decode_args, images_to_tensor, load_model
from pipeline.features.extract import (
    auto_batch_size,
    extract_shard,
    forward_taps,
    read_column,
    read_metadata,
    to_device,
)
from pipeline.features.stack import fit_stacks, load_stack
from pipeline.ids import split_ids
from pipeline.index.faiss_index import (
    IndexInputError,
    merge_parts,
    populate_part,
    train_index,
    write_index,
)
from pipeline.layout import JobLayout
from pipeline.store.softmax_store import write_partition


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


# A worker (an extraction actor, or a reused task worker) keeps its recently used models, so a
# stage of many shards loads the weights and moves them to the device once per worker, not once
# per shard. Keyed by everything that makes the model: weights file and hash, architecture spec,
# device and precision. Bounded: a worker serving two jobs holds at most this many.
_MODEL_CACHE: OrderedDict = OrderedDict()
MODEL_CACHE_SIZE = 2


def cached_model(model_spec, weights: str, weights_sha256: str | None, precision: str = "auto"):
    """The job's model on this task's device in ``precision``, loaded once per worker."""
    device = current_device()
    key = (str(weights), weights_sha256, model_spec.model_dump_json(), device, precision)
    if key in _MODEL_CACHE:
        _MODEL_CACHE.move_to_end(key)
        return _MODEL_CACHE[key]
    model = to_device(load_model(model_spec, weights), device, precision)
    _MODEL_CACHE[key] = model
    while len(_MODEL_CACHE) > MODEL_CACHE_SIZE:
        _MODEL_CACHE.popitem(last=False)
    return model


def decode_in_processes(executor: str, device: str, num_threads: int | None = None) -> bool:
    """``features.decode_executor``; auto: processes on a GPU, and on a CPU for a task of two or
    more CPUs (the measured best split on 2 CPUs for web-size photos, where decode threads lost
    up to an eighth of the decode cap: docs/benchmarks.md#web-size-photos), threads for a
    one-CPU task."""
    if executor != "auto":
        return executor == "processes"
    return device.startswith("cuda") or (num_threads or 1) >= 2


def decode_workers_for(requested, device: str, num_threads: int | None) -> int:
    """``features.decode_workers``; auto: on a GPU all of the task's CPUs but one; on a CPU one
    decode process per CPU of the task (beside torch's as many intra-op threads: the measured
    best split of 2 CPUs), and 2 threads for a one-CPU task."""
    if requested != "auto":
        return int(requested)
    if device.startswith("cuda"):
        return max(1, (num_threads or 2) - 1)
    return num_threads if (num_threads or 1) >= 2 else 2


def scan_task(url: str, offsets_path: str | None = None) -> dict:
    """A shard's key counts, and with ``offsets_path`` its offsets file (pipeline/data/offsets)."""
    rows: list[dict] | None = [] if offsets_path else None
    stats = scan_shard(url, rows)
    if offsets_path:
        write_offsets(offsets_path, url, rows)
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


def fit_transforms_task(spec: dict, shard_table: list[dict], weights: str, job_dir: str,
                        num_threads: int | None = None) -> dict:
    """Fit every layer's transform stack (pooling, PCA, storage codes) on
    ``features.pca_sample`` database images spread over the shards; returns {layer: hash}."""
    _threads(num_threads)
    job = JobSpec.model_validate(spec)
    fs = job.features
    layout = JobLayout(job_dir)
    model = cached_model(job.model, weights, None, fs.precision)
    decode = decode_args(model)
    per_shard = max(1, round(np.mean([s["num_samples"] for s in shard_table])))
    shards = _evenly_spaced(shard_table, fs.pca_sample, per_shard)
    take = math.ceil(fs.pca_sample / len(shards))
    chunks = []
    for shard in shards:
        try:
            chunks.append(load_images([shard["url"]], decode["channels"], decode["size"],
                                      job.data.max_image_pixels, take, decode["resize"],
                                      decode["interpolation"])[1])
        except NoDecodableImage:  # a shard of only corrupt images is legitimate: use the others
            continue
    if not chunks:
        raise NoDecodableImage(f"no decodable image in the {len(shards)} shard(s) sampled to fit "
                               "the transforms: check data.database")
    images = np.concatenate(chunks)[: fs.pca_sample]

    batch = auto_batch_size(model, fs.batch_size)

    def forward_batches(limit):
        with torch.inference_mode():
            for start in range(0, len(images) if limit is None else min(limit, len(images)), batch):
                yield forward_taps(model, images_to_tensor(images[start:start + batch]), fs.layers)[1]

    stacks = fit_stacks(forward_batches, fs.layers, pooling=fs.pooling, pca_dim=fs.pca_dim,
                        whiten=fs.whiten, storage=fs.storage, rmac_sample=fs.rmac_sample,
                        seed=job.seed)
    files = {name: stack.save(layout.transform_dir(name)) for name, stack in stacks.items()}
    return {"files": files, "sample_size": len(images)}


def load_stacks(job_dir: str, layers) -> dict:
    layout = JobLayout(job_dir)
    return {name: load_stack(layout.transform_dir(name)) for name in layers}


def features_task(spec: dict, url: str, shard_index: int, weights: str, job_dir: str,
                  provenance: dict, num_threads: int | None = 1, subset_manifest: str | None = None
                  ) -> dict:
    """Extract one shard (or only its keys in ``subset_manifest``) with the job's recipe
    (``provenance["recipe"]``: a task whose device would make other arithmetic refuses)."""
    job = JobSpec.model_validate(spec)
    only = selected_keys(subset_manifest, shard_index) if subset_manifest else None
    layout = JobLayout(job_dir)
    fs = job.features
    model = cached_model(job.model, weights, provenance.get("weights_sha256"), fs.precision)
    return extract_shard(model, load_stacks(job_dir, fs.layers), url, shard_index,
                         str(layout.features_file(shard_index)), layers=fs.layers,
                         batch_size=fs.batch_size, decode=decode_args(model),
                         max_pixels=job.data.max_image_pixels, provenance=provenance,
                         num_threads=num_threads, only_keys=only,
                         decode_workers=decode_workers_for(fs.decode_workers, current_device(),
                                                           num_threads),
                         decode_backend=fs.decode_backend,
                         decode_processes=decode_in_processes(fs.decode_executor,
                                                              current_device(), num_threads))


def _search_vectors(feature_file: str, layer: str, job_dir: str) -> np.ndarray:
    """A shard's stored codes for ``layer`` as FAISS takes them (floats or packed bits)."""
    return load_stacks(job_dir, [layer])[layer].search_vectors(read_column(feature_file, layer))


def train_index_task(layer: str, feature_files: list[str], factory: str, sample: int, seed: int,
                     out_path: str, job_dir: str) -> dict:
    """Train the layer's index on up to ``sample`` vectors spread over the feature shards."""
    rows = [pq.read_metadata(f).num_rows for f in feature_files]
    files = _evenly_spaced(feature_files, sample, max(1, int(np.mean(rows))))
    take = math.ceil(sample / len(files))
    vectors = np.concatenate([_search_vectors(f, layer, job_dir)[:take] for f in files])[:sample]
    index = train_index(vectors, factory, seed)
    write_index(index, out_path)
    return {"train_vectors": len(vectors), "code_size": int(vectors.shape[1])}


def _subset_rows(feature_file: str, subset_manifest: str | None) -> np.ndarray | slice:
    """Rows of a feature shard that belong to the subset (all rows without one)."""
    if not subset_manifest:
        return slice(None)
    keys = read_column(feature_file, "key")
    wanted = selected_keys(subset_manifest, int(read_metadata(feature_file)["shard_index"]))
    return np.fromiter((k in wanted for k in keys), bool, len(keys))


def populate_task(layer: str, trained_path: str, feature_file: str, out_path: str,
                  job_dir: str, subset_manifest: str | None = None,
                  shard_index: int | None = None) -> dict:
    """One part: the feature shard's vectors (its subset rows) added to a copy of the trained
    index. Its ids must all be ``shard_index``'s, so no two parts can share an id."""
    rows = _subset_rows(feature_file, subset_manifest)
    vectors = _search_vectors(feature_file, layer, job_dir)[rows]
    ids = read_column(feature_file, "id")[rows].astype(np.int64)
    if shard_index is not None and len(ids):
        shards, _ = split_ids(ids)
        wrong = ids[shards != shard_index]
        if len(wrong):
            raise IndexInputError(
                f"{feature_file}: holds {len(wrong)} ids of shard {int(split_ids(wrong[0])[0])} "
                f"(e.g. id {wrong[0]}) but is shard {shard_index}'s feature file, so those ids "
                "would be in the index twice: delete the file and re-run the features stage")
    return {"added": populate_part(trained_path, vectors, ids, out_path, source=feature_file)}


def tune_task(job_dir: str, layer: str, feature_files: list[str], k: int, target: float,
              subset_manifest: str | None = None, num_queries: int = 1000, seed: int = 0) -> dict:
    """Measure recall@k of the built index against exact search over the same vectors, on
    ``num_queries`` database vectors, and the smallest nprobe reaching ``target``."""
    import faiss

    from pipeline.index.choice import tune_nprobe
    from pipeline.jobfolder import load_layer_index

    layout = JobLayout(job_dir)
    vectors, ids = [], []
    for f in feature_files:
        rows = _subset_rows(f, subset_manifest)
        vectors.append(_search_vectors(f, layer, job_dir)[rows])
        ids.append(read_column(f, "id")[rows])
    vectors, ids = np.concatenate(vectors), np.concatenate(ids).astype(np.int64)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(vectors), min(num_queries, len(vectors)), replace=False)
    queries = vectors[pick]
    k = min(k, len(vectors))
    if vectors.dtype == np.uint8:
        exact = faiss.IndexBinaryFlat(vectors.shape[1] * 8)
        exact.add(vectors)
        _, rows = exact.search(queries, k)
    else:
        _, rows = faiss.knn(queries, vectors, k)
    truth = ids[rows]
    nprobe, recall, curve = tune_nprobe(load_layer_index(layout, layer), queries, truth, k, target)
    return {"nprobe": nprobe, "recall": recall, "curve": curve, "queries": len(queries), "k": k}


def merge_task(trained_path: str, part_paths: list[str], out_path: str, ondisk: bool = False
               ) -> dict:
    return {"ntotal": merge_parts(trained_path, part_paths, out_path, ondisk)}


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
    """Run the job's evaluation grid (its `evaluate` section) on its query sample into eval/."""
    from pipeline.evaluate.experiment import evaluate_job

    result = evaluate_job(job_dir, num_threads=num_threads, progress=progress)
    return {k: result[k] for k in ("num_queries", "query_skipped", "markdown", "sets_crafted",
                                   "cells_evaluated", "attacks", "claims", "decontamination",
                                   "sanity", "hard_label")}
