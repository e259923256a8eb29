"""P4: do compact softmax-store encodings change the defense's decisions? On real model outputs.

What is measured:

1. Real 1000-class softmax vectors: EfficientNet-Lite0 (pretrained, package weights) run on
   N real images through the project's decode path - Fashion-MNIST 28x28 grey images
   PNG-encoded and decoded by ``decode_image`` with the model's ``decode_args`` (RGB, shorter
   side 256 bicubic, centre crop 224) - plus the 20 labelled ImageNet photos foolbox ships
   (JPEG, same decode). Full: the 10,000 test + the first 10,000 train images + 20 photos;
   ``--quick``: 300 test images + 20 photos. The softmax (float32) and the ``head`` layer's
   average-pooled features are cached in ``/tmp`` (``--cache``), so reruns skip the forward.
2. Real neighbour sets: PCA-256 of those features, an exact FAISS ``IndexFlatL2``; each image's
   K=50 nearest *other* images (itself excluded by id).
3. For the ``topk`` encoding with k in (4, 8, 12, 16, 17) and for ``float16``: the fraction of
   neighbour sets whose kNN decision is unchanged, full float32 vectors vs encoded-then-decoded
   ones (``pipeline.store.encodings_eval.decisions_agree``; CBW-E / CBW-D use the weights stored
   in the values, CBW-D with M=20, P=3), for UW, CBW-E and CBW-D; mean bytes per value; the
   largest score change; the largest full-vote margin among flipped decisions; and the bytes
   per image on disk of one LevelDB partition holding all N images written with
   ``write_partition`` in that encoding (as written, and after a manual full compaction).
4. The smallest k whose agreement is >= 0.999 for all three rules (or none).

Context reported alongside: top-1 probability quantiles of the N softmax vectors and the
full-vote margins (top score minus second) per rule: decisions can only flip near ties.
The reference is the float32 softmax (the Parquet shards keep float16: the float16 row shows
what that rounding alone does).

CLI: ``python benchmarks/store_agreement.py [--quick] [--fashion N] [--cache PATH]``.
Writes benchmarks/results/store_agreement.json (quick: store_agreement_quick.json), prints it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import plyvel  # noqa: E402
import torch  # noqa: E402

from pipeline.config import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_ENV, ModelSpec  # noqa: E402
from pipeline.data.fashion_mnist import encode_image, load_split  # noqa: E402
from pipeline.data.shards import decode_image  # noqa: E402
from pipeline.features.backbones import (  # noqa: E402
    decode_args,
    images_to_tensor,
    load_model,
    pretrained_weights,
)
from pipeline.features.extract import forward_features  # noqa: E402
from pipeline.features.transforms import fit_pca  # noqa: E402
from pipeline.ids import make_ids  # noqa: E402
from pipeline.store.encodings_eval import RULES, decisions_agree  # noqa: E402
from pipeline.store.softmax_store import partition_dir, write_partition  # noqa: E402
from pipeline.weighting import diversity_weights, entropy_weights, vote  # noqa: E402

LAYER = "head"
BATCH = 64
PCA_DIM = 256
TOPK_KS = (4, 8, 12, 16, 17)
CBW_M, CBW_P = 20, 3.0
TARGET = 0.999


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def photo_bytes() -> list[tuple[str, bytes]]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        raise SystemExit("pip install foolbox (its 20 ImageNet samples are part of the images)")
    paths = sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))
    return [(p.name, p.read_bytes()) for p in paths]


def image_sources(n_fashion: int, source_dir: str) -> list[tuple[str, object]]:
    """(name, encoded image bytes or a 28x28 array to PNG-encode lazily) for every image."""
    test, _ = load_split(source_dir, "test")
    items: list[tuple[str, object]] = [(f"fm-test-{i}", test[i]) for i in range(min(n_fashion,
                                                                                   len(test)))]
    if n_fashion > len(test):
        train, _ = load_split(source_dir, "train")
        items += [(f"fm-train-{i}", train[i]) for i in range(n_fashion - len(test))]
    return items + photo_bytes()


def forward_all(model, items, log) -> tuple[np.ndarray, np.ndarray]:
    """(softmax float32 [N, 1000], pooled head features float32 [N, 1280]), decoded per batch."""
    decode = decode_args(model)
    probs, feats = [], []
    for start in range(0, len(items), BATCH):
        batch = []
        for _, data in items[start:start + BATCH]:
            raw = encode_image(data, "png") if isinstance(data, np.ndarray) else data
            batch.append(decode_image(raw, 1 << 30, **decode))
        pooled, softmax = forward_features(model, images_to_tensor(np.stack(batch)), [LAYER])
        probs.append(softmax.astype(np.float32))
        feats.append(pooled[LAYER].astype(np.float32))
        if (start // BATCH) % 20 == 0:
            log(f"forward {start + len(batch)}/{len(items)}")
    return np.concatenate(probs), np.concatenate(feats)


def load_or_compute(cache: Path, items, model, weights: str, log) -> tuple:
    names = [name for name, _ in items]
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if list(z["names"]) == names and str(z["weights"]) == os.path.basename(weights):
                log(f"cache hit: {cache}")
                return z["softmax"], z["features"], True
        log(f"cache {cache} is for other images or weights: recomputing")
    softmax, feats = forward_all(model, items, log)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, softmax=softmax, features=feats, names=np.array(names),
             weights=np.array(os.path.basename(weights)))
    os.replace(tmp, cache)
    return softmax, feats, False


def neighbour_sets(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's k nearest other images (exact L2 on PCA-256): (indices [N, k], sq dists)."""
    pca = fit_pca(features, PCA_DIM)
    x = np.ascontiguousarray(pca.apply(features))
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    dist, idx = index.search(x, k + 1)
    out_i = np.empty((len(x), k), np.int64)
    out_d = np.empty((len(x), k), np.float32)
    for i in range(len(x)):
        keep = idx[i] != i
        if keep.all():  # itself pushed out by >k exact duplicates
            keep[-1] = False
        out_i[i], out_d[i] = idx[i][keep][:k], dist[i][keep][:k]
    return out_i, out_d


