"""Batch image decoding with ``torchvision.io`` on the model's device: nvJPEG on a GPU, so a GPU
node's few CPU cores only read tars. Resize and centre crop run there too, with the same sizes
and rounding to uint8 levels as the CPU path (``pipeline.data.shards.decode_image``); pixels differ
from Pillow's by a few levels (full-resolution decode, torch's antialiased kernels). Images that
are not JPEG, or that torchvision cannot decode, go through the CPU path, which also names the
reason a sample is skipped."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipeline.data.shards import check_pixels, decode_image, decode_or_reason, or_skip_reason

BACKENDS = ("auto", "pil", "torchvision")


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """``auto``: torchvision (nvJPEG) when the model runs on a GPU, else Pillow in decode threads,
    which overlap the forward pass on CPU. ``device``: a device or its kind ("cpu", "cuda")."""
    if requested not in BACKENDS:
        raise ValueError(f"decode backend {requested!r}: use one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return "torchvision" if torch.device(device).type == "cuda" else "pil"
    return requested


def _format(data: bytes, max_pixels: int) -> str:
    """The image's format, from its header alone (the pixel limit checked as the CPU path does)."""
    with Image.open(io.BytesIO(data)) as img:
        check_pixels(img, max_pixels)
        return img.format


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
                 interpolation: str = "bicubic"
                 ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str, str]]]:
    """Decode encoded images into one [M, C, H, W] float batch in [0, 1] on ``device``.

    Returns the batch (None when nothing decoded), the positions in ``datas`` it holds, in order,
    and ``(position, reason, detail)`` for every image skipped (``corrupt_image``,
    ``oversized_image``: the CPU path's reasons)."""
    device = torch.device(device)
    images: list = [None] * len(datas)
    skipped: list[tuple[int, str, str]] = []
    jpegs = []
    for i, data in enumerate(datas):
        fmt, reason = or_skip_reason(_format, data, max_pixels)
        if reason is not None:
            skipped.append((i, *reason))
        elif fmt == "JPEG":
            jpegs.append(i)
    for i, img in zip(jpegs, _jpegs_on_device([datas[i] for i in jpegs], device, channels),
                      strict=True):
        if img is not None and size is not None:
            img = resize_center_crop(img, size, resize or size, interpolation)
        images[i] = img
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


def decode_like_database(data: bytes, max_pixels: int, decoder: str, channels: int,
                         size: int | None, resize: int | None = None,
                         interpolation: str = "bicubic") -> np.ndarray:
    """One query image as HWC uint8, decoded the way the database's images were (the recipe's
    ``decoder``): Pillow, or torchvision's JPEG decode and resize run here on the CPU. Raises
    what :func:`pipeline.data.shards.decode_image` raises for bad bytes (non-JPEGs and anything
    torchvision cannot decode take that path, as in :func:`decode_batch`)."""
    args = dict(channels=channels, size=size, resize=resize, interpolation=interpolation)
    if decoder == "torchvision" and data and _format(data, max_pixels) == "JPEG":
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

    if decoder != "torchvision" and only_keys is None:
        return load_images(urls, channels, size, max_pixels, None, resize, interpolation)
    keys, images, labels = [], [], []
    skipped: Counter = Counter()
    for url in urls:
        stats = ShardStats()
        if decoder != "torchvision":
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
