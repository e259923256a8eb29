"""Pooled pre-ReLU features + softmax in one forward pass, and per-shard Parquet files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import __version__
from pipeline.data.shards import ShardStats, iter_samples
from pipeline.features.backbones import images_to_tensor, pool
from pipeline.ids import make_ids

META_KEY = b"knn_defense"


def to_best_device(model):
    """On a GPU: move there in channels_last (faster convolutions with autocast); on CPU keep
    the model as is (channels_last measured no faster there, DESIGN.md)."""
    if torch.cuda.is_available():
        return model.to("cuda", memory_format=torch.channels_last)
    return model


def forward_taps(model, x01: torch.Tensor, layers) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and taps of a batch of [0, 1] images on the model's device (a GPU gets pinned
    memory, channels_last and bf16 autocast)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return model.forward_taps(x01, layers)
    x01 = x01.pin_memory().to(device, non_blocking=True, memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model.forward_taps(x01, layers)


def auto_batch_size(model, requested: int | str = "auto", cap: int = 1024) -> int:
    """``requested`` if a number; on a GPU, the batch that fills ~70% of free memory, measured
    with a probe forward of 8 images; on CPU, 512 for small inputs and 32 at ImageNet sizes
    (larger CPU batches only add memory, not speed)."""
    if requested != "auto":
        return int(requested)
    size = model.preprocess["crop"]
    device = next(model.parameters()).device
    if device.type != "cuda":
        return int(max(8, min(512, 2 ** round(np.log2(max(1, 2**22 // (size * size * 3)))))))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    probe = torch.rand(8, model.in_channels, size, size)
    forward_features(model, probe, model.tap_names()[-1:])
    per_image = max(1, (torch.cuda.max_memory_allocated(device) - base) / 8)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(8, min(cap, 0.7 * free / per_image)))


@torch.inference_mode()
def forward_features(model, x01: torch.Tensor, layers, poolers=None
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled taps (float32) and softmax (float32) of a batch of [0, 1] images. ``poolers``
    maps a layer to its pooling (a LayerTransform's ``pool``; default average pooling); it runs
    on the model's device, so only pooled vectors come back."""
    logits, taps = forward_taps(model, x01, layers)
    poolers = poolers or {}
    pooled = {name: (poolers[name](t) if name in poolers else pool(t.float(), "avg")).cpu().numpy()
              for name, t in taps.items()}
    return pooled, torch.softmax(logits.float(), 1).cpu().numpy()


def stack_poolers(stacks: dict) -> dict:
    return {name: stack.pool for name, stack in stacks.items()}


def batches(samples: Iterator, batch_size: int) -> Iterator[list]:
    batch = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _fixed_list(values: np.ndarray, dtype=None) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values if dtype is None else values.astype(dtype))
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def extract_shard(model, transforms: dict, shard_url: str, shard_index: int, out_path: str,
                  *, layers, batch_size: int | str, decode: dict,
                  max_pixels: int, provenance: dict,
                  num_threads: int | None = None, only_keys=None, decode_workers: int = 2) -> dict:
    """Write ``out_path`` (Parquet: key, id, label, one column per layer holding its stored
    codes, softmax) for one shard, with ``transforms`` = {layer: LayerTransform},
    or for its ``only_keys`` (a subset). Skipped keys and reasons go into the file's metadata.
    ``decode_workers`` threads decode up to two batches ahead, so the model is not starved.
    Written to a temp name and renamed, so a crash leaves no half-written file."""
    if num_threads:
        torch.set_num_threads(num_threads)
    batch_size = auto_batch_size(model, batch_size)
    stats = ShardStats(record_keys=True)
    keys, labels, feats, probs = [], [], {name: [] for name in layers}, []
    samples = iter_samples(shard_url, stats, max_pixels=max_pixels, keys=only_keys,
                           workers=decode_workers, lookahead=2 * batch_size, **decode)
    for batch in batches(samples, batch_size):
        x = images_to_tensor(np.stack([s.image for s in batch]))
        pooled, softmax = forward_features(model, x, layers, stack_poolers(transforms))
        for name, v in pooled.items():
            feats[name].append(transforms[name].encode(transforms[name].project(v)))
        probs.append(softmax)
        keys += [s.key for s in batch]
        labels += [-1 if s.label is None else s.label for s in batch]
    ids = make_ids(shard_index, np.arange(len(keys)))
    columns = {"key": pa.array(keys, pa.string()), "id": pa.array(ids, pa.int64()),
               "label": pa.array(labels, pa.int32())}
    num_classes = model.num_classes
    for name in layers:
        stack = transforms[name]
        empty = stack.encode(np.zeros((0, stack.dim), np.float32))
        columns[name] = _fixed_list(np.concatenate(feats[name]) if feats[name] else empty)
    p = np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32)
    columns["softmax"] = _fixed_list(p, np.float16)
    meta = dict(provenance, shard_index=shard_index, shard_url=shard_url, layers=list(layers),
                storage={n: transforms[n].storage for n in layers},
                pooling={n: transforms[n].pooling for n in layers},
                code_version=__version__, stats=stats.as_dict())
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out_path)
    counts = {k: v for k, v in stats.as_dict().items() if k != "skipped_keys"}
    return {"shard_index": shard_index, "written": table.num_rows, **counts}


def read_metadata(path: str | os.PathLike) -> dict:
    return json.loads(pq.read_schema(path).metadata[META_KEY])


def read_column(path: str | os.PathLike, column: str) -> np.ndarray:
    """A fixed-size-list column as a [N, d] array (float16 widened to float32; uint8 codes kept
    as they are), or a plain column as 1-D."""
    col = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        values = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        return values.astype(np.float32) if values.dtype == np.float16 else values
    return col.to_numpy(zero_copy_only=False)
