"""Decontamination: database images that are duplicates or near-duplicates of evaluation images,
found with the job's own feature index (``knn-defense decontaminate``).

A query and a database image are near-duplicates when their feature distance at one layer (the
index's own: squared L2, or Hamming for binary codes) is below a threshold. The layer and the
threshold are calibrated on a seeded sample of the query images:

- positives: each sampled image against its augmented copies (JPEG re-encode, a resize, a crop,
  a horizontal flip, a small colour change; Pillow), each copy re-encoded and decoded the way
  the database's images were, so it meets the query in the same pixels a planted copy would;
- negatives: each sampled image against its nearest database images (as many as there are
  augmentations, so the two classes are about the same size), assumed to be distinct images.
  The sample may hold queries that really have a copy in the database (what the command looks
  for), so two kinds of negatives are set aside as likely true duplicates rather than counted:
  one closer to the query than the query's own closest augmented copy, and a nearest image that
  stands out (Lowe's ratio test: its distance under ``RATIO`` times the second nearest's). A
  true duplicate that passes both still counts as a false positive: the calibration precision
  is a lower bound.

Per layer the threshold is the largest one whose precision on the calibration pairs is at least
``TARGET_PRECISION`` (else the one of maximum F1, and the report says so); the layer is the one
with the best recall at its threshold. Then every query image is streamed in batches through
the classifier and the index, and each pair closer than the threshold is written to
``eval/decontaminate/duplicates.parquet`` with a ``report.json`` beside it.

The job's evaluate stage only reads that list (``evaluate.decontaminate: exclude``); removing the
images from the database is the runner's job (``remove``), never evaluate's.
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from pipeline.evaluate.grid import wilson_interval

AUGMENTATIONS = ("jpeg", "resize", "crop", "hflip", "colour")
TARGET_PRECISION = 0.99
RATIO = 0.5  # a nearest image closer than this times the second nearest's distance stands out
COLUMNS = ("query_key", "query_url", "db_id", "db_key", "distance")


def output_dir(job_dir: str | os.PathLike) -> Path:
    from pipeline.layout import JobLayout

    return JobLayout(job_dir).eval_dir / "decontaminate"


def duplicates_path(job_dir: str | os.PathLike) -> Path:
    return output_dir(job_dir) / "duplicates.parquet"


class NotDecontaminated(FileNotFoundError):
    """``evaluate.decontaminate: exclude`` without a duplicates list to read."""


# --- augmented copies ----------------------------------------------------------------------------

def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def augment(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """An encoded near-duplicate of the encoded image ``data``: re-encoded as JPEG (quality
    70-85), resized down (50-75%) and back, cropped (85-95% of each side, anywhere) and resized
    back to the original size, flipped horizontally, or with brightness and contrast (and, in
    colour images, saturation) changed by up to 10%. All but ``jpeg`` are written as PNG, so
    each copy carries one change."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("L" if img.mode in ("L", "1", "I;16", "I") else "RGB")
    w, h = img.size
    if kind == "jpeg":
        return _encode(img, "JPEG", quality=int(rng.integers(70, 86)))
    if kind == "resize":
        s = rng.uniform(0.5, 0.75)
        small = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        img = small.resize((w, h), Image.BICUBIC)
    elif kind == "crop":
        cw, ch = max(1, round(w * rng.uniform(0.85, 0.95))), max(1, round(h * rng.uniform(0.85, 0.95)))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
    elif kind == "hflip":
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    elif kind == "colour":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.9, 1.1))
        if img.mode == "RGB":
            img = ImageEnhance.Color(img).enhance(rng.uniform(0.9, 1.1))
    else:
        raise ValueError(f"unknown augmentation {kind!r}: one of {AUGMENTATIONS}")
    return _encode(img, "PNG")


# --- features and distances ---------------------------------------------------------------------