def full_vote_margins(softmax: np.ndarray, nbr: np.ndarray, chunk: int) -> dict:
    """Quantiles of (top score - second score) of the full-vector vote, per rule."""
    w = {"uw": np.ones(len(softmax)), "cbw_e": entropy_weights(softmax),
         "cbw_d": diversity_weights(softmax, CBW_M, CBW_P)}
    out = {}
    for rule in RULES:
        margins = []
        for start in range(0, len(nbr), chunk):
            idx = nbr[start:start + chunk]
            scores = vote(softmax[idx], w[rule][idx])
            top2 = -np.partition(-scores, 1, axis=-1)[:, :2]
            margins.append(top2[:, 0] - top2[:, 1])
        m = np.concatenate(margins)
        out[rule] = {"quantiles_1_10_50": [float(f"{v:.3g}") for v in
                                           np.quantile(m, [0.01, 0.1, 0.5])],
                     "fraction_below_1e-3": round(float(np.mean(m < 1e-3)), 4)}
    return out


def agreement(softmax: np.ndarray, nbr: np.ndarray, encoding: str, chunk: int, **options) -> dict:
    """decisions_agree over all neighbour sets, in chunks of queries, aggregated."""
    n = len(nbr)
    agree = dict.fromkeys(RULES, 0.0)
    diff = dict.fromkeys(RULES, 0.0)
    margin = dict.fromkeys(RULES, 0.0)
    value_bytes = 0.0
    t = time.perf_counter()
    for start in range(0, n, chunk):
        idx = nbr[start:start + chunk]
        r = decisions_agree(softmax[idx], encoding, m=CBW_M, p=CBW_P, **options)
        for rule in RULES:
            agree[rule] += r[rule] * len(idx)
            diff[rule] = max(diff[rule], r["max_score_diff"][rule])
            margin[rule] = max(margin[rule], r["max_disagreement_margin"][rule])
        value_bytes += r["bytes_per_value"] * len(idx)
    out = {rule: round(agree[rule] / n, 6) for rule in RULES}
    out.update({"disagreements": {rule: int(round(n - agree[rule])) for rule in RULES},
                "bytes_per_value": round(value_bytes / n, 2),
                "max_score_diff": {k: float(f"{v:.3g}") for k, v in diff.items()},
                "max_disagreement_margin": {k: float(f"{v:.3g}") for k, v in margin.items()},
                "eval_s": round(time.perf_counter() - t, 2)})
    return out


