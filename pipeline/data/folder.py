"""Pack a folder of labelled image files into webdataset tar shards (img2dataset layout).

The image bytes are stored as they are (no re-encoding); the label comes from the file name
through a regular expression, e.g. foolbox's ``imagenet_07_559.jpg`` with ``_(\\d+)\\.[^.]+$``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def label_from_name(path: Path, pattern: str | None) -> int | None:
    """The first group of ``pattern`` in the file name, as an int; None without a pattern."""
    if pattern is None:
        return None
    match = re.search(pattern, path.name)
    if match is None:
        raise ValueError(f"{path}: file name does not match the label pattern {pattern!r}; "
                         "rename the file or pass another --label-pattern")
    return int(match.group(1))


def pack_image_folder(source: str | os.PathLike, out_dir: str | os.PathLike,
                      label_pattern: str | None = None, samples_per_shard: int = 10000,
                      glob: str = "*") -> dict:
    """Write every image file under ``source`` matching ``glob`` (sorted, recursive) into tar shards with
    ``.cls`` labels and a ``.json`` holding the original file name; each tar is written under a
    temporary name then renamed, with an img2dataset-style ``_stats.json`` beside it."""
    files = sorted(p for p in Path(source).rglob(glob) if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{source}: no image files matching {glob!r} "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    labels = [label_from_name(p, label_pattern) for p in files]  # fail before writing anything
    from pipeline.data.shards import write_tar_shards

    def sample_at(row: int, key: str) -> dict:
        path = files[row]
        sample = {path.suffix.lower().lstrip(".").replace("jpeg", "jpg"): path.read_bytes(),
                  "json": {"key": key, "file": path.name}}
        if labels[row] is not None:
            sample["cls"] = labels[row]
            sample["json"]["label"] = labels[row]
        return sample

    shards = [str(p) for p in write_tar_shards(out_dir, len(files), samples_per_shard, sample_at)]
    return {"images": len(files), "shards": shards, "labelled": label_pattern is not None}