def layer_vectors(defense, images: np.ndarray, layers: list[str]) -> dict[str, np.ndarray]:
    """What the index searches for ``images`` (HWC uint8) at each layer, from one forward pass
    per batch: the database's own path (pooling, PCA, storage code)."""
    from pipeline.features.backbones import images_to_tensor
    from pipeline.features.extract import forward_features, stack_poolers

    x = images_to_tensor(images)
    poolers = stack_poolers({name: defense.transforms[name] for name in layers})
    out: dict[str, list] = {name: [] for name in layers}
    with torch.no_grad():
        for start in range(0, len(x), defense.batch_size):
            pooled, _ = forward_features(defense.model, x[start:start + defense.batch_size],
                                         layers, poolers)
            for name in layers:
                out[name].append(defense.transforms[name].query_vectors(pooled[name]))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def pair_distances(transform, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise distance of ``a[i]`` and ``b[i]`` as the layer's index measures it: squared L2
    of float vectors, or Hamming of packed binary codes."""
    if transform.binary:
        return np.unpackbits(np.bitwise_xor(a, b), axis=1).sum(1).astype(np.float32)
    diff = np.asarray(a, np.float32) - np.asarray(b, np.float32)
    return (diff * diff).sum(1)


def metric_name(transform) -> str:
    return "hamming" if transform.binary else "squared_l2"


# --- thresholds and scores ----------------------------------------------------------------------

def choose_threshold(positives: np.ndarray, negatives: np.ndarray,
                     target: float = TARGET_PRECISION) -> tuple[float, str]:
    """(threshold, rule): the largest threshold T whose pairs ``distance < T`` have precision
    >= ``target`` on these pairs; when none reaches it, the threshold of maximum F1. T lies
    half-way between the last distance it takes in and the next one."""
    d = np.concatenate([positives, negatives]).astype(np.float64)
    label = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    order = np.argsort(d, kind="stable")
    d, label = d[order], label[order]
    tp, fp = np.cumsum(label), np.cumsum(1 - label)
    cut = np.r_[d[1:] > d[:-1], True]  # a threshold can fall only between distinct distances
    precision = tp / (tp + fp)
    ok = cut & (precision >= target) & (tp > 0)
    if ok.any():
        i = int(np.flatnonzero(ok)[-1])
        rule = f"largest threshold with precision >= {target:g} on the calibration pairs"
    else:
        f1 = np.where(cut, 2 * tp / (tp + fp + len(positives)), -1)
        i = int(np.argmax(f1))
        rule = f"maximum F1 on the calibration pairs (no threshold reached precision {target:g})"
    upper = d[i + 1] if i + 1 < len(d) else d[i] + max(abs(d[i]) * 1e-3, 1e-6)
    return float((d[i] + upper) / 2), rule


def _rate(hits: int, n: int) -> dict:
    """A proportion with its 95% Wilson interval (None when n is 0)."""
    if not n:
        return {"value": None, "ci95": [None, None], "hits": int(hits), "n": 0}
    lo, hi = wilson_interval(int(hits), int(n))
    return {"value": round(hits / n, 4), "ci95": [round(lo, 4), round(hi, 4)],
            "hits": int(hits), "n": int(n)}


def _nearest_kept(negatives: np.ndarray) -> np.ndarray:
    """Each row's first negative that was kept (NaN: set aside or no result)."""
    kept = np.isfinite(negatives)
    first = np.where(kept.any(1), kept.argmax(1), 0)
    return np.where(kept.any(1), negatives[np.arange(len(negatives)), first], np.nan)


def calibration_scores(positives: dict[str, np.ndarray], negatives: np.ndarray,
                       threshold: float) -> dict:
    """Precision, recall and false-positive rate of ``distance < threshold`` on the
    calibration pairs (95% Wilson intervals): overall (every augmentation's positives against
    every kept negative, about as many of each), and per augmentation (its positives against
    each query's nearest kept database image, again about as many of each). ``negatives``
    [N, A]: NaN where set aside or missing."""
    pos_all = np.concatenate(list(positives.values()))
    kept = negatives[np.isfinite(negatives)]
    tp, fp = int((pos_all < threshold).sum()), int((kept < threshold).sum())
    nearest = _nearest_kept(negatives)
    nearest_fp = int((nearest[np.isfinite(nearest)] < threshold).sum())
    per_aug = {}
    for kind, pos in positives.items():
        tp_a = int((pos < threshold).sum())
        per_aug[kind] = {"recall": _rate(tp_a, len(pos)),
                         "precision": _rate(tp_a, tp_a + nearest_fp)}
    return {"precision": _rate(tp, tp + fp), "recall": _rate(tp, len(pos_all)),
            "false_positive_rate": _rate(fp, kept.size),
            # a distinct query's nearest database image flagged: the share of clean queries the
            # scan will report as having a duplicate
            "nearest_false_positive_rate": _rate(nearest_fp, int(np.isfinite(nearest).sum())),
            "positives": len(pos_all), "negatives": int(kept.size),
            "negatives_set_aside": int(negatives.size - kept.size),
            "per_augmentation": per_aug}


# --- reading the query shards -------------------------------------------------------------------

def _decode_settings(defense, max_pixels: int) -> dict:
    from pipeline.features.backbones import decode_args

    return {"max_pixels": max_pixels, "decoder": defense.decoder, **decode_args(defense.model)}


def _decode(data: bytes, settings: dict):
    """(HWC uint8 image decoded the way the database's images were, None) or (None, reason)."""
    from pipeline.data.shards import or_skip_reason
    from pipeline.features.tensor_decode import decode_like_database

    s = settings
    return or_skip_reason(decode_like_database, data, s["max_pixels"], s["decoder"], s["channels"],
                          s["size"], s["resize"], s["interpolation"])


def list_queries(urls: list[str]) -> tuple[list[str], list[int]]:
    """Keys and shard positions of every query sample with an image (decode-free)."""
    from pipeline.data.shards import ShardStats, iter_samples

    keys, where = [], []
    for u, url in enumerate(urls):
        for sample in iter_samples(url, ShardStats(), decode=False, meta_exts=()):
            keys.append(sample.key)
            where.append(u)
    return keys, where


def calibration_sample(urls: list[str], n: int, seed: int) -> list[bytes]:
    """The encoded bytes of ``n`` query images drawn with ``seed`` (read from only the shards
    holding them)."""
    from pipeline.data.shards import ShardStats, iter_encoded

    keys, where = list_queries(urls)
    if not keys:
        return []
    picked = np.sort(np.random.default_rng(seed).choice(len(keys), min(n, len(keys)), replace=False))
    by_shard: dict[int, set] = {}
    for i in picked:
        by_shard.setdefault(where[i], set()).add(keys[i])
    out = []
    for u, wanted in sorted(by_shard.items()):
        out += [data for _, data in iter_encoded(urls[u], ShardStats(), keys=wanted)]
    return out


def calibrate(defense, sample: list[bytes], layers: list[str], settings: dict, seed: int
              ) -> dict:
    """Per layer: the positives' distances per augmentation [N] and the negatives' [N, A]
    (NaN: no result, or set aside as a likely true duplicate: closer than the query's own
    closest augmented copy, or a nearest image under ``RATIO`` times the second's distance)."""
    originals, copies = [], {kind: [] for kind in AUGMENTATIONS}
    rng = np.random.default_rng(seed)
    for data in sample:
        image, reason = _decode(data, settings)
        if reason is not None:
            continue
        made = {}
        for kind in AUGMENTATIONS:
            copy, why = _decode(augment(data, kind, rng), settings)
            if why is not None:
                break
            made[kind] = copy
        else:
            originals.append(image)
            for kind in AUGMENTATIONS:
                copies[kind].append(made[kind])
    if not originals:
        raise ValueError("no calibration image could be decoded and augmented")
    base = layer_vectors(defense, np.stack(originals), layers)
    augmented = {kind: layer_vectors(defense, np.stack(imgs), layers) for kind, imgs in copies.items()}
    out = {}
    for layer in layers:
        found = defense.searcher.neighbours(layer, base[layer], len(AUGMENTATIONS) + 1)
        positives = {kind: pair_distances(defense.transforms[layer], base[layer],
                                          augmented[kind][layer]) for kind in AUGMENTATIONS}
        closest_copy = np.min(np.stack(list(positives.values())), axis=0)
        dist = found.distances.astype(np.float32)
        stands_out = (found.ids[:, 1] >= 0) & (dist[:, 0] < RATIO * dist[:, 1])
        negatives = dist[:, :len(AUGMENTATIONS)].copy()
        aside = (found.ids[:, :len(AUGMENTATIONS)] < 0) | (negatives < closest_copy[:, None])
        aside[:, 0] |= stands_out
        negatives[aside] = np.nan
        out[layer] = {"positives": positives, "negatives": negatives}
    out["_images"] = len(originals)
    return out


def iter_query_batches(urls: list[str], settings: dict, batch_size: int, skipped: Counter):
    """(keys, urls, HWC uint8 images) of the query shards, ``batch_size`` at a time, decoded the
    way the database's images were; undecodable samples are counted in ``skipped``."""
    from pipeline.data.shards import ShardStats, iter_encoded

    keys, where, images = [], [], []
    for url in urls:
        stats = ShardStats()
        for sample, data in iter_encoded(url, stats):
            image, reason = _decode(data, settings)
            if reason is not None:
                stats.skip(reason[0], sample.key, reason[1])
                continue
            keys.append(sample.key)
            where.append(url)
            images.append(image)
            if len(images) == batch_size:
                yield keys, where, np.stack(images)
                keys, where, images = [], [], []
        skipped.update(stats.skipped)
    if images:
        yield keys, where, np.stack(images)


# --- the command ---------------------------------------------------------------------------------

def decontaminate(job_dir: str | os.PathLike, query_urls: list[str], *, layer: str | None = None,
                  threshold: float | None = None, k: int = 10, calibration_images: int = 500,
                  seed: int = 0, batch_size: int = 256, log=None) -> dict:
    """Find the database images closer than the threshold to any image of ``query_urls``;
    writes ``duplicates.parquet`` and ``report.json`` under the job's
    ``eval/decontaminate/`` and returns the report."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import ConfigError
    from pipeline.defense.classifier import DefendedClassifier
    from pipeline.jobfolder import load_spec
    from pipeline.layout import atomic_write_bytes, write_json

    say = log or (lambda msg: None)
    if not query_urls:
        raise ConfigError("--queries matches no .tar shard")
    if threshold is not None and layer is None:
        raise ConfigError("--threshold needs --layer (each layer's distances have their own scale)")
    if not Path(job_dir, "job.yaml").is_file():
        raise FileNotFoundError(f"{job_dir}: not a job folder (no job.yaml)")
    spec = load_spec(job_dir)
    if layer is not None and layer not in spec.features.layers:
        raise ConfigError(f"--layer {layer}: the job's layers are {', '.join(spec.features.layers)}")
    t0 = time.time()
    defense = DefendedClassifier.from_job(job_dir, layer=layer)
    try:
        settings = _decode_settings(defense, spec.data.max_image_pixels)
        layers = [layer] if layer else list(defense.layers)
        sample = calibration_sample(query_urls, calibration_images, seed)
        if not sample:
            raise ConfigError(f"--queries: no image in {len(query_urls)} shard(s)")
        say(f"calibrating on {len(sample)} query images x {len(AUGMENTATIONS)} augmentations, "
            f"layers {', '.join(layers)}")
        pairs = calibrate(defense, sample, layers, settings, seed)
        per_layer = {}
        for name in layers:
            pos, neg = pairs[name]["positives"], pairs[name]["negatives"]
            if threshold is not None:
                t, rule = float(threshold), "given (--threshold)"
            else:
                t, rule = choose_threshold(np.concatenate(list(pos.values())),
                                           neg[np.isfinite(neg)])
            per_layer[name] = {"threshold": t, "rule": rule,
                               **calibration_scores(pos, neg, t)}
        if layer is None:
            # best recall at its threshold; then fewer false positives; then the earlier layer
            chosen = max(layers, key=lambda n: (per_layer[n]["recall"]["value"],
                                                -(per_layer[n]["false_positive_rate"]["value"] or 0),
                                                -layers.index(n)))
            layer_rule = "the layer with the best calibration recall at its threshold"
        else:
            chosen, layer_rule = layer, "given (--layer)"
        t = per_layer[chosen]["threshold"]
        say(f"layer {chosen}, threshold {t:.6g}: calibration precision "
            f"{per_layer[chosen]['precision']['value']:.3f}, recall {per_layer[chosen]['recall']['value']:.3f}")

        rows = {c: [] for c in COLUMNS}
        skipped: Counter = Counter()
        scanned = with_dup = 0
        for keys, urls, images in iter_query_batches(query_urls, settings, batch_size, skipped):
            vectors = layer_vectors(defense, images, [chosen])[chosen]
            found = defense.searcher.neighbours(chosen, vectors, k)
            hit = (found.ids >= 0) & (found.distances < t)
            scanned += len(keys)
            with_dup += int(hit.any(1).sum())
            qi, kj = np.nonzero(hit)
            ids = found.ids[qi, kj]
            rows["query_key"] += [keys[i] for i in qi]
            rows["query_url"] += [urls[i] for i in qi]
            rows["db_id"] += ids.tolist()
            rows["db_key"] += list(defense.keys_of(ids)) if len(ids) else []
            rows["distance"] += found.distances[qi, kj].astype(np.float32).tolist()
            if scanned % (batch_size * 20) < len(keys):
                say(f"{scanned} queries scanned, {with_dup} with a near-duplicate")
    finally:
        defense.close()
    table = pa.table({"query_key": pa.array(rows["query_key"], pa.string()),
                      "query_url": pa.array(rows["query_url"], pa.string()),
                      "db_id": pa.array(rows["db_id"], pa.int64()),
                      "db_key": pa.array(rows["db_key"], pa.string()),
                      "distance": pa.array(rows["distance"], pa.float32())})
    out = output_dir(job_dir)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(out / "duplicates.parquet", buf.getvalue())
    cal = per_layer[chosen]
    report = {
        "layer": chosen, "threshold": t, "metric": metric_name(defense.transforms[chosen]),
        "how_chosen": {"threshold": cal["rule"], "layer": layer_rule,
                       "target_precision": TARGET_PRECISION},
        "k": k,
        "calibration": {
            "images": pairs["_images"], "seed": seed, "augmentations": list(AUGMENTATIONS),
            "negatives_are": (f"each calibration image's {len(AUGMENTATIONS)} nearest database "
                              "images, assumed distinct, except likely true duplicates, set "
                              "aside: those closer than the image's own closest augmented copy, "
                              f"and a nearest image under {RATIO:g} times the second's distance; "
                              "precision is a lower bound"),
            **{key: cal[key] for key in ("precision", "recall", "false_positive_rate",
                                         "nearest_false_positive_rate",
                                         "positives", "negatives", "negatives_set_aside",
                                         "per_augmentation")},
            "per_layer": {n: {"threshold": v["threshold"], "rule": v["rule"],
                              "precision": v["precision"]["value"], "recall": v["recall"]["value"],
                              "false_positive_rate": v["false_positive_rate"]["value"]}
                          for n, v in per_layer.items()},
        },
        "queries": list(query_urls),
        "queries_scanned": scanned, "queries_skipped": dict(skipped),
        "queries_with_duplicate": with_dup,
        # how many of those the calibration expects to be look-alikes, not copies (95% interval)
        "expected_false_queries": [round(scanned * x) if x is not None else None for x in
                                   (cal["nearest_false_positive_rate"]["value"],
                                    *cal["nearest_false_positive_rate"]["ci95"])],
        "database_images_found": len(set(rows["db_id"])),
        "pairs": len(rows["db_id"]),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(out / "report.json", report)
    return report


def read_duplicates(job_dir: str | os.PathLike, mode: str) -> dict:
    """What ``evaluate.decontaminate: exclude`` drops: the query keys with a near-duplicate in
    the database and how many database images those are; refuses (one line) without the list."""
    import pyarrow.parquet as pq

    path = duplicates_path(job_dir)
    if not path.is_file():
        raise NotDecontaminated(
            f"{path}: missing (evaluate.decontaminate: {mode}): run `knn-defense decontaminate "
            f"{job_dir} --queries SHARDS` first")
    table = pq.read_table(path, columns=["query_key", "db_id"])
    return {"query_keys": set(table.column("query_key").to_pylist()),
            "database_images": len(set(table.column("db_id").to_pylist()))}
