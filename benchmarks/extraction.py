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


def random_crop(img, rng):
    """60-100% of each side at a random place, mirrored half of the time."""
    from PIL import Image

    w, h = img.size
    cw, ch = int(w * rng.uniform(0.6, 1)), int(h * rng.uniform(0.6, 1))
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    crop = img.crop((x0, y0, x0 + cw, y0 + ch))
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


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
            crop = random_crop(photos[i % len(photos)], rng)
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


# --- web-size photos: ratio, cap and the decode/torch split -----------------------------------
# Sets: the foolbox photos (224 px, upscaled) and crops of them re-encoded at q90 with a 256, 640
# and 1080 px shorter side and aspect ratios from 1:1.9 to 1.9:1; and real photographs (Debian's
# mate-backgrounds, 1280-2560 px nature photos) cropped and downscaled to 1080 px, when installed.
REAL_PHOTOS = Path("/usr/share/backgrounds/mate/nature")
WEB_SETS = [("256", 256, "foolbox"), ("640", 640, "foolbox"), ("1080", 1080, "foolbox"),
            ("1080-real", 1080, "mate-backgrounds")]
WEB_MODELS = [("efficientnet-lite0", ["stage6", "head"]), ("resnet50", ["conv_4_6", "conv_5_1"])]
WEB_IMAGES = 192
# (torch intra-op threads, decode workers, processes?) on the task's 2 CPUs
SPLITS = [(2, 2, False), (2, 1, False), (2, 1, True), (2, 2, True), (1, 1, False)]


def source_photos(kind: str) -> list:
    from PIL import Image

    if kind == "mate-backgrounds":
        paths = sorted(REAL_PHOTOS.glob("*.jpg"))
    else:
        spec = importlib.util.find_spec("foolbox")
        if spec is None:
            raise SystemExit("pip install foolbox (its 20 ImageNet samples are the benchmark's photos)")
        paths = sorted((Path(spec.origin).parent / "data").glob("imagenet_*.jpg"))
    return [Image.open(p).convert("RGB") for p in paths]


def make_web_jpegs(n: int, out_tar: Path, short: int, kind: str, seed: int = 0) -> dict:
    """Random crops (60-100% of each side) of the ``kind`` photos, flipped half the time, resized
    to a ``short`` px shorter side at an aspect ratio from 1/1.9 to 1.9, JPEG q90."""
    import webdataset as wds
    from PIL import Image

    photos = source_photos(kind)
    rng = np.random.default_rng(seed)
    sizes = []
    with wds.TarWriter(str(out_tar)) as sink:
        for i in range(n):
            crop = random_crop(photos[i % len(photos)], rng)
            aspect = float(np.exp(rng.uniform(-np.log(1.9), np.log(1.9))))
            size = (round(short * aspect), short) if aspect > 1 else (short, round(short / aspect))
            buf = io.BytesIO()
            crop.resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
            sizes.append(len(buf.getvalue()))
            sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "cls": i % 1000})
    return {"images": n, "mean_kb": round(float(np.mean(sizes)) / 1024, 1), "short_side": short,
            "photos": kind}


WEB_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from pipeline.config import ModelSpec
from pipeline.data.shards import ShardStats, decode_image, iter_encoded, iter_samples, _decode_chunk, decode_process_pool
from pipeline.features.backbones import build_model, decode_args, images_to_tensor
from pipeline.features.extract import extract_shard, forward_features
from pipeline.features.stack import LayerTransform
from pipeline.features.transforms import fit_pca
arch, layers, tar, out, repeats, splits = (sys.argv[2], sys.argv[3].split(","), sys.argv[4],
                                           sys.argv[5], int(sys.argv[6]), json.loads(sys.argv[7]))
CPUS = 2
torch.set_num_threads(CPUS)
torch.manual_seed(0)
weights = None if arch.startswith("efficientnet") else "random"  # Lite0: the package's weights
model = build_model(ModelSpec(arch=arch, weights=weights)).eval()
decode = decode_args(model)
datas = [d for _, d in iter_encoded(tar, ShardStats())]
def decode_ms():  # the pipeline's own decode path (draft + resize + crop), one thread
    best = None
    for _ in range(2):
        t = time.perf_counter()
        for d in datas:
            decode_image(d, 10**8, **decode)
        ms = 1000 * (time.perf_counter() - t) / len(datas)
        best = ms if best is None else min(best, ms)
    return best
images = np.stack([s.image for s in iter_samples(tar, ShardStats(), **decode)])
n = len(images)
pooled = {k: [] for k in layers}
for s in range(0, min(n, 160), 32):
    for k, v in forward_features(model, images_to_tensor(images[s:s + 32]), layers)[0].items():
        pooled[k].append(v)
stacks = {k: LayerTransform("avg", fit_pca(np.concatenate(v), 128)) for k, v in pooled.items()}
def bare():
    torch.set_num_threads(CPUS)
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n, 32):
            model(images_to_tensor(images[s:s + 32]))
    return n / (time.perf_counter() - t)
