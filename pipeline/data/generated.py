"""Generated shards shaped like an Instagram crawl (img2dataset layout) for smoke runs of the
ImageNet jobs on a laptop: RGB JPEGs, a json with a caption and hashtags (some from the ImageNet
hashtag vocabulary, so IG-N-Targeted has something to select), and an ImageNet-1k class label.

Each image is noise with a coloured bar whose colour and height follow the label, so a
classifier's neighbours are not arbitrary; nothing here claims to look like a photo.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.data.hashtags import load_vocabulary

# Common tags that match no ImageNet class (IG-N-Targeted must skip posts carrying only these).
PLAIN_TAGS = ["love", "instagood", "photooftheday", "travel", "nature", "selfie", "summer",
              "blessed", "friends", "fun"]


def _image(rng: np.random.Generator, label: int, size: int) -> bytes:
    pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], np.uint8)
    top = (label * 7) % (size - size // 4)
    pixels[top:top + size // 4, size // 8:-size // 8] = colour
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_generated_shards(out_dir: str | os.PathLike, shards: int = 4, per_shard: int = 32,
                           size: int = 96, seed: int = 0, tagged_fraction: float = 0.5,
                           num_classes: int = 1000) -> list[Path]:
    """Write ``shards`` tars of ``per_shard`` samples under ``out_dir`` (each written, then
    renamed); about ``tagged_fraction`` of the samples carry a vocabulary hashtag of their class."""
    vocab = load_vocabulary()
    tag_of_class: dict[int, str] = {}
    for tag, classes in sorted(vocab.hashtags.items()):
        for c in classes:
            tag_of_class.setdefault(c, tag)
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for shard in range(shards):
        final = out_dir / f"{shard:05d}.tar"
        tmp = final.with_suffix(".tar.tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for row in range(per_shard):
                key = f"{shard:05d}{row:04d}"
                label = int(rng.integers(0, num_classes))
                tags = list(rng.choice(PLAIN_TAGS, int(rng.integers(1, 4)), replace=False))
                if rng.random() < tagged_fraction and label in tag_of_class:
                    tags.insert(int(rng.integers(0, len(tags) + 1)), tag_of_class[label])
                caption = "a day out " + " ".join(f"#{t}" for t in tags)
                sink.write({"__key__": key, "jpg": _image(rng, label, size),
                            "json": {"key": key, "caption": caption, "tags": tags,
                                     "width": size, "height": size, "status": "success"},
                            "cls": label})
        os.replace(tmp, final)
        written.append(final)
    return written
