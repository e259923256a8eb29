"""Batch image decoding with ``torchvision.io`` on the model's device: nvJPEG on a GPU, so a GPU
node's few CPU cores only read tars. Resize and centre crop run there too, with the same sizes
and rounding to uint8 levels as the CPU path (``pipeline.data.shards.decode_image``); pixels differ
from Pillow's by a few levels (full-resolution decode, torch's antialiased kernels). Images that
are not JPEG, or that torchvision cannot decode, go through the CPU path, which also names the
reason a sample is skipped.

The ``hybrid`` decoder: nvJPEG decodes every pixel of a JPEG, however large, before the resize
throws most away; Pillow's draft mode decodes a large JPEG at 1/2, 1/4 or 1/8 scale in the DCT
domain. So JPEGs whose header says their shorter side is at least ``DRAFT_FACTOR`` times the
model's resize side go to the CPU path (draft + resize + crop, ``decode_image``), in the task's
decode processes while nvJPEG decodes the rest of the batch; the rule depends only on the image
header, so the query side (``decode_like_database``) decodes each image the way the database
did."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipeline.data.shards import check_pixels, decode_image, decode_or_reason, or_skip_reason

BACKENDS = ("auto", "pil", "torchvision", "hybrid")
# hybrid: JPEGs at least this many times the resize side (shorter sides) are draft-decoded on
# the CPU; 2 is the smallest factor at which Pillow's draft decodes fewer pixels (1/2 scale).
DRAFT_FACTOR = 2


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """``auto``: torchvision (nvJPEG) when the model runs on a GPU, else Pillow in decode threads,
    which overlap the forward pass on CPU. ``device``: a device or its kind ("cpu", "cuda")."""
    if requested not in BACKENDS:
        raise ValueError(f"decode backend {requested!r}: use one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return "torchvision" if torch.device(device).type == "cuda" else "pil"
    return requested


def _header(data: bytes, max_pixels: int) -> tuple[str, int]:
    """(format, shorter side) from the image's header alone, the pixel limit checked."""
    with Image.open(io.BytesIO(data)) as img:
        check_pixels(img, max_pixels)
        return img.format, min(img.size)


def draft_on_cpu(fmt: str, shorter: int, size: int | None, resize: int | None) -> bool:
    """The hybrid decoder's rule: a JPEG at least ``DRAFT_FACTOR`` times the model's resize
    side is decoded by Pillow's draft mode on the CPU, not by nvJPEG at full resolution."""
    return fmt == "JPEG" and size is not None and shorter >= DRAFT_FACTOR * (resize or size)


def _jpegs_on_device(datas: list[bytes], device: torch.device, channels: int) -> list:
    """Decoded [C, H, W] uint8 tensors on ``device``, None where torchvision fails: one batched
    call, then one call per image only when the batch call raised."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    encoded = [torch.from_numpy(np.frombuffer(d, np.uint8).copy()) for d in datas]
    try:
        return list(decode_jpeg(encoded, mode=mode, device=device))
    except RuntimeError:
        out = []
        for e in encoded:
            try:
                out.append(decode_jpeg(e, mode=mode, device=device))
            except RuntimeError:
                out.append(None)
        return out


def resize_center_crop(img: torch.Tensor, size: int, resize: int, interpolation: str
                       ) -> torch.Tensor:
    """[C, H, W] uint8 -> [C, size, size] uint8: shorter side to ``resize`` (antialiased), then the
    centre ``size`` x ``size``; the output sizes follow the CPU path's rounding."""
    h, w = img.shape[1:]
    if min(h, w) != resize:
        scale = resize / min(h, w)
        nh, nw = max(resize, round(h * scale)), max(resize, round(w * scale))
        img = torch.nn.functional.interpolate(img[None].float(), size=(nh, nw), mode=interpolation,
                                              antialias=True, align_corners=False)[0]
        img = img.round_().clamp_(0, 255).to(torch.uint8)
    top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2
    return img[:, top:top + size, left:left + size]


