"""The prepared GPU check (``make gpu-check``): what a GPU node of an indexing job does, measured in
a few minutes on a bare single-GPU box.

It needs only what travels with the working tree: the project (run from the tree with
``PYTHONPATH=.``), and the wheels and photos ``make gpu-wheels`` puts in ``.gpu-carry/`` on a
machine with an index (the box has torch, torchvision, numpy, pillow, pyarrow, pyyaml, tqdm,
fsspec, threadpoolctl but no network). Every measurement is time-boxed, and the JSON
(``$OUT/gpu_check.json`` when ``$OUT`` is set, else benchmarks/results/gpu_check.json) is
rewritten after each one, so a run cut short still returns what it measured.

Measured:

1. bare forward img/s of EfficientNet-Lite0 and ResNet-50 (random init) in bf16, fp32 (TF32 off)
   and tf32, batch 128 and 256;
2. Pillow decode img/s per core, at 256 px and 1080 px (the shorter side of a web photo);
3. ``extract_shard`` img/s with Pillow decode (N threads, N processes), nvJPEG decode, and (at
   1080 px) the hybrid decoder (nvJPEG, with JPEGs at least twice the resize side draft-decoded
   by Pillow in N processes) on 256-px and 1080-px JPEG shards, the ratio to the bare forward of
   the same model, batch and precision, and peak GPU memory;
4. decoded pixels: nvJPEG on the GPU against torchvision's CPU decode (the query path's, when the
   database used nvJPEG) and against Pillow;
5. recipe agreement (self-retrieval, decision agreement, cosine) between GPU bf16, GPU fp32,
   GPU tf32 and CPU fp32 / CPU bf16, with EfficientNet-Lite0's real weights on crops of
   foolbox's ImageNet photos.

``--tiny`` runs every step on the CPU with a few images, in seconds (the test suite does, so
the script never rots).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline.data.shards import decode_image, write_tar_shards  # noqa: E402
from pipeline.features.extract import (  # noqa: E402
    extract_shard,
    forward_features,
    to_device,
)
from pipeline.features.tensor_decode import decode_batch  # noqa: E402

CARRY = ROOT / ".gpu-carry"


class Report:
    """The JSON result, written after every measurement."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "errors": {}}
        self.t0 = time.time()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.t0, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)

    def step(self, name: str, fn, *args, **kwargs):
        """Run one measurement; its result (or its error) goes into the JSON at once."""
        started = time.time()
        print(f"[{time.time() - self.t0:6.1f}s] {name} ...", flush=True)
        try:
            value = fn(*args, **kwargs)
            self.data[name] = value
        except Exception as exn:  # noqa: BLE001 - one failed measurement must not lose the rest
            self.data["errors"][name] = "".join(traceback.format_exception_only(type(exn), exn)).strip()
            traceback.print_exc()
            value = None
        self.data.setdefault("step_seconds", {})[name] = round(time.time() - started, 1)
        self.save()
        return value


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(arch: str):
    from pipeline.features.imagenet_backbones import EfficientNetLite, TorchvisionResNet

    model = EfficientNetLite(arch) if arch.startswith("efficientnet") else TorchvisionResNet(arch)
    return model.eval()


def layers_of(model) -> list[str]:
    return model.tap_names()[-2:]


@torch.inference_mode()
def bare_forward(model, device: str, precision: str, batch: int, seconds: float) -> float:
    """img/s of forward_features (taps pooled, softmax, back on the host) on images already on
    the device: the cap extraction is measured against."""
    model = to_device(model, device, precision)
    size = model.preprocess["crop"]
    x = torch.rand(batch, 3, size, size, device=device)
    layers = layers_of(model)
    for _ in range(1 if device == "cpu" else 3):
        forward_features(model, x, layers)
    sync(device)
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        forward_features(model, x, layers)
        n += batch
    sync(device)
    return round(n / (time.time() - t0), 1)


def forward_table(archs, precisions, batches, device, seconds) -> dict:
    out = {}
    for arch in archs:
        model = build(arch)
        for precision in precisions:
            for batch in batches:
                out[f"{arch}/{precision}/b{batch}"] = bare_forward(model, device, precision,
                                                                    batch, seconds)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# Test images: crops of real photos at a web photo's size

def photos() -> list[Path]:
    found = sorted((CARRY / "photos").glob("*.jpg"))
    if not found:
        from recipe_agreement import foolbox_photos

        found = foolbox_photos()
    return found


