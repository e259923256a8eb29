"""Agreement between feature recipes (pipeline/features/recipe.py): does a database built with one
arithmetic (GPU bf16, GPU fp32/TF32, CPU bf16 emulation) still serve queries made by another (the
query path: CPU fp32)?

Two rates, each with its Wilson 95% interval:

- **self-retrieval**: a database image, queried through the query recipe, finds itself at rank 1
  among the database made by the other recipe (ties at the same distance, i.e. exact duplicate
  images, count as found);
- **decision agreement**: the defense's decision (kNN vote over K neighbours, UW and CBW-D) for a
  query is the same with the other recipe's database as with the query recipe's own.

The CPU run (``python benchmarks/recipe_agreement.py``) measures CPU bf16 autocast against CPU
fp32 on Fashion-MNIST (a trained SmallResNet, 5,000 database images queried for self-retrieval
against the 60,000-image database, 5,000 test images for decisions) and on EfficientNet-Lite0
(real weights) over crops of foolbox's ImageNet photos; ``benchmarks/gpu_check.py`` uses the same
functions for GPU recipes. Writes benchmarks/results/recipe_agreement.json.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.features.extract import forward_features, to_device  # noqa: E402
from pipeline.weighting import neighbour_weights, vote  # noqa: E402

K = 50


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score 95% interval of a rate."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 5), round(min(1.0, centre + half), 5)]


def rate(successes: int, n: int) -> dict:
    return {"rate": round(successes / max(n, 1), 5), "n": int(n), "ci95": wilson(successes, n)}


@torch.inference_mode()
def features_under(model, images_u8: np.ndarray, layer: str, stack, *, device: str,
                   precision: str, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(projected vectors [N, d] float32, softmax [N, C]) of uint8 HWC ``images_u8`` with the
    model on ``device`` in ``precision``: the recipe's arithmetic, decode held fixed."""
    model = to_device(model, device, precision)
    vecs, probs = [], []
    for s in range(0, len(images_u8), batch):
        x = torch.from_numpy(images_u8[s:s + batch]).to(device).permute(0, 3, 1, 2).float() / 255
        pooled, softmax = forward_features(model, x, [layer], {layer: stack.pool})
        vecs.append(stack.project(pooled[layer]))
        probs.append(softmax)
    return np.concatenate(vecs), np.concatenate(probs)


def _sq_dists(q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    return (q * q).sum(1, keepdim=True) - 2 * q @ db.T + (db * db).sum(1)[None]


@torch.inference_mode()
def self_retrieval(db: np.ndarray, queries: np.ndarray, rows: np.ndarray,
                   device: str = "cpu", chunk: int = 1024) -> dict:
    """How many of ``queries`` (database rows ``rows`` made by the query recipe) find their own
    row at rank 1 in ``db`` (a tie with an exact duplicate counts as found); and the cosine
    between each query and its own database vector."""
    dbt = torch.from_numpy(db).double().to(device)
    found, cosines = 0, []
    for s in range(0, len(queries), chunk):
        q = torch.from_numpy(queries[s:s + chunk]).double().to(device)
        own = torch.from_numpy(rows[s:s + chunk]).to(device)
        d = _sq_dists(q, dbt)
        own_d = d.gather(1, own[:, None])[:, 0]
        found += int((d.min(1).values >= own_d - 1e-9 * own_d.abs().clamp(min=1)).sum())
        cosines.append(torch.nn.functional.cosine_similarity(q, dbt[own]).cpu().numpy())
    cos = np.concatenate(cosines)
    return {**rate(found, len(queries)), "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min())}


@torch.inference_mode()
def knn(db: np.ndarray, queries: np.ndarray, k: int, exclude_self: bool, device: str = "cpu",
        chunk: int = 1024) -> np.ndarray:
    """Indices [N, k] of the exact nearest database rows (query i's own row i left out when
    ``exclude_self``: leave-one-out over the database)."""
    dbt = torch.from_numpy(db).double().to(device)
    out = []
    for s in range(0, len(queries), chunk):
        q = torch.from_numpy(queries[s:s + chunk]).double().to(device)
        d = _sq_dists(q, dbt)
        if exclude_self:
            idx = torch.arange(s, s + len(q), device=device)
            d[torch.arange(len(q), device=device), idx] = float("inf")
        out.append(d.topk(k, largest=False).indices.cpu().numpy())
    return np.concatenate(out)


def decisions(db: np.ndarray, softmax: np.ndarray, queries: np.ndarray, *, k: int = K,
              exclude_self: bool = False, device: str = "cpu") -> dict[str, np.ndarray]:
    """The defense's labels per weighting rule for each query."""
    neigh = knn(db, queries, min(k, len(db) - int(exclude_self)), exclude_self, device)
    s = softmax[neigh]
    return {rule: vote(s, neighbour_weights(s, rule)).argmax(1) for rule in ("uw", "cbw_d")}


def decision_agreement(reference: dict, other: dict) -> dict:
    return {rule: rate(int((reference[rule] == other[rule]).sum()), len(reference[rule]))
            for rule in reference}


def photo_crops(photos: list[Path], n: int, size: int = 224, seed: int = 0,
                resize: int = 256, interpolation: str = "bilinear") -> np.ndarray:
    """``n`` uint8 [size, size, 3] images: random crops (30-100% of the shorter side), flips and
    JPEG q90 round trips of the photos, decoded by the project's decode_image (the Pillow
    decoder both recipes share here, so only the arithmetic differs)."""
    from PIL import Image

    from pipeline.data.shards import decode_image

    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in photos]
    out = []
    for i in range(n):
        img = sources[i % len(sources)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.3, 1.0))
        x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        crop = img.crop((x, y, x + side, y + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        out.append(decode_image(buf.getvalue(), 1 << 30, 3, size, resize, interpolation))
    return np.stack(out)


def compare_recipes(model, images: np.ndarray, layer: str, stack, reference: tuple[str, str],
                    others: list[tuple[str, str]], *, query_images: np.ndarray | None = None,
                    self_rows: np.ndarray | None = None, search_device: str = "cpu",
                    batch: int = 256, budget_s: float | None = None) -> dict:
    """Agreement of each recipe in ``others`` ((device, precision) pairs) with ``reference``
    (the query path's recipe). The database is ``images`` under each recipe. Self-retrieval:
    the ``self_rows`` database images (default all) queried by the reference recipe.
    Decisions: ``query_images`` through the reference recipe (default: leave-one-out over the
    database itself)."""
    started = time.time()
    ref_db, ref_soft = features_under(model, images, layer, stack, device=reference[0],
                                      precision=reference[1], batch=batch)
    rows = np.arange(len(images)) if self_rows is None else self_rows
    loo = query_images is None
    ref_q = ref_db if loo else features_under(model, query_images, layer, stack,
                                              device=reference[0], precision=reference[1],
                                              batch=batch)[0]
    ref_dec = decisions(ref_db, ref_soft, ref_q, exclude_self=loo, device=search_device)
    out = {"reference": "/".join(reference), "database_images": len(images),
           "decision_queries": len(ref_q), "k": K, "recipes": {}}
    for device, precision in others:
        if budget_s is not None and time.time() - started > budget_s:
            out["recipes"][f"{device}/{precision}"] = {"skipped": "time budget"}
            continue
        t0 = time.time()
        db, soft = features_under(model, images, layer, stack, device=device,
                                  precision=precision, batch=batch)
        seconds = time.time() - t0
        dec = decisions(db, soft, ref_q, exclude_self=loo, device=search_device)
        out["recipes"][f"{device}/{precision}"] = {
            "self_retrieval": self_retrieval(db, ref_db[rows], rows, search_device),
            "decision_agreement": decision_agreement(ref_dec, dec),
            "softmax_max_abs_diff": float(np.abs(soft - ref_soft).max()),
            "features_seconds": round(seconds, 2)}
    return out


def fit_stack(model, images: np.ndarray, layer: str, pca_dim: int, device: str = "cpu"):
    """The layer's transform stack (average pooling, PCA, float16 storage) fitted on
    ``images`` in CPU fp32, as the transforms stage fits it."""
    from pipeline.features.stack import fit_stacks

    model = to_device(model, device, "fp32")

    def forward_batches(limit):
        with torch.inference_mode():
            for s in range(0, len(images) if limit is None else min(limit, len(images)), 256):
                x = torch.from_numpy(images[s:s + 256]).to(device).permute(0, 3, 1, 2).float() / 255
                yield {k: v.float() for k, v in model.forward_taps(x, [layer])[1].items()}

    return fit_stacks(forward_batches, [layer], pooling="avg", pca_dim=pca_dim, whiten=False,
                      storage="float16")[layer]


def foolbox_photos() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        return []
    return sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))


