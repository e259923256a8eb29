"""Reading webdataset tar shards (img2dataset layout) robustly.

Bad samples never stop a shard: corrupt, missing, empty or oversized images are skipped and
counted by reason in a :class:`ShardStats`; a truncated tar yields the samples before the damage.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Container, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import orjson
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import base_plus_ext

from pipeline.data.tarstream import iter_members

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
META_EXTS = ("json", "txt", "cls")
_TAR_BUFSIZE = 1 << 16  # tarfile's stream reads; its 10 KiB default means many small reads
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's convention for non-sample members


def expand_shards(spec: str | list[str], missing: list[str] | None = None) -> list[str]:
    """Shard URLs from a folder, a glob, a brace pattern ``{00000..00009}`` or a list of those.
    Local paths are checked: a missing one raises FileNotFoundError, or is appended to
    ``missing`` when a list is given (to report all of them); other fsspec URLs are taken as given."""
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        for one in braceexpand(item):
            if "://" in one and not one.startswith("file://"):
                fs, path = fsspec.core.url_to_fs(one)
                if fs.isdir(path):
                    urls += sorted(fs.unstrip_protocol(p) for p in fs.glob(path.rstrip("/") + "/*.tar"))
                else:
                    urls.append(one)
                continue
            one = one.removeprefix("file://")
            if os.path.isdir(one):
                urls += sorted(glob.glob(os.path.join(one, "*.tar")))
            elif any(c in one for c in "*?["):
                urls += sorted(glob.glob(one))
            elif os.path.isfile(one):
                urls.append(one)
            elif missing is not None:
                missing.append(one)
            else:
                raise FileNotFoundError(f"{one!r} does not exist")
    return urls


class NoDecodableImage(ValueError):
    """Every sample of the shards read was skipped (e.g. all images corrupt)."""


@dataclass
class ShardStats:
    """What happened to every sample of one shard."""

    read: int = 0  # keys seen; every one ends up yielded or in `skipped`
    decoded: int = 0
    skipped: Counter = field(default_factory=Counter)  # per-sample reason -> count (lost keys)
    problems: Counter = field(default_factory=Counter)  # shard-level: truncated_tar, bad_json, ...
    messages: list[str] = field(default_factory=list)  # the first few details, for the stats file
    record_keys: bool = False  # keep (key, reason) of every skipped sample (feature shards do)
    skipped_keys: list[tuple[str, str]] = field(default_factory=list)

    def _note(self, reason: str, detail: str) -> None:
        if detail and len(self.messages) < 10:
            self.messages.append(f"{reason}: {detail}")

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if self.record_keys:
            self.skipped_keys.append((key, reason))
        self._note(reason, f"{key}: {detail}" if detail else key)

    def problem(self, reason: str, detail: str = "") -> None:
        self.problems[reason] += 1
        self._note(reason, detail)

    def as_dict(self) -> dict:
        out = {"read": self.read, "decoded": self.decoded, "skipped": dict(self.skipped),
               "problems": dict(self.problems), "messages": list(self.messages)}
        if self.record_keys:
            out["skipped_keys"] = [list(kr) for kr in self.skipped_keys]
        return out


@dataclass
class Sample:
    key: str
    image: np.ndarray | None  # HWC uint8 (C = 1 or 3), None when not decoded
    label: int | None
    meta: dict
    caption: str | None = None  # key.txt
    # where the image member's bytes lie in an uncompressed tar (one ranged read fetches them);
    # None in compressed tars, which cannot be range-read
    offset: int | None = None
    nbytes: int | None = None


def _iter_files(url: str, stats: ShardStats, wanted: Callable[[str, str], bool] | None = None
                ) -> Iterator[tuple[str, str, int, bytes | None, int | None]]:
    """Regular files of a tar, streamed, as (key, extension, size, data, offset of the data);
    ``data`` is None for members ``wanted(key, ext)`` rejects (their bytes are skipped unread:
    seeked over locally); the offset is None in compressed tars.

    A truncated or corrupt tar ends the stream with a counted ``truncated_tar`` after the
    members before the damage; so does a file that ends without the end-of-archive blocks."""
    fs, path = fsspec.core.url_to_fs(url)
    size = fs.size(path)
    end, compressed = 0, False

    def member_filter(name: str) -> bool:
        prefix, suffix = base_plus_ext(name)
        return prefix is not None and (wanted is None or wanted(prefix, suffix.lower()))

    try:
        # Plain buffered open for local files: fsspec's local wrapper costs ~15% of a scan.
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        with open(path, "rb") if local else fs.open(path, "rb") as stream:
            compressed = stream.read(2) in (b"\x1f\x8b", b"BZ") or path.endswith(".xz")
            stream.seek(0)
            members = _tarfile_members(stream) if compressed else iter_members(stream, member_filter)
            for name, member_size, data, member_end in members:
                end = member_end
                if _META_MEMBER.match(name):
                    continue
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue
                start = None if compressed else member_end - _padded(member_size)
                yield prefix, suffix.lower(), member_size, data, start
    except (tarfile.TarError, EOFError, OSError, ValueError) as exn:
        stats.problem("truncated_tar", f"{url}: {exn}")
        return
    if size is not None and not compressed and size < end + 1024:
        stats.problem("truncated_tar", f"{url}: ends at byte {size}, before the end-of-archive blocks "
                                        f"(last whole member ends at {end})")


def _padded(size: int) -> int:
    return (size + 511) // 512 * 512  # tar members fill whole 512-byte blocks


def _tarfile_members(stream) -> Iterator[tuple[str, int, bytes, int]]:
    """Compressed tars: the standard library's stream reader (every member read)."""
    with tarfile.open(fileobj=stream, mode="r|*", bufsize=_TAR_BUFSIZE) as tar:
        for info in tar:
            if info.isreg():
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise EOFError(f"member {info.name} has {len(data)} of {info.size} bytes")
                yield info.name, info.size, data, 0  # no end check for compressed files
            tar.members = []


