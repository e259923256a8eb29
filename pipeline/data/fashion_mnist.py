"""Fashion-MNIST idx files -> webdataset tar shards in img2dataset's layout.

Each shard ``{shard:05d}.tar`` holds ``key.png`` (or jpg), ``key.json`` (metadata) and ``key.cls``
(label), with a ``{shard:05d}_stats.json`` beside it, as img2dataset writes them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
SPLITS = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_path(source_dir: str | os.PathLike, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        path = Path(source_dir) / name
        if path.is_file():
            return path
    return None


def missing_files(source_dir: str | os.PathLike) -> list[str]:
    """The idx files that ``source_dir`` lacks (``.gz`` or raw)."""
    stems = [f"{p}-{k}" for p in SPLITS.values() for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    return [s + "[.gz]" for s in stems if _idx_path(source_dir, s) is None]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or raw."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = data[4 + 4 * ndim :]
    if len(payload) != expected:
        raise ValueError(f"{path}: truncated idx file ({len(payload)} of {expected} bytes)")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def load_split(source_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of ``split`` ('train' or 'test')."""
    prefix = SPLITS[split]
    paths = [_idx_path(source_dir, f"{prefix}-{k}") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if None in paths:
        raise FileNotFoundError(f"{source_dir}: missing {missing_files(source_dir)}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if len(images) != len(labels):
        raise ValueError(f"{source_dir}: {len(images)} images but {len(labels)} labels in {split}")
    return images, labels.astype(np.int64)


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
    return buf.getvalue()


def write_split_shards(
    images: np.ndarray, labels: np.ndarray, out_dir: str | os.PathLike, split: str,
    samples_per_shard: int, image_format: str = "png",
) -> list[Path]:
    """Write ``images`` as tar shards under ``out_dir``; each tar is written then renamed."""
    from pipeline.data.shards import write_tar_shards

    def sample_at(row: int, key: str) -> dict:
        label = int(labels[row])
        return {image_format: encode_image(images[row], image_format),
                "json": {"key": key, "split": split, "source_index": row, "label": label,
                         "class_name": CLASS_NAMES[label] if label < len(CLASS_NAMES) else str(label)},
                "cls": label}

    return write_tar_shards(out_dir, len(images), samples_per_shard, sample_at)


def import_fashion_mnist(
    source_dir: str, out_dir: str, samples_per_shard: int = 4000, limit: int | None = None,
    image_format: str = "png",
) -> dict[str, Path]:
    """Import both splits; skipped when a completion marker with the same settings exists."""
    settings = {"source_dir": str(Path(source_dir).resolve()), "samples_per_shard": samples_per_shard,
                "limit": limit, "image_format": image_format}
    marker = Path(out_dir) / "_import.json"
    folders = {split: Path(out_dir) / split for split in SPLITS}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return folders
    for split, folder in folders.items():
        images, labels = load_split(source_dir, split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        for stale in folder.glob("*.tar") if folder.exists() else []:
            stale.unlink()
        write_split_shards(images, labels, folder, split, samples_per_shard, image_format)
    marker.write_text(json.dumps(settings))  # written last: the import is complete
    return folders
