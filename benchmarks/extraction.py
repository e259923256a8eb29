"""P1: extraction throughput as a ratio, measured side by side in one process.

pipeline img/s  = the features stage's `extract_shard` on a tar of 256-px-short-side JPEGs
                  (tar read -> threaded JPEG decode + resize/crop -> forward with taps -> pooling
                  -> PCA -> Parquet write)
bare img/s      = the same model's plain forward on the same images already decoded to tensors
ratio           = pipeline / bare  (target >= 0.90 on the 2-core CPU machine)

Each configuration runs in a fresh child process (so its peak RSS is its own), with the allocator
settings the Ray workers get (WORKER_ENV). Images: random crops/flips/scales of the 20 labelled
ImageNet photos that foolbox ships, re-encoded as JPEG (quality 90) at 256 px short side.
Writes benchmarks/results/extraction.json.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = [  # (arch, layers, images, repeats)
    ("efficientnet-lite0", ["stage6", "head"], 1000, 3),
    ("resnet50", ["conv_4_6", "conv_5_1"], 1000, 2),
    ("efficientnet-lite0", ["stage6", "head"], 10000, 1),
]
BATCH = 32


def make_jpegs(n: int, out_tar: Path, seed: int = 0) -> None:
    import webdataset as wds
    from PIL import Image

    from pipeline.data.fashion_mnist import write_split_shards  # noqa: F401  (same tar layout)

    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        raise SystemExit("pip install foolbox (its 20 ImageNet samples are the benchmark's photos)")
    photos = [Image.open(p).convert("RGB")
              for p in sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))]
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(out_tar)) as sink:
        for i in range(n):
            img = photos[i % len(photos)]
            w, h = img.size
            cw, ch = int(w * rng.uniform(0.6, 1)), int(h * rng.uniform(0.6, 1))
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            crop = img.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            aspect = rng.uniform(0.75, 1.33)
            size = (256, int(256 * aspect)) if aspect > 1 else (int(256 / aspect), 256)
            buf = io.BytesIO()
            crop.resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
            sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "cls": i % 1000})


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from pipeline.config import ModelSpec
from pipeline.data.shards import ShardStats, iter_samples
from pipeline.features.backbones import build_model, decode_args, images_to_tensor
from pipeline.features.extract import extract_shard, forward_features
from pipeline.features.stack import LayerTransform
from pipeline.features.transforms import fit_pca
arch, layers, tar, out, repeats, mode = (sys.argv[2], sys.argv[3].split(","), sys.argv[4],
                                         sys.argv[5], int(sys.argv[6]), sys.argv[7])
torch.set_num_threads(2)
torch.manual_seed(0)
model = build_model(ModelSpec(arch=arch, weights="random")).eval()
decode = decode_args(model)
fit = np.stack([s.image for _, s in zip(range(256), iter_samples(tar, ShardStats(), **decode))])
pooled = {k: [] for k in layers}
for s in range(0, len(fit), 32):
    for k, v in forward_features(model, images_to_tensor(fit[s:s + 32]), layers)[0].items():
        pooled[k].append(v)
stacks = {k: LayerTransform("avg", fit_pca(np.concatenate(v), 256)) for k, v in pooled.items()}
def pipeline(workers):
    t = time.perf_counter()
    r = extract_shard(model, stacks, tar, 0, out, layers=layers, batch_size=32, decode=decode,
                      max_pixels=10**8, provenance={}, num_threads=2, decode_workers=workers)
    return r["written"] / (time.perf_counter() - t)
if mode == "rss":  # the pipeline alone, as a worker runs it: its peak RSS
    rate = pipeline(2)
    print(json.dumps({"pipeline": [rate], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    sys.exit()
images = np.stack([s.image for s in iter_samples(tar, ShardStats(), **decode)])
n = len(images)
def bare():
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n, 32):
            model(images_to_tensor(images[s:s + 32]))
    return n / (time.perf_counter() - t)
# Interleaved in one process, each pair of pipeline runs bracketed by bare runs (bare, w0, w2,
# bare, w0, w2, bare): a machine that drifts during a long shard moves both sides of a ratio.
runs = {"bare": [bare()], "pipeline_w0": [], "pipeline_w2": []}
for _ in range(repeats):
    runs["pipeline_w0"].append(pipeline(0))
    runs["pipeline_w2"].append(pipeline(2))
    runs["bare"].append(bare())
print(json.dumps({**runs, "n": n}))
"""


def _child(arch: str, layers: list[str], tar: Path, tmp: Path, repeats: int, mode: str) -> dict:
    from pipeline.runtime.ray_runner import WORKER_ENV  # both sides run as a Ray worker would

    env = dict(os.environ, **WORKER_ENV)
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), arch, ",".join(layers), str(tar),
                          str(tmp / "out.parquet"), str(repeats), mode],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_config(arch: str, layers: list[str], n: int, repeats: int, tmp: Path) -> dict:
    tar = tmp / f"jpegs-{n}.tar"
    if not tar.exists():
        make_jpegs(n, tar)
    r = _child(arch, layers, tar, tmp, repeats, "ratio")
    rss = _child(arch, layers, tar, tmp, 1, "rss")
    med = {k: float(np.median(v)) for k, v in r.items() if k != "n"}
    # each repeat's pipeline rate over the mean of the bare runs just before and after it
    brackets = [(a + b) / 2 for a, b in zip(r["bare"][:-1], r["bare"][1:], strict=True)]
    ratio = {w: round(float(np.median([p / b for p, b in zip(r[f"pipeline_{w}"], brackets, strict=True)])), 3)
             for w in ("w0", "w2")}
    return {"arch": arch, "layers": layers, "images": r["n"], "batch_size": BATCH,
            "repeats": repeats, "bare_forward_img_per_s": round(med["bare"], 2),
            "bare_runs_img_per_s": [round(b, 2) for b in r["bare"]],
            "pipeline_img_per_s": {"decode_workers_0": round(med["pipeline_w0"], 2),
                                   "decode_workers_2": round(med["pipeline_w2"], 2)},
            "ratio_pipeline_over_bare": {"decode_workers_0": ratio["w0"],
                                         "decode_workers_2": ratio["w2"]},
            "pipeline_worker_peak_rss_mb": round(rss["peak_rss_mb"])}


def main() -> None:
    only = sys.argv[1:]  # optional: "arch" or "arch:images" to run; others keep their last result
    out = Path(__file__).parent / "results" / "extraction.json"
    previous = json.loads(out.read_text())["results"] if only and out.is_file() else []
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, layers, n, repeats in CONFIGS:
            if only and arch not in only and f"{arch}:{n}" not in only:
                results += [r for r in previous if r["arch"] == arch and r["images"] == n]
                continue
            t = time.time()
            results.append(run_config(arch, layers, n, repeats, Path(tmp)))
            results[-1]["wall_s"] = round(time.time() - t)
            print(json.dumps(results[-1]), flush=True)
    doc = {"benchmark": "extraction P1", "input": "JPEG q90, 256 px short side, from foolbox's "
           "ImageNet samples",
           "note": "bare: plain forward on pre-decoded tensors; pipeline: extract_shard on the tar; "
           "ratio: each pipeline run over the mean of the bare runs just before and after it. "
           "pipeline_worker_peak_rss_mb: a fresh process running only extract_shard (as a Ray "
           "worker does), with the allocator settings the workers get (WORKER_ENV)",
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "results": results}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