def iter_raw_samples(url: str, stats: ShardStats, wanted: Callable[[str, str], bool] | None = None
                     ) -> Iterator[dict]:
    """Group a tar's files by key: ``{"__key__": key, "__sizes__": {ext: n}, "__offsets__":
    {ext: byte offset or None}, ext: bytes | None}``."""
    current: dict | None = None
    for prefix, suffix, size, data, start in _iter_files(url, stats, wanted):
        if current is not None and current["__key__"] != prefix:
            yield current
            current = None
        if current is None:
            current = {"__key__": prefix, "__sizes__": {}, "__offsets__": {}}
        current[suffix] = data
        current["__sizes__"][suffix] = size
        current["__offsets__"][suffix] = start
    if current is not None:
        yield current


def decode_image(data: bytes, max_pixels: int, channels: int, size: int | None = None,
                 resize: int | None = None, interpolation: str = "bicubic") -> np.ndarray:
    """Decode to HWC uint8 with ``channels`` channels; with ``size``, resize the shorter side to
    ``resize`` (default ``size``) and centre-crop ``size`` x ``size`` (ImageNet models: 256 then
    224). Raises on corrupt or oversized images."""
    if not data:
        raise ValueError("empty image")
    # The pixel limit is checked from the header before decoding (decompression bombs); no
    # warnings filter here, since `warnings.catch_warnings` is not thread-safe.
    with Image.open(io.BytesIO(data)) as img:
        check_pixels(img, max_pixels)
        if size is not None and img.format == "JPEG":
            img.draft(img.mode, (resize or size, resize or size))  # DCT-domain downscale: cheaper
        img = img.convert("L" if channels == 1 else "RGB")
        if size is not None and img.size != (size, size):
            img = _resize_center_crop(img, size, resize or size, interpolation)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def check_pixels(img: Image.Image, max_pixels: int) -> None:
    """Raise OverflowError for an image larger than ``max_pixels``, from its header alone."""
    if img.width * img.height > max_pixels:
        raise OverflowError(f"{img.width}x{img.height} exceeds {max_pixels} pixels")


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def _resize_center_crop(img: Image.Image, size: int, resize: int, interpolation: str) -> Image.Image:
    if min(img.size) != resize:
        scale = resize / min(img.size)
        w, h = max(resize, round(img.width * scale)), max(resize, round(img.height * scale))
        img = img.resize((w, h), _RESAMPLE[interpolation])
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def _member_filter(decode: bool, keys: Container[str] | None, meta_exts: Container[str]
                   ) -> Callable[[str, str], bool]:
    """Which members to read: ``meta_exts`` always, images only when decoding; only ``keys``."""

    def wanted(key: str, ext: str) -> bool:
        if keys is not None and key not in keys:
            return False
        return ext in meta_exts or (decode and ext in IMAGE_EXTS)

    return wanted


def decode_or_reason(data: bytes, max_pixels: int, channels: int, size: int | None,
                     resize: int | None, interpolation: str):
    """(image, None) or (None, (skip reason, detail)); safe to run in decode threads."""
    return or_skip_reason(decode_image, data, max_pixels, channels, size, resize, interpolation)


