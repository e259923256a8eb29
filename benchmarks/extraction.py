"""Extraction throughput as a ratio: pipeline (decode + forward + pool + PCA + Parquet) img/s
divided by the bare model's forward img/s on the same images, measured side by side.

Writes benchmarks/results/extraction.json. Uses Fashion-MNIST when installed, else synthetic.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_ENV  # noqa: E402
from pipeline.data.fashion_mnist import load_split, missing_files, write_split_shards  # noqa: E402
from pipeline.features.backbones import SmallResNet, images_to_tensor  # noqa: E402
from pipeline.features.extract import extract_shard, forward_features  # noqa: E402
from pipeline.features.stack import LayerTransform  # noqa: E402
from pipeline.features.transforms import fit_pca  # noqa: E402

N, BATCH, REPEATS = 8000, 512, 3
LAYERS = ["conv_2_2", "conv_3_2", "conv_4_1", "conv_4_2"]


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    source = os.environ.get(FASHION_MNIST_ENV, DEFAULT_FASHION_MNIST_DIR)
    if not missing_files(source):
        images, labels = load_split(source, "train")
        images, labels, data = images[:N], labels[:N], "fashion-mnist train[:8000]"
    else:
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (N, 28, 28), dtype=np.uint8), rng.integers(0, 10, N)
        data = "synthetic 28x28"
    model = SmallResNet().eval()
    x = images_to_tensor(images[..., None])
    pooled, _ = forward_features(model, x[:2000], LAYERS)
    transforms = {k: LayerTransform("avg", fit_pca(v, 64)) for k, v in pooled.items()}
    with tempfile.TemporaryDirectory() as tmp:
        write_split_shards(images, labels, tmp, "train", samples_per_shard=N)
        shard = str(Path(tmp) / "00000.tar")
        bare, piped = [], []
        for _ in range(REPEATS):  # interleaved so both see the same machine load
            t = time.perf_counter()
            with torch.inference_mode():
                for s in range(0, N, BATCH):
                    model(x[s:s + BATCH])
            bare.append(N / (time.perf_counter() - t))
            t = time.perf_counter()
            extract_shard(model, transforms, shard, 0, str(Path(tmp) / "out.parquet"), layers=LAYERS,
                          batch_size=BATCH, decode={"channels": 1},
                          max_pixels=10**8, provenance={})
            piped.append(N / (time.perf_counter() - t))
    result = {
        "benchmark": "extraction", "data": data, "images": N, "batch_size": BATCH,
        "threads": torch.get_num_threads(), "model": "SmallResNet(32,64,128) random init",
        "bare_forward_img_per_s": round(float(np.median(bare)), 1),
        "pipeline_img_per_s": round(float(np.median(piped)), 1),
        "ratio_pipeline_over_bare": round(float(np.median(piped) / np.median(bare)), 3),
        "malloc_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    out = Path(__file__).parent / "results" / "extraction.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