def store_bytes(softmax: np.ndarray, encoding: str, workdir: Path, **options) -> dict:
    """On-disk bytes per image of one LevelDB partition holding every image in ``encoding``."""
    store = workdir / f"store-{encoding}-{options.get('k', '')}"
    ids = make_ids(0, np.arange(len(softmax)))
    chunks = ((ids[i:i + 4096], softmax[i:i + 4096]) for i in range(0, len(ids), 4096))
    if encoding == "topk":
        options = dict(options, m=CBW_M, p=CBW_P)
    t = time.perf_counter()
    write_partition(store, 0, chunks, encoding, **options)
    write_s = time.perf_counter() - t
    path = partition_dir(store, 0)
    written = dir_bytes(path)
    db = plyvel.DB(str(path), create_if_missing=False)
    db.compact_range()
    db.close()
    compacted = dir_bytes(path)
    shutil.rmtree(store, ignore_errors=True)
    n = len(softmax)
    return {"bytes_per_image_as_written": round(written / n, 1),
            "bytes_per_image_compacted": round(compacted / n, 1), "write_s": round(write_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (300 images)")
    ap.add_argument("--fashion", type=int, help="Fashion-MNIST images (default 20000: 10k test "
                                                "+ 10k train; quick 300)")
    ap.add_argument("--k", type=int, default=50, help="neighbours per set")
    ap.add_argument("--chunk", type=int, default=500, help="queries per decisions_agree call")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--fashion-dir", default=os.environ.get(FASHION_MNIST_ENV,
                                                            DEFAULT_FASHION_MNIST_DIR))
    ap.add_argument("--cache", help="softmax/feature cache (default /tmp/knn-defense-p4-<N>.npz)")
    ap.add_argument("--out", help="result JSON path")
    args = ap.parse_args()
    q = args.quick
    n_fashion = args.fashion or (300 if q else 20_000)
    cache = Path(args.cache or f"/tmp/knn-defense-p4-{n_fashion}.npz")
    out_path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / ("store_agreement_quick.json" if q else
                                           "store_agreement.json"))
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - started:7.1f}s] {msg}",  # noqa: E731
                            file=sys.stderr, flush=True)

    spec = ModelSpec(arch="efficientnet-lite0")
    weights = pretrained_weights(spec)
    model = load_model(spec, weights)
    items = image_sources(n_fashion, args.fashion_dir)
    t = time.perf_counter()
    softmax, feats, cached = load_or_compute(cache, items, model, weights, log)
    forward_s = time.perf_counter() - t
    n = len(softmax)
    log(f"{n} softmax vectors ({'cached' if cached else 'computed'})")
    t = time.perf_counter()
    nbr, dist = neighbour_sets(feats, args.k)
    knn_s = time.perf_counter() - t
    top1 = softmax.max(1)
    photos = slice(n - 20, n)
    context = {
        "top1_prob_quantiles_5_25_50_75_95": [round(float(v), 4) for v in
                                              np.quantile(top1, [.05, .25, .5, .75, .95])],
        "photos_top1_prob_median": round(float(np.median(top1[photos])), 4),
        "photos_top1_is_label": int(sum(int(name.split("_")[2].split(".")[0]) == int(c)
                                        for (name, _), c in zip(items[photos],
                                                                softmax[photos].argmax(1),
                                                                strict=True))),
        "distinct_top1_classes": int(len(np.unique(softmax.argmax(1)))),
        "full_vote_margin": full_vote_margins(softmax, nbr, args.chunk),
        "neighbour_sq_distance_median": round(float(np.median(dist)), 3),
    }
    log(f"neighbour sets ready; context {context}")
    workdir = Path(tempfile.mkdtemp(prefix="knn-p4-", dir="/tmp"))
    encodings = {}
    try:
        for k in TOPK_KS:
            name = f"topk{k}"
            encodings[name] = agreement(softmax, nbr, "topk", args.chunk, k=k)
            encodings[name]["store"] = store_bytes(softmax, "topk", workdir, k=k)
            log(f"{name}: {encodings[name]}")
        encodings["float16"] = agreement(softmax, nbr, "float16", args.chunk)
        encodings["float16"]["store"] = store_bytes(softmax, "float16", workdir)
        log(f"float16: {encodings['float16']}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    passing = [k for k in TOPK_KS if all(encodings[f"topk{k}"][r] >= TARGET for r in RULES)]
    doc = {
        "benchmark": "softmax store encodings P4", "mode": "quick" if q else "full",
        "measures": "fraction of real K-NN neighbour sets whose UW / CBW-E / CBW-D decision is "
                    "unchanged when the neighbours' float32 softmax vectors are replaced by "
                    "encoded-then-decoded store values (decisions_agree); bytes per value and "
                    "LevelDB bytes per image",
        "images": {"fashion_mnist": n - 20, "imagenet_photos": 20, "total": n,
                   "decode": decode_args(model), "fashion_dir": args.fashion_dir},
        "model": {"arch": "efficientnet-lite0", "weights": weights, "layer": LAYER,
                  "pooling": "avg", "pca_dim": PCA_DIM},
        "neighbours": {"k": args.k, "index": "IndexFlatL2 (exact) on PCA-256",
                       "self_excluded": True},
        "cbw_d": {"m": CBW_M, "p": CBW_P},
        "target_agreement": TARGET,
        "smallest_topk_k_meeting_target": passing[0] if passing else None,
        "topk_ks_meeting_target": passing,
        "verdict": (f"topk k={passing[0]} is the smallest k tried with agreement >= {TARGET} "
                    "for UW, CBW-E and CBW-D") if passing else
                   f"none of the topk ks tried {TOPK_KS} reached {TARGET} for all three rules",
        "encodings": encodings,
        "context": context,
        "timing_s": {"forward": round(forward_s, 1), "forward_cached": cached,
                     "knn": round(knn_s, 2), "total": round(time.perf_counter() - started, 1)},
        "cache": str(cache),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "faiss": faiss.__version__},
        "notes": [
            "Fashion-MNIST images are far from ImageNet: their softmax vectors are flatter than "
            "natural photos' (see context), which makes truncation harder, not easier",
            "disagreements counts flipped decisions; max_disagreement_margin shows how close "
            "to a tie the full vote was where a decision flipped",
            "store bytes: LevelDB (snappy) files of one partition with all images, 8-byte keys",
        ] + (["quick mode: 320 images, so one flipped decision is 0.3 %; agreement at the 0.999 "
              "target needs the full run"] if q else []),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
