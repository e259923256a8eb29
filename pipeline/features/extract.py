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
from threadpoolctl import threadpool_limits

from pipeline import __version__
from pipeline.data.shards import ShardStats, iter_encoded, iter_samples
from pipeline.features.backbones import images_to_tensor, pool
from pipeline.features.tensor_decode import decode_batch, resolve_backend
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
    if x01.device != device:  # decoded on the GPU already (tensor_decode) or not
        x01 = x01.pin_memory().to(device, non_blocking=True)
    x01 = x01.contiguous(memory_format=torch.channels_last)
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


def _label(label: int | None) -> int:
    return -1 if label is None else label


def pil_batches(shard_url: str, stats: ShardStats, batch_size: int, *, decode: dict,
                max_pixels: int, only_keys=None, workers: int = 2
                ) -> Iterator[tuple[list[str], list[int], torch.Tensor]]:
    """(keys, labels, [B, C, H, W] images in [0, 1]) decoded by Pillow in ``workers`` threads
    up to two batches ahead, so decoding overlaps the forward pass."""
    samples = iter_samples(shard_url, stats, max_pixels=max_pixels, keys=only_keys,
                           workers=workers, lookahead=2 * batch_size, **decode)
    for batch in batches(samples, batch_size):
        yield ([s.key for s in batch], [_label(s.label) for s in batch],
               images_to_tensor(np.stack([s.image for s in batch])))


def tensor_batches(shard_url: str, stats: ShardStats, batch_size: int, *, decode: dict,
                   max_pixels: int, device, only_keys=None
                   ) -> Iterator[tuple[list[str], list[int], torch.Tensor]]:
    """The same batches decoded by torchvision on ``device`` (nvJPEG on a GPU); a batch is
    shorter by the images skipped in it."""
    for batch in batches(iter_encoded(shard_url, stats, keys=only_keys), batch_size):
        x, kept, skipped = decode_batch([data for _, data in batch], device,
                                        max_pixels=max_pixels, **decode)
        for i, reason, detail in skipped:
            stats.skip(reason, batch[i][0].key, detail)
        stats.decoded += len(kept)
        if kept:
            yield [batch[i][0].key for i in kept], [_label(batch[i][0].label) for i in kept], x


def _fixed_list(values: np.ndarray, dtype=None) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values if dtype is None else values.astype(dtype))
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


class ShardWriter:
    """A features shard streamed to ``<out>.tmp`` in row groups of ``flush_rows`` (so a worker
    holds at most that many rows, however long the shard) and renamed to ``out`` by
    :meth:`close`; :meth:`abort` (any exception) removes the temp file, so a crash mid-shard
    leaves no file under the final name. Ids are the rows' positions, numbered as written."""

    def __init__(self, out_path: str | os.PathLike, shard_index: int, layers, transforms: dict,
                 num_classes: int, flush_rows: int = 4096):
        self.out_path = Path(out_path)
        self.tmp = self.out_path.with_name(self.out_path.name + ".tmp")
        self.shard_index, self.layers, self.flush_rows = shard_index, list(layers), flush_rows
        fields = [("key", pa.string()), ("id", pa.int64()), ("label", pa.int32())]
        for name in self.layers:
            empty = transforms[name].encode(np.zeros((0, transforms[name].dim), np.float32))
            fields.append((name, pa.list_(pa.from_numpy_dtype(empty.dtype), empty.shape[1])))
        fields.append(("softmax", pa.list_(pa.float16(), num_classes)))
        self.schema = pa.schema(fields)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp, self.schema)
        self._pending: list[dict] = []
        self._pending_rows = 0
        self.rows = 0

    def add(self, keys: list[str], labels: list[int], codes: dict[str, np.ndarray],
            softmax: np.ndarray) -> None:
        self._pending.append({"key": keys, "label": labels, "softmax": softmax.astype(np.float16),
                              **codes})
        self._pending_rows += len(keys)
        if self._pending_rows >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        parts, self._pending, n = self._pending, [], self._pending_rows
        self._pending_rows = 0
        keys = [k for p in parts for k in p["key"]]
        columns = {"key": pa.array(keys, pa.string()),
                   "id": pa.array(make_ids(self.shard_index, np.arange(self.rows, self.rows + n)),
                                  pa.int64()),
                   "label": pa.array([v for p in parts for v in p["label"]], pa.int32())}
        for name in [*self.layers, "softmax"]:
            columns[name] = _fixed_list(np.concatenate([p[name] for p in parts]))
        self._writer.write_table(pa.table(columns, schema=self.schema))
        self.rows += n

    def close(self, metadata: dict) -> int:
        """Flush, record ``metadata`` (JSON, under ``META_KEY``), rename; returns the rows."""
        self._flush()
        self._writer.add_key_value_metadata({META_KEY: json.dumps(metadata).encode()})
        self._writer.close()
        os.replace(self.tmp, self.out_path)
        return self.rows

    def abort(self) -> None:
        self._writer.close()
        self.tmp.unlink(missing_ok=True)


