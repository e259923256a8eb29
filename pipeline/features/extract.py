"""Pooled pre-ReLU features + softmax in one forward pass, and per-shard Parquet files."""

from __future__ import annotations

import contextlib
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
from pipeline.devices import current_device, current_gpu_share
from pipeline.features.backbones import images_to_tensor, pool
from pipeline.features.recipe import (
    FeatureRecipe,
    RecipeMismatch,
    make_recipe,
    precision_context,
    resolve_precision,
)
from pipeline.features.tensor_decode import decode_batch, resolve_backend
from pipeline.ids import make_ids

META_KEY = b"knn_defense"


def to_device(model, device: str | torch.device | None = None, precision: str = "fp32"):
    """The model on ``device`` (default: the one decided for this task, ``pipeline.devices``),
    in channels_last on a GPU (faster convolutions there; measured no faster on CPU, DESIGN.md),
    running its forward passes in ``precision`` (a recipe's: fp32 | tf32 | bf16)."""
    device = torch.device(device or current_device())
    if device.type == "cuda":
        model = model.to(device, memory_format=torch.channels_last)
    else:
        model = model.to(device)
    model.feature_precision = resolve_precision(precision, device.type)
    return model


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def forward_taps(model, x01: torch.Tensor, layers) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and taps of a batch of [0, 1] images, on the model's device and in its recipe's
    precision (``to_device``; fp32 when never set)."""
    device = model_device(model)
    if x01.device != device:
        x01 = x01.to(device, non_blocking=True)
    if device.type == "cuda":
        x01 = x01.contiguous(memory_format=torch.channels_last)
    with precision_context(device.type, getattr(model, "feature_precision", "fp32")):
        return model.forward_taps(x01, layers)


# Bytes a batch holds per image on the GPU besides the forward's own activations and its uint8
# input (counted by auto_batch_size): with nvJPEG the decoded full-size image (uint8, ~1080 x 1440
# x 3 for a web photo; the resize's float copy is one image at a time); Pillow decodes on the host.
DECODE_BYTES_PER_IMAGE = {"torchvision": 1080 * 1440 * 3, "hybrid": 1080 * 1440 * 3, "pil": 0}


def auto_batch_size(model, requested: int | str = "auto", cap: int = 1024, *,
                    decode_bytes_per_image: int = 0, gpu_share: float | None = None) -> int:
    """``requested`` if a number; on a GPU, the batch that fills ~70% of this task's share of
    the free memory (``pipeline.devices.current_gpu_share``: tasks given a fraction of a GPU
    leave the rest to the others), measured with a probe forward of 8 images plus
    ``decode_bytes_per_image``; on CPU, 512 for small inputs and 32 at ImageNet sizes (larger
    CPU batches only add memory, not speed)."""
    if requested != "auto":
        return int(requested)
    size = model.preprocess["crop"]
    device = model_device(model)
    if device.type != "cuda":
        return int(max(8, min(512, 2 ** round(np.log2(max(1, 2**22 // (size * size * 3)))))))
    share = current_gpu_share() if gpu_share is None else gpu_share
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    probe = torch.rand(8, model.in_channels, size, size)
    forward_features(model, probe, model.tap_names()[-1:])
    forward_bytes = (torch.cuda.max_memory_allocated(device) - base) / 8
    free, total = torch.cuda.mem_get_info(device)
    return batch_for_memory(free, total, share, forward_bytes,
                            decode_bytes_per_image + model.in_channels * size * size, cap)


def batch_for_memory(free: int, total: int, share: float, forward_bytes: float,
                     other_bytes: float, cap: int = 1024, fill: float = 0.7) -> int:
    """Images per batch that fill ``fill`` of this task's memory: the free memory, but no more
    than its ``share`` of the GPU (the rest belongs to the tasks it shares the GPU with), over
    each image's forward activations plus ``other_bytes`` (decode buffers, the uint8 input)."""
    per_image = max(1.0, forward_bytes + other_bytes)
    usable = min(free, share * total)
    return int(max(8, min(cap, fill * usable / per_image)))