def pipeline(threads, workers, processes):
    if processes:  # started once per extraction worker, as the actor keeps it
        list(decode_process_pool(workers).map(_decode_chunk, [[]] * 4, [()] * 4))
    t = time.perf_counter()
    r = extract_shard(model, stacks, tar, 0, out, layers=layers, batch_size=32, decode=decode,
                      max_pixels=10**8, provenance={}, num_threads=threads, decode_workers=workers,
                      decode_processes=processes)
    return r["written"] / (time.perf_counter() - t)
bare()  # warm-up
dec = [decode_ms()]
runs = {"bare": [bare()], **{json.dumps(sp): [] for sp in splits}}
for _ in range(repeats):
    for sp in splits:
        runs[json.dumps(sp)].append(pipeline(*sp))
    runs["bare"].append(bare())
dec.append(decode_ms())
print(json.dumps({"runs": runs, "decode_ms": dec, "n": n}))
"""


def web_point(arch: str, layers: list[str], tar: Path, tmp: Path, repeats: int,
              splits: list) -> dict:
    from pipeline.runtime.ray_runner import WORKER_ENV

    env = dict(os.environ, **WORKER_ENV)
    out = subprocess.run([sys.executable, "-c", WEB_CHILD, str(ROOT), arch, ",".join(layers),
                          str(tar), str(tmp / "out.parquet"), str(repeats), json.dumps(splits)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    runs = r["runs"]
    bare = runs.pop("bare")
    brackets = [(a + b) / 2 for a, b in zip(bare[:-1], bare[1:], strict=True)]
    bare_rate = float(np.median(bare))
    forward_core_ms = 2 * 1000 / bare_rate  # both cores busy for 1/bare_rate s per image
    decode_ms = float(np.median(r["decode_ms"]))
    cap = forward_core_ms / (forward_core_ms + decode_ms)
    splits_out = {}
    for key, rates in runs.items():
        threads, workers, processes = json.loads(key)
        ratio = float(np.median([p / b for p, b in zip(rates, brackets, strict=True)]))
        name = f"torch {threads} + {workers} decode {'processes' if processes else 'threads'}"
        splits_out[name] = {"torch_threads": threads, "decode_workers": workers,
                            "executor": "processes" if processes else "threads",
                            "img_per_s": round(float(np.median(rates)), 2),
                            "ratio": round(ratio, 3), "share_of_cap": round(ratio / cap, 3)}
    best = max(splits_out, key=lambda k: splits_out[k]["ratio"])
    return {"arch": arch, "images": r["n"], "repeats": repeats,
            "bare_forward_img_per_s": round(bare_rate, 2),
            "bare_runs_img_per_s": [round(b, 2) for b in bare],
            "forward_core_ms": round(forward_core_ms, 2), "decode_core_ms": round(decode_ms, 2),
            "decode_core_ms_runs": [round(d, 2) for d in r["decode_ms"]],
            "cap": round(cap, 3), "splits": splits_out, "best_split": best,
            "best_ratio": splits_out[best]["ratio"],
            "best_share_of_cap": splits_out[best]["share_of_cap"]}


def run_web(only: list[str], repeats: int = 2) -> None:
    out = Path(__file__).parent / "results" / "extraction_web.json"
    previous = json.loads(out.read_text())["results"] if out.is_file() else []
    results, sets = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, short, kind in WEB_SETS:
            if kind == "mate-backgrounds" and not REAL_PHOTOS.is_dir():
                print(f"skip {name}: {REAL_PHOTOS} missing (apt-get install mate-backgrounds)")
                continue
            for arch, layers in WEB_MODELS:
                if only and name not in only and arch not in only and f"{arch}:{name}" not in only:
                    results += [r for r in previous if r["arch"] == arch and r["set"] == name]
                    continue
                tar = tmp / f"web-{name}.tar"
                if name not in sets:
                    sets[name] = make_web_jpegs(WEB_IMAGES, tar, short, kind)
                t = time.time()
                point = {"set": name, **sets[name],
                         **web_point(arch, layers, tar, tmp, repeats, SPLITS)}
                point["wall_s"] = round(time.time() - t)
                results.append(point)
                print(json.dumps({k: point[k] for k in ("set", "arch", "cap", "best_split",
                                                        "best_ratio", "best_share_of_cap")}),
                      flush=True)
                out.write_text(json.dumps(_web_doc(results), indent=2) + "\n")
    out.write_text(json.dumps(_web_doc(results), indent=2) + "\n")


def _web_doc(results: list) -> dict:
    return {"benchmark": "extraction at web sizes: pipeline/bare ratio and the decode cap",
            "note": "cap = forward core-ms / (forward core-ms + decode core-ms); forward core-ms = "
            "2 cores x the bare forward's ms per image; decode core-ms = decode_image (draft + "
            "resize + crop) on one thread over the same files, measured before and after the "
            "pipeline runs (median). ratio: each pipeline run over the mean of the bare runs "
            "just before and after it; share_of_cap = ratio / cap. Upscaled foolbox photos "
            "have little fine detail and decode faster than real photos of the same size; "
            "1080-real are real photographs (Debian mate-backgrounds) downscaled to 1080 px.",
            "splits": [list(s) for s in SPLITS],
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "results": results}


def main() -> None:
    only = sys.argv[1:]  # optional: "arch" or "arch:images" to run; others keep their last result
    if only[:1] == ["web"]:  # web-size sets: "web [set|arch|arch:set ...]"
        run_web(only[1:])
        return
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