def fashion_mnist_run(weights: Path, n_self: int, n_queries: int) -> dict:
    import yaml

    from pipeline.config import ModelSpec, TrainSpec
    from pipeline.data.fashion_mnist import load_split
    from pipeline.features.backbones import load_model
    from pipeline.train.classifier import train_classifier

    root = Path(__import__("os").environ.get("KNN_DEFENSE_FASHION_MNIST_DIR",
                                             "/usr/share/datasets/fashion-mnist"))
    train, train_labels = load_split(root, "train")
    train, test = train[..., None], load_split(root, "test")[0][..., None]
    demo = yaml.safe_load((ROOT / "jobs/demo.yaml").read_text())
    spec = ModelSpec(**demo["model"])
    if not weights.is_file():  # the demo's classifier, trained as the demo's train stage does
        weights.parent.mkdir(parents=True, exist_ok=True)
        train_classifier(spec, TrainSpec(**demo["train"]), train, train_labels, weights, 2)
    model = load_model(spec, weights)
    layer = "conv_4_2"
    stack = fit_stack(model, train[:10_000], layer, 64)
    rows = np.random.default_rng(0).choice(len(train), n_self, replace=False)
    return compare_recipes(model, train, layer, stack, ("cpu", "fp32"), [("cpu", "bf16")],
                           query_images=test[:n_queries], self_rows=rows, batch=512)


def lite0_run(n: int) -> dict:
    from pipeline.features.imagenet_backbones import EfficientNetLite, load_state, package_weights

    photos = foolbox_photos()
    model = EfficientNetLite("efficientnet-lite0")
    load_state(model, package_weights("efficientnet-lite0"))
    model.eval()
    images = photo_crops(photos, n, model.input_size, resize=model.preprocess["resize"],
                         interpolation=model.preprocess["interpolation"])
    layer = "head"
    stack = fit_stack(model, images[: min(n, 1000)], layer, 256)
    return compare_recipes(model, images, layer, stack, ("cpu", "fp32"), [("cpu", "bf16")],
                           batch=64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fmnist-weights", type=Path, default=ROOT / "runs/recipe-agreement/fmnist.pt",
                    help="the demo's trained SmallResNet (trained here first when missing)")
    ap.add_argument("--self-queries", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--lite0-images", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/recipe_agreement.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    result = {"machine": "2-core CPU", "torch": torch.__version__,
              "fashion_mnist": fashion_mnist_run(args.fmnist_weights, args.self_queries,
                                                 args.queries)}
    print(json.dumps(result["fashion_mnist"], indent=1))
    result["efficientnet_lite0"] = lite0_run(args.lite0_images)
    print(json.dumps(result["efficientnet_lite0"], indent=1))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