@torch.inference_mode()
def forward_features(model, x01: torch.Tensor, layers, poolers=None
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled taps (float32) and softmax (float32) of a batch of [0, 1] images. ``poolers``
    maps a layer to its pooling (a LayerTransform's ``pool``; default average pooling); it runs
    on the model's device, so only pooled vectors come back."""
    logits, taps = forward_taps(model, x01, layers)
    poolers = poolers or {}
    pooled = {name: (poolers[name](t.float()) if name in poolers else pool(t.float(), "avg"))
              for name, t in taps.items()}
    softmax = torch.softmax(logits.float(), 1)
    # one device-to-host transfer per batch, after which the GPU is free for the next batch
    return {n: v.cpu().numpy() for n, v in pooled.items()}, softmax.cpu().numpy()


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
                max_pixels: int, only_keys=None, workers: int = 2, processes: bool = False
                ) -> Iterator[tuple[list[str], list[int], torch.Tensor]]:
    """(keys, labels, [B, H, W, C] uint8 images) decoded by Pillow in ``workers`` threads up to
    two batches ahead, so decoding overlaps the forward pass. uint8 until the device: a quarter
    of float32's bytes to stack and to copy to a GPU."""
    samples = iter_samples(shard_url, stats, max_pixels=max_pixels, keys=only_keys,
                           workers=workers, lookahead=2 * batch_size, processes=processes,
                           **decode)
    for batch in batches(samples, batch_size):
        yield ([s.key for s in batch], [_label(s.label) for s in batch],
               torch.from_numpy(np.stack([s.image for s in batch])))


def tensor_batches(shard_url: str, stats: ShardStats, batch_size: int, *, decode: dict,
                   max_pixels: int, device, only_keys=None, hybrid: bool = False,
                   workers: int = 0) -> Iterator[tuple[list[str], list[int], torch.Tensor]]:
    """The same batches decoded by torchvision on ``device`` (nvJPEG on a GPU) as [B, C, H, W]
    floats in [0, 1]; a batch is shorter by the images skipped in it. ``hybrid``: JPEGs much
    larger than the model's input are draft-decoded by Pillow in ``workers`` decode processes
    while nvJPEG decodes the rest (``tensor_decode.draft_on_cpu``)."""
    cpu_decode = _pool_decoder(workers) if hybrid and workers > 0 else None
    for batch in batches(iter_encoded(shard_url, stats, keys=only_keys), batch_size):
        x, kept, skipped = decode_batch([data for _, data in batch], device,
                                        max_pixels=max_pixels, hybrid=hybrid,
                                        cpu_decode=cpu_decode, **decode)
        for i, reason, detail in skipped:
            stats.skip(reason, batch[i][0].key, detail)
        stats.decoded += len(kept)
        if kept:
            yield [batch[i][0].key for i in kept], [_label(batch[i][0].label) for i in kept], x


def _pool_decoder(workers: int, chunk: int = 8):
    """``decode_batch``'s ``cpu_decode`` on this process's decode pool: chunks submitted at once,
    results collected in order when the nvJPEG part of the batch is done."""
    from pipeline.data.shards import _decode_chunk, decode_process_pool

    pool = decode_process_pool(workers)

    def submit(datas: list[bytes], args: tuple):
        futures = [pool.submit(_decode_chunk, datas[i:i + chunk], args)
                   for i in range(0, len(datas), chunk)]
        return lambda: [r for f in futures for r in f.result()]

    return submit


_DONE = object()


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """``items`` produced by a background thread up to ``depth`` ahead, so the next batch's
    reading and decoding (Pillow stacking, or nvJPEG's host-side Huffman decode and the tar read)
    overlap this batch's forward pass. An exception in the producer is raised here; closing the
    generator stops the producer."""
    import queue
    import threading

    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(_DONE)
        except BaseException as exn:  # noqa: BLE001 - handed to the consumer
            out.put(exn)

    thread = threading.Thread(target=produce, name="knn-defense-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                out.get(timeout=0.1)
        thread.join()


class DeviceFeeder:
    """uint8 [B, H, W, C] host batches -> [B, C, H, W] floats in [0, 1] on ``device``. On a GPU
    each batch is copied into one of two reused pinned buffers, then to the device without
    blocking (uint8: a quarter of float32's bytes on the bus), and converted there. Two buffers
    because the copy of batch i+1 may be queued while batch i's is still in flight."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._turn = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():  # already decoded on the device (torchvision backend)
            return images
        if self.device.type != "cuda":
            return images_to_tensor(images)
        slot, self._turn = self._turn, 1 - self._turn
        buf = self._pinned[slot]
        if buf is None or buf.numel() < images.numel():
            buf = self._pinned[slot] = torch.empty(images.numel(), dtype=torch.uint8,
                                                   pin_memory=True)
        host = buf[: images.numel()].view(images.shape)
        host.copy_(images)
        on_device = host.to(self.device, non_blocking=True)
        return on_device.permute(0, 3, 1, 2).float().div_(255.0)


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
                  decode_backend: str = "auto", flush_rows: int = 4096,
                  decode_processes: bool = False) -> dict:
    """Write ``out_path`` (Parquet: key, id, label, one column per layer holding its stored
    codes, softmax) for one shard, with ``transforms`` = {layer: LayerTransform},
    or for its ``only_keys`` (a subset). Skipped keys and reasons go into the file's metadata.
    Images are decoded by Pillow in ``decode_workers`` threads (or processes, with
    ``decode_processes``) up to two batches ahead, so the model is not starved, or by
    torchvision on the model's device (``decode_backend``; ``auto``:
    nvJPEG when the model is on a GPU; ``hybrid``: nvJPEG, but JPEGs much larger than the input
    draft-decoded by Pillow in ``decode_workers`` processes). Streamed in row groups of ``flush_rows`` to a temp name
    and renamed at the end (:class:`ShardWriter`), so a crash leaves no half-written file."""
    if num_threads:
        torch.set_num_threads(num_threads)
    device = model_device(model)
    backend = resolve_backend(decode_backend, device)
    recipe = running_recipe(model, backend, provenance)
    batch_size = auto_batch_size(model, batch_size,
                                 decode_bytes_per_image=DECODE_BYTES_PER_IMAGE[backend])
    stats = ShardStats(record_keys=True)
    source = dict(decode=decode, max_pixels=max_pixels, only_keys=only_keys)
    if backend in ("torchvision", "hybrid"):
        decoded = tensor_batches(shard_url, stats, batch_size, device=device,
                                 hybrid=backend == "hybrid", workers=decode_workers, **source)
    else:
        decoded = pil_batches(shard_url, stats, batch_size, workers=decode_workers,
                              processes=decode_processes, **source)
    # The next batch is read and decoded while this one runs through the model.
    decoded = prefetched(decoded, depth=2)
    to_input = DeviceFeeder(device)
    writer = ShardWriter(out_path, shard_index, layers, transforms, model.num_classes, flush_rows)
    # numpy's OpenBLAS (the PCA projection) would otherwise leave its own threads spinning after
    # each small matmul, stealing the cores torch's forward runs on: 20% of the throughput on
    # 2 cores (benchmarks/extraction.py). One BLAS thread is plenty for a [batch, C] x [C, 256].
    blas_limit = threadpool_limits(limits=1, user_api="blas")
    poolers = stack_poolers(transforms)
    try:
        for keys, labels, x in decoded:
            pooled, softmax = forward_features(model, to_input(x), layers, poolers)
            codes = {name: transforms[name].encode(transforms[name].project(v))
                     for name, v in pooled.items()}
            writer.add(keys, labels, codes, softmax)
        meta = dict(provenance, recipe=recipe and recipe.as_dict(), shard_index=shard_index,
                    shard_url=shard_url, layers=list(layers),
                    storage={n: transforms[n].storage for n in layers},
                    pooling={n: transforms[n].pooling for n in layers},
                    code_version=__version__, stats=stats.as_dict())
        written = writer.close(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        decoded.close()
        blas_limit.restore_original_limits()
    counts = {k: v for k, v in stats.as_dict().items() if k != "skipped_keys"}
    return {"shard_index": shard_index, "written": written, **counts}


def running_recipe(model, backend: str, provenance: dict) -> FeatureRecipe | None:
    """The recipe this process runs (model device, precision, decoder, preprocessing, and the
    weights/transforms hashes from ``provenance``); None without those hashes (a bare call).
    When ``provenance`` carries the recipe the job expects, a task that would make vectors by
    other arithmetic (e.g. it got no GPU where the job planned one) refuses before any work."""
    if "weights_sha256" not in provenance or "transform_sha256" not in provenance:
        return None
    recipe = make_recipe(model.preprocess, model_device(model).type,
                         getattr(model, "feature_precision", "fp32"), backend,
                         provenance["weights_sha256"], provenance["transform_sha256"])
    expected = provenance.get("recipe")
    expected = None if expected is None else FeatureRecipe.from_dict(expected)
    if expected is not None and expected != recipe:
        diff = ", ".join(f"{k}: job expects {a}, this task runs {b}"
                         for k, (a, b) in expected.differences(recipe).items())
        raise RecipeMismatch(f"feature recipe mismatch ({diff}); check the features stage's "
                             "num_gpus and that the node's GPU is usable")
    return recipe


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