def _jpeg(args) -> bytes:
    path, shorter, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.open(path).convert("RGB")
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.5, 1.0))
    x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
    aspect = rng.choice([1.0, 4 / 3, 3 / 4, 16 / 9])
    cw = min(w - x, int(side * max(aspect, 1)))
    ch = min(h - y, int(side / min(aspect, 1)))
    crop = img.crop((x, y, x + cw, y + ch))
    scale = shorter / min(crop.size)
    crop = crop.resize((round(crop.size[0] * scale), round(crop.size[1] * scale)), Image.BICUBIC)
    # Upscaled photos are smoother than a camera's: add sensor-like noise so the JPEG carries
    # the high-frequency detail (and entropy-decoding cost) of a real 1080-px photo.
    arr = np.asarray(crop, np.int16) + rng.normal(0, 6, (crop.size[1], crop.size[0], 1)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_jpegs(n: int, shorter: int, seed: int = 0) -> list[bytes]:
    sources = photos()
    jobs = [(sources[i % len(sources)], shorter, seed * 1_000_003 + i) for i in range(n)]
    with ProcessPoolExecutor(max_workers=max(1, (os.cpu_count() or 2))) as pool:
        return list(pool.map(_jpeg, jobs, chunksize=16))


def write_shard(folder: Path, jpegs: list[bytes]) -> str:
    [path] = write_tar_shards(folder, len(jpegs), len(jpegs),
                              lambda row, key: {"jpg": jpegs[row], "cls": str(row % 1000)})
    return str(path)


def decode_per_core(jpegs: list[bytes], decode: dict, seconds: float) -> float:
    """Pillow decode + resize + crop (draft mode for JPEGs), one thread: img/s per core."""
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        decode_image(jpegs[n % len(jpegs)], 1 << 30, **decode)
        n += 1
    return round(n / (time.time() - t0), 1)


# ------------------------------------------------------------------------------------------------
# extract_shard, as a features task runs it

def fit_transforms(model, device: str, precision: str, n: int = 512):
    from recipe_agreement import fit_stack

    images = (np.random.default_rng(0).random((n, model.preprocess["crop"],
                                               model.preprocess["crop"], 3)) * 255).astype(np.uint8)
    return {layer: fit_stack(model, images, layer, min(64, n - 1), device)
            for layer in layers_of(model)}


def extract_run(model, transforms, shard: str, out_dir: Path, *, device: str, precision: str,
                backend: str, batch: int, threads: int, processes: bool = False) -> dict:
    from pipeline.features.backbones import decode_args

    model = to_device(model, device, precision)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out = out_dir / f"{backend}-{batch}.parquet"
    t0 = time.time()
    counts = extract_shard(model, transforms, shard, 0, str(out), layers=layers_of(model),
                           batch_size=batch, decode=decode_args(model), max_pixels=1 << 30,
                           provenance={}, decode_workers=threads, decode_backend=backend,
                           decode_processes=processes)
    sync(device)
    seconds = time.time() - t0
    result = {"img_per_s": round(counts["written"] / seconds, 1), "images": counts["written"],
              "seconds": round(seconds, 2),
              "decode_workers": threads if backend in ("pil", "hybrid") else 0}
    if device.startswith("cuda"):
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    out.unlink(missing_ok=True)
    return result


def warm_pool(workers: int) -> None:
    from pipeline.data.shards import _decode_chunk, decode_process_pool

    list(decode_process_pool(workers).map(_decode_chunk, [[]] * 4 * workers, [()] * 4 * workers))


def extraction_table(arch: str, shards: dict[str, str], device: str, precision: str,
                     batch: int, threads: int, bare_seconds: float, workdir: Path) -> dict:
    model = build(arch)
    transforms = fit_transforms(model, device, precision, n=16 if batch <= 16 else 512)
    bare = bare_forward(model, device, precision, batch, bare_seconds)
    out = {"arch": arch, "precision": precision, "batch": batch, "bare_img_per_s": bare}
    runs = {"pil-threads": ("pil", False), "pil-processes": ("pil", True),
            "torchvision": ("torchvision", False), "hybrid": ("hybrid", True)}
    for size_name, shard in shards.items():
        for name, (backend, processes) in runs.items():
            if backend == "hybrid" and size_name == "256px":
                continue  # nothing that small is routed to the draft decode: nvJPEG's run
            if processes:  # start the pool first: it starts once per extraction worker
                warm_pool(threads)
            run = extract_run(model, transforms, shard, workdir, device=device,
                              precision=precision, backend=backend, batch=batch,
                              threads=threads, processes=processes)
            run["ratio_to_bare"] = round(run["img_per_s"] / bare, 3)
            out[f"{size_name}/{name}"] = run
            print(f"    {arch}/{precision} {size_name}/{name}: {run['img_per_s']} img/s", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# Decoded pixels and recipes

def pixel_agreement(jpegs: list[bytes], device: str) -> dict:
    """nvJPEG (``device``) vs torchvision on the CPU vs Pillow, after the same resize and crop."""
    decode = {"channels": 3, "size": 224, "resize": 256, "interpolation": "bilinear"}
    on_device, _, _ = decode_batch(jpegs, device, max_pixels=1 << 30, **decode)
    on_cpu, _, _ = decode_batch(jpegs, "cpu", max_pixels=1 << 30, **decode)
    pil = torch.from_numpy(np.stack([decode_image(j, 1 << 30, **decode) for j in jpegs]))
    a = (on_device.cpu() * 255).round()
    b = (on_cpu * 255).round()
    c = pil.permute(0, 3, 1, 2).float()

    def diff(x, y):
        d = (x - y).abs()
        return {"mean_abs_levels": round(float(d.mean()), 3), "max_abs_levels": int(d.max()),
                "identical_pixels": round(float((d == 0).float().mean()), 5),
                "identical_images": int(((d == 0).flatten(1).all(1)).sum()), "images": len(x)}

    return {"device_vs_cpu_torchvision": diff(a, b), "device_vs_pillow": diff(a, c),
            "cpu_torchvision_vs_pillow": diff(b, c)}


def recipe_table(n: int, device: str, budget_s: float) -> dict:
    from recipe_agreement import compare_recipes, fit_stack, photo_crops

    from pipeline.features.imagenet_backbones import EfficientNetLite, load_state, package_weights

    model = EfficientNetLite("efficientnet-lite0")
    try:
        load_state(model, package_weights("efficientnet-lite0"))
        weights = "pretrained"
    except FileNotFoundError:
        weights = "random"
    model.eval()
    images = photo_crops(photos(), n, model.input_size, resize=model.preprocess["resize"],
                         interpolation=model.preprocess["interpolation"])
    layer = "head"
    stack = fit_stack(model, images[: min(n, 1000)], layer, min(256, n - 1))
    gpu = "cuda" if device.startswith("cuda") else "cpu"
    started = time.time()
    vs_fp32 = compare_recipes(model, images, layer, stack, ("cpu", "fp32"),
                              [(gpu, "fp32"), (gpu, "tf32"), (gpu, "bf16")],
                              search_device=device, batch=128, budget_s=budget_s)
    left = None if budget_s is None else max(1.0, budget_s - (time.time() - started))
    # a bf16 database is queried in bf16: the query side emulates it on the CPU
    vs_bf16 = compare_recipes(model, images, layer, stack, ("cpu", "bf16"), [(gpu, "bf16")],
                              search_device=device, batch=128, budget_s=left)
    return {"weights": weights, "images": n, "layer": layer,
            "query_cpu_fp32": vs_fp32, "query_cpu_bf16": vs_bf16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, a few images: seconds (CI)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                       else ROOT / "benchmarks/results/gpu_check.json")
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda:0" if cuda else "cpu"
    cores = os.cpu_count() or 1
    report = Report(out)
    report.data.update({
        "mode": "tiny" if args.tiny else "full", "device": device,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_cores": cores,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine()})
    report.save()
    if args.tiny:
        torch.set_num_threads(min(2, cores))
    n256, n1080, n_recipe = (8, 4, 24) if args.tiny else (4096, 1536, 2000)
    seconds = 0.2 if args.tiny else 2.0
    batch = 4 if args.tiny else 256
    threads = max(1, cores - 1)

    report.step("forward_img_per_s", forward_table,
                ["efficientnet-lite0"] if args.tiny else ["efficientnet-lite0", "resnet50"],
                ["fp32", "bf16"] if args.tiny else ["bf16", "fp32", "tf32"],
                [batch] if args.tiny else [128, 256], device, 0.2 if args.tiny else 1.5)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jpegs = {"256px": make_jpegs(n256, 256, 1), "1080px": make_jpegs(n1080, 1080, 2)}
        report.data["test_images"] = {k: {"count": len(v), "mean_kb": round(np.mean([len(j) for j in v]) / 1024, 1)}
                                      for k, v in jpegs.items()}
        decode = {"channels": 3, "size": 224, "resize": 256, "interpolation": "bilinear"}
        report.step("pillow_decode_img_per_s_per_core",
                    lambda: {k: decode_per_core(v, decode, seconds) for k, v in jpegs.items()})
        shards = {k: write_shard(tmp / k, v) for k, v in jpegs.items()}
        report.step("pixels", pixel_agreement, jpegs["1080px"][:64], device)
        configs = ([("efficientnet-lite0", "fp32")] if args.tiny else
                   [("efficientnet-lite0", "bf16"), ("resnet50", "bf16"),
                    ("efficientnet-lite0", "fp32")])
        # the recipe agreement decides the GPU default precision: measured before the rest
        report.step("recipes", recipe_table, n_recipe, device, None if args.tiny else 50.0)
        for arch, precision in configs:
            report.step(f"extract/{arch}/{precision}", extraction_table, arch, shards, device,
                        precision, batch, threads, seconds, tmp)
    # images the GPU forwards per second vs what one core decodes: cores needed per GPU
    fwd = report.data.get("forward_img_per_s") or {}
    per_core = report.data.get("pillow_decode_img_per_s_per_core") or {}
    key = f"efficientnet-lite0/{'fp32' if args.tiny else 'bf16'}/b{batch if args.tiny else 256}"
    if key in fwd and per_core:
        report.data["decode_cores_per_gpu"] = {
            size: round(fwd[key] / rate, 1) for size, rate in per_core.items()}
    report.data["finished"] = True
    report.save()
    print(json.dumps({k: v for k, v in report.data.items() if k != "recipes"}, indent=1))


if __name__ == "__main__":
    main()