def or_skip_reason(read: Callable, data: bytes, *args):
    """(read(data, *args), None), or (None, (skip reason, detail)) when ``read`` raises on the
    image: ``oversized_image`` or ``corrupt_image``."""
    try:
        return read(data, *args), None
    except (OverflowError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
        return None, ("oversized_image", str(exn))
    except Exception as exn:  # PIL raises many types for corrupt data
        return None, ("corrupt_image", f"{type(exn).__name__}: {exn}")


def _parsed_samples(url: str, stats: ShardStats, decode: bool, keys, meta_exts
                    ) -> Iterator[tuple[Sample, bytes | None]]:
    """Samples with their metadata parsed and their image bytes (not yet decoded)."""
    for raw in iter_raw_samples(url, stats, _member_filter(decode, keys, meta_exts)):
        key = raw["__key__"]
        if keys is not None and key not in keys:
            continue
        stats.read += 1
        meta = {}
        if raw.get("json") is not None:
            try:
                meta = orjson.loads(raw["json"])  # ~3x json.loads: metadata scans are per sample
            except ValueError as exn:
                stats.problem("bad_json", f"{key}: {exn}")
        label = None
        if raw.get("cls") is not None:
            try:
                label = int(raw["cls"].decode().strip())
            except ValueError:
                stats.skip("bad_label", key)
                continue
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            stats.skip("missing_image", key)
            continue
        if raw["__sizes__"][ext] == 0:
            stats.skip("empty_image", key)
            continue
        caption = None
        if raw.get("txt") is not None:
            caption = raw["txt"].decode("utf-8", errors="replace")
        yield Sample(key=key, image=None, label=label, meta=meta, caption=caption,
                     offset=raw["__offsets__"][ext], nbytes=raw["__sizes__"][ext]), raw[ext]


def iter_encoded(url: str, stats: ShardStats, *, keys: Container[str] | None = None,
                 meta_exts: Container[str] = META_EXTS) -> Iterator[tuple[Sample, bytes]]:
    """Samples of one shard with their image bytes still encoded (for a batch decoder on a GPU,
    ``pipeline.features.tensor_decode``): the same reading, key filter and skips as
    :func:`iter_samples`, which the caller completes by counting ``stats.decoded`` or skipping."""
    yield from _parsed_samples(url, stats, True, keys, meta_exts)


_PROCESS_POOLS: dict[int, ProcessPoolExecutor] = {}


def decode_process_pool(workers: int) -> ProcessPoolExecutor:
    """This process's pool of ``workers`` decode processes, started once and kept (an
    extraction worker reuses it for every shard). Spawned, not forked: the parent may hold CUDA
    and running threads, which a fork would copy half-way."""
    pool = _PROCESS_POOLS.get(workers)
    if pool is None:
        import multiprocessing

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        _PROCESS_POOLS[workers] = pool
    return pool


def _decode_chunk(datas: list[bytes], args: tuple) -> list:
    return [decode_or_reason(data, *args) for data in datas]


def iter_samples(
    url: str, stats: ShardStats, *, decode: bool = True, channels: int = 3,
    max_pixels: int = 89_478_485, size: int | None = None, keys: Container[str] | None = None,
    meta_exts: Container[str] = META_EXTS, resize: int | None = None,
    interpolation: str = "bicubic", workers: int = 0, lookahead: int = 256,
    processes: bool = False, chunk: int = 16,
) -> Iterator[Sample]:
    """Samples of one shard, in tar order, decoded (or metadata only, without reading image
    bytes), skipping and counting bad ones. With ``keys``, other samples are passed over unread
    and uncounted; metadata members other than ``meta_exts`` are not read.

    With ``workers`` > 0, images are decoded by that many threads up to ``lookahead`` samples
    ahead of the consumer, so decoding overlaps the model's forward pass (Pillow releases the
    GIL while decoding and resizing; torch while computing). With ``processes``, by that many
    processes instead (:func:`decode_process_pool`), ``chunk`` images per call: threads stop
    scaling at about one core's worth of images, because everything around the decode holds the
    GIL, which a GPU node with many cores cannot afford (docs/gpu.md)."""
    parsed = _parsed_samples(url, stats, decode, keys, meta_exts)
    if not decode:
        yield from (sample for sample, _ in parsed)
        return
    args = (max_pixels, channels, size, resize, interpolation)

    def finish(sample: Sample, result) -> Sample | None:
        image, reason = result
        if reason is not None:
            stats.skip(reason[0], sample.key, reason[1])
            return None
        stats.decoded += 1
        sample.image = image
        return sample

    if workers <= 0:
        for sample, data in parsed:
            if (done := finish(sample, decode_or_reason(data, *args))) is not None:
                yield done
        return
    if processes:
        yield from _process_decoded(parsed, finish, args, workers, lookahead, chunk)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        try:
            for sample, data in parsed:
                pending.append((sample, pool.submit(decode_or_reason, data, *args)))
                while len(pending) > lookahead:
                    sample0, future = pending.popleft()
                    if (done := finish(sample0, future.result())) is not None:
                        yield done
            while pending:
                sample0, future = pending.popleft()
                if (done := finish(sample0, future.result())) is not None:
                    yield done
        finally:
            for _, future in pending:  # consumer stopped early: drop queued work
                future.cancel()


def _process_decoded(parsed, finish, args: tuple, workers: int, lookahead: int, chunk: int
                     ) -> Iterator[Sample]:
    """iter_samples' decode by a process pool: chunks of ``chunk`` images, in order, at most
    ``lookahead`` images ahead."""
    pool = decode_process_pool(workers)
    pending: deque = deque()  # (samples, future of their decode results)
    queued = 0
    samples, datas = [], []

    def drain_one():
        nonlocal queued
        done_samples, future = pending.popleft()
        queued -= len(done_samples)
        for sample, result in zip(done_samples, future.result(), strict=True):
            if (done := finish(sample, result)) is not None:
                yield done

    try:
        for sample, data in parsed:
            samples.append(sample)
            datas.append(data)
            if len(samples) == chunk:
                pending.append((samples, pool.submit(_decode_chunk, datas, args)))
                queued += len(samples)
                samples, datas = [], []
                while queued > lookahead:
                    yield from drain_one()
        if samples:
            pending.append((samples, pool.submit(_decode_chunk, datas, args)))
            queued += len(samples)
        while pending:
            yield from drain_one()
    finally:
        for _, future in pending:  # consumer stopped early: drop queued work
            future.cancel()


def scan_shard(url: str, offsets: list | None = None) -> ShardStats:
    """Decode-free scan (keys and metadata only): ``read`` keys, of which ``read - skipped``
    carry an image and a valid label. With ``offsets`` (a list), appends each such sample's
    ``{key, offset, size, label}``: where its image bytes lie in the tar."""
    stats = ShardStats()
    for sample in iter_samples(url, stats, decode=False, meta_exts=("cls",)):
        if offsets is not None:
            offsets.append({"key": sample.key, "offset": sample.offset, "size": sample.nbytes,
                            "label": sample.label})
    return stats


def load_images(urls: list[str], channels: int, size: int | None = None,
                max_pixels: int = 89_478_485, limit: int | None = None,
                resize: int | None = None, interpolation: str = "bicubic") -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """Decode every sample of ``urls`` into memory (small datasets: training, queries).
    Returns keys, images [N, H, W, C] uint8, labels [N] (-1 when absent) and skip counts."""
    keys, images, labels = [], [], []
    skipped: Counter = Counter()
    for url in urls:
        stats = ShardStats()
        for s in iter_samples(url, stats, channels=channels, max_pixels=max_pixels, size=size,
                              resize=resize, interpolation=interpolation):
            keys.append(s.key)
            images.append(s.image)
            labels.append(-1 if s.label is None else s.label)
            if limit is not None and len(keys) >= limit:
                break
        skipped.update(stats.skipped)
        if limit is not None and len(keys) >= limit:
            break
    if not images:
        raise NoDecodableImage(f"no decodable image in {len(urls)} shard(s)")
    return keys, np.stack(images), np.asarray(labels, dtype=np.int64), dict(skipped)


def write_tar_shards(out_dir: str | os.PathLike, count: int, samples_per_shard: int,
                     sample_at: Callable[[int, str], dict]) -> list:
    """Write ``count`` samples as ``{shard:05d}.tar`` shards (img2dataset layout) with a
    ``_stats.json`` beside each; ``sample_at(row, key)`` gives a webdataset sample dict without
    its ``__key__``. Each tar is written under a temporary name, then renamed."""
    import json
    from pathlib import Path

    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for shard, start in enumerate(range(0, count, samples_per_shard)):
        final = out_dir / f"{shard:05d}.tar"
        tmp = final.with_suffix(".tar.tmp")
        rows = range(start, min(start + samples_per_shard, count))
        with wds.TarWriter(str(tmp)) as sink:
            for row in rows:
                key = f"{shard:05d}{row - start:06d}"
                sink.write({"__key__": key, **sample_at(row, key)})
        os.replace(tmp, final)
        stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0,
                 "failed_to_resize": 0}
        (out_dir / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
        written.append(final)
    return written