def decode_batch(datas: list[bytes], device: torch.device | str, *, channels: int,
                 size: int | None, max_pixels: int, resize: int | None = None,
                 interpolation: str = "bicubic", hybrid: bool = False, cpu_decode=None
                 ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str, str]]]:
    """Decode encoded images into one [M, C, H, W] float batch in [0, 1] on ``device``.

    Returns the batch (None when nothing decoded), the positions in ``datas`` it holds, in order,
    and ``(position, reason, detail)`` for every image skipped (``corrupt_image``,
    ``oversized_image``: the CPU path's reasons).

    ``hybrid``: JPEGs that :func:`draft_on_cpu` picks take the CPU path instead of nvJPEG,
    through ``cpu_decode(datas, args)`` (it starts the decode, e.g. in a process pool, and
    returns a function giving ``decode_or_reason``'s results in order), so that they decode
    while nvJPEG decodes the rest; without it they are decoded here, in this thread."""
    device = torch.device(device)
    images: list = [None] * len(datas)
    skipped: list[tuple[int, str, str]] = []
    jpegs, drafted = [], []
    for i, data in enumerate(datas):
        header, reason = or_skip_reason(_header, data, max_pixels)
        if reason is not None:
            skipped.append((i, *reason))
        elif hybrid and draft_on_cpu(*header, size, resize):
            drafted.append(i)
        elif header[0] == "JPEG":
            jpegs.append(i)
    args = (max_pixels, channels, size, resize, interpolation)
    collect = None
    if drafted:
        cpu_decode = cpu_decode or _decode_here
        collect = cpu_decode([datas[i] for i in drafted], args)
    for i, img in zip(jpegs, _jpegs_on_device([datas[i] for i in jpegs], device, channels),
                      strict=True):
        if img is not None and size is not None:
            img = resize_center_crop(img, size, resize or size, interpolation)
        images[i] = img
    for i, (arr, reason) in zip(drafted, collect() if collect else [], strict=True):
        if reason is not None:
            skipped.append((i, *reason))
        else:
            images[i] = torch.from_numpy(np.array(arr)).permute(2, 0, 1).to(device)
    done = {i for i, _, _ in skipped}
    for i, data in enumerate(datas):  # not JPEG, or torchvision failed: the CPU path decides
        if images[i] is None and i not in done:
            arr, reason = decode_or_reason(data, max_pixels, channels, size, resize, interpolation)
            if reason is not None:
                skipped.append((i, *reason))
            else:
                images[i] = torch.from_numpy(np.array(arr)).permute(2, 0, 1).to(device)
    kept = [i for i, img in enumerate(images) if img is not None]
    if not kept:
        return None, [], sorted(skipped)
    if len({tuple(images[i].shape) for i in kept}) > 1:
        raise ValueError("images of different sizes in one batch: set the model's crop size")
    batch = torch.stack([images[i] for i in kept]).float().div_(255.0)
    return batch, kept, sorted(skipped)


def _decode_here(datas: list[bytes], args: tuple):
    results = [decode_or_reason(data, *args) for data in datas]
    return lambda: results


def decode_like_database(data: bytes, max_pixels: int, decoder: str, channels: int,
                         size: int | None, resize: int | None = None,
                         interpolation: str = "bicubic") -> np.ndarray:
    """One query image as HWC uint8, decoded the way the database's images were (the recipe's
    ``decoder``): Pillow, or torchvision's JPEG decode and resize run here on the CPU (hybrid:
    Pillow for the JPEGs :func:`draft_on_cpu` picks, torchvision for the others). Raises
    what :func:`pipeline.data.shards.decode_image` raises for bad bytes (non-JPEGs and anything
    torchvision cannot decode take that path, as in :func:`decode_batch`)."""
    args = dict(channels=channels, size=size, resize=resize, interpolation=interpolation)
    if decoder in ("torchvision", "hybrid") and data:
        fmt, shorter = _header(data, max_pixels)
        if fmt != "JPEG" or (decoder == "hybrid" and draft_on_cpu(fmt, shorter, size, resize)):
            return decode_image(data, max_pixels, **args)
        [img] = _jpegs_on_device([data], torch.device("cpu"), channels)
        if img is not None:
            if size is not None:
                img = resize_center_crop(img, size, resize or size, interpolation)
            return img.permute(1, 2, 0).contiguous().numpy()
    return decode_image(data, max_pixels, **args)


def load_images_like_database(urls: list[str], decoder: str, *, channels: int, size: int | None,
                              max_pixels: int, resize: int | None = None,
                              interpolation: str = "bicubic", only_keys=None
                              ) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """``pipeline.data.shards.load_images`` (keys, uint8 images, labels, skip counts), decoded
    the way the database's images were (the recipe's ``decoder``): evaluation queries must meet
    the database in the same pixels. ``only_keys``: decode only these samples (the others are
    passed over unread), in shard and tar order."""
    from collections import Counter

    from pipeline.data.shards import (
        NoDecodableImage,
        ShardStats,
        iter_encoded,
        iter_samples,
        load_images,
    )

    if decoder not in ("torchvision", "hybrid") and only_keys is None:
        return load_images(urls, channels, size, max_pixels, None, resize, interpolation)
    keys, images, labels = [], [], []
    skipped: Counter = Counter()
    for url in urls:
        stats = ShardStats()
        if decoder not in ("torchvision", "hybrid"):
            for s in iter_samples(url, stats, channels=channels, max_pixels=max_pixels, size=size,
                                  resize=resize, interpolation=interpolation, keys=only_keys):
                keys.append(s.key)
                images.append(s.image)
                labels.append(-1 if s.label is None else s.label)
            skipped.update(stats.skipped)
            continue
        for sample, data in iter_encoded(url, stats, keys=only_keys):
            # skipped and counted with the CPU path's reasons (oversized_image, corrupt_image)
            image, reason = or_skip_reason(decode_like_database, data, max_pixels, decoder,
                                           channels, size, resize, interpolation)
            if reason is not None:
                stats.skip(reason[0], sample.key, reason[1])
                continue
            keys.append(sample.key)
            images.append(image)
            labels.append(-1 if sample.label is None else sample.label)
        skipped.update(stats.skipped)
    if not images:
        raise NoDecodableImage(f"no decodable image in {len(urls)} shard(s)")
    return keys, np.stack(images), np.asarray(labels, dtype=np.int64), dict(skipped)
