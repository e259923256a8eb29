"""Pack a folder of labelled image files into webdataset tar shards (img2dataset layout).

The image bytes are stored as they are (no re-encoding); the label comes from the file name
through a regular expression, e.g. foolbox's ``imagenet_07_559.jpg`` with ``_(\\d+)\\.[^.]+$``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import webdataset as wds

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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard, start in enumerate(range(0, len(files), samples_per_shard)):
        final = out_dir / f"{shard:05d}.tar"
        tmp = final.with_suffix(".tar.tmp")
        chunk = range(start, min(start + samples_per_shard, len(files)))
        with wds.TarWriter(str(tmp)) as sink:
            for row in chunk:
                path, key = files[row], f"{shard:05d}{row - start:06d}"
                sample = {"__key__": key, path.suffix.lower().lstrip(".").replace("jpeg", "jpg"):
                          path.read_bytes(), "json": {"key": key, "file": path.name}}
                if labels[row] is not None:
                    sample["cls"] = labels[row]
                    sample["json"]["label"] = labels[row]
                sink.write(sample)
        os.replace(tmp, final)
        (out_dir / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0,
             "failed_to_resize": 0}))
        shards.append(str(final))
    return {"images": len(files), "shards": shards, "labelled": label_pattern is not None}