def extract_shard(model, transforms: dict, shard_url: str, shard_index: int, out_path: str,
                  *, layers, batch_size: int | str, decode: dict,
                  max_pixels: int, provenance: dict,
                  num_threads: int | None = None, only_keys=None, decode_workers: int = 2,
                  decode_backend: str = "auto", flush_rows: int = 4096) -> dict:
    """Write ``out_path`` (Parquet: key, id, label, one column per layer holding its stored
    codes, softmax) for one shard, with ``transforms`` = {layer: LayerTransform},
    or for its ``only_keys`` (a subset). Skipped keys and reasons go into the file's metadata.
    Images are decoded by Pillow in ``decode_workers`` threads up to two batches ahead, so the
    model is not starved, or by torchvision on the model's device (``decode_backend``; ``auto``:
    nvJPEG when the model is on a GPU). Streamed in row groups of ``flush_rows`` to a temp name
    and renamed at the end (:class:`ShardWriter`), so a crash leaves no half-written file."""
    if num_threads:
        torch.set_num_threads(num_threads)
    batch_size = auto_batch_size(model, batch_size)
    stats = ShardStats(record_keys=True)
    device = next(model.parameters()).device
    source = dict(decode=decode, max_pixels=max_pixels, only_keys=only_keys)
    if resolve_backend(decode_backend, device) == "torchvision":
        decoded = tensor_batches(shard_url, stats, batch_size, device=device, **source)
    else:
        decoded = pil_batches(shard_url, stats, batch_size, workers=decode_workers, **source)
    writer = ShardWriter(out_path, shard_index, layers, transforms, model.num_classes, flush_rows)
    # numpy's OpenBLAS (the PCA projection) would otherwise leave its own threads spinning after
    # each small matmul, stealing the cores torch's forward runs on: 20% of the throughput on
    # 2 cores (benchmarks/extraction.py). One BLAS thread is plenty for a [batch, C] x [C, 256].
    blas_limit = threadpool_limits(limits=1, user_api="blas")
    poolers = stack_poolers(transforms)
    try:
        for keys, labels, x in decoded:
            pooled, softmax = forward_features(model, x, layers, poolers)
            codes = {name: transforms[name].encode(transforms[name].project(v))
                     for name, v in pooled.items()}
            writer.add(keys, labels, codes, softmax)
        meta = dict(provenance, shard_index=shard_index, shard_url=shard_url, layers=list(layers),
                    storage={n: transforms[n].storage for n in layers},
                    pooling={n: transforms[n].pooling for n in layers},
                    code_version=__version__, stats=stats.as_dict())
        written = writer.close(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        blas_limit.restore_original_limits()
    counts = {k: v for k, v in stats.as_dict().items() if k != "skipped_keys"}
    return {"shard_index": shard_index, "written": written, **counts}


def read_metadata(path: str | os.PathLike) -> dict:
    """A shard's provenance and stats (the file's key-value metadata)."""
    return json.loads(pq.read_metadata(path).metadata[META_KEY])


def read_column(path: str | os.PathLike, column: str) -> np.ndarray:
    """A fixed-size-list column as a [N, d] array (float16 widened to float32; uint8 codes kept
    as they are), or a plain column as 1-D."""
    col = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        values = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        return values.astype(np.float32) if values.dtype == np.float16 else values
    return col.to_numpy(zero_copy_only=False)
