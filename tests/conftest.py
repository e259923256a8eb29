import gzip
import io
import os
import struct
import tarfile

# Keep every Ray node, GCS and dashboard on 127.0.0.1 (must be set before Ray starts).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import pytest
import torch


def synthetic_images(n: int, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """28x28 uint8 images whose class is a bright horizontal band at a class-specific height,
    plus noise: learnable in a few steps, not trivially identical."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        top = 2 + 2 * int(c)
        images[i, top:top + 4, 3:25] = rng.integers(180, 256)
    return images, labels.astype(np.int64)


def write_idx(path, array: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="session")
def fm_source(tmp_path_factory):
    """A Fashion-MNIST-format folder (gzipped idx files) with synthetic images."""
    root = tmp_path_factory.mktemp("fm_source")
    for prefix, n, seed in (("train", 360, 1), ("t10k", 120, 2)):
        images, labels = synthetic_images(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the test session, on loopback, stopped at the end."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def train_tiny_model(x: torch.Tensor, y: torch.Tensor, epochs: int = 3):
    """A small SmallResNet trained with Adam on [0, 1] images ``x`` (good enough to attack)."""
    from pipeline.features.backbones import SmallResNet

    model = SmallResNet(widths=(8, 16, 16), blocks=(1, 1, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for s in range(0, len(x), 64):
            loss = torch.nn.functional.cross_entropy(model(x[s:s + 64]), y[s:s + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture
def trained_small_model():
    """A SmallResNet trained for a few steps on synthetic bands (good enough to be attacked)."""
    from pipeline.features.backbones import images_to_tensor

    torch.manual_seed(0)
    images, labels = synthetic_images(512, seed=3)
    return train_tiny_model(images_to_tensor(images[..., None]), torch.as_tensor(labels))


E2E_LAYERS = ["conv_2_2", "conv_3_2", "conv_4_1", "conv_4_2"]


def append_corrupt_sample(tar_path, key: str) -> None:
    with tarfile.open(tar_path, "a") as tar:
        for name, data in ((f"{key}.png", b"\x89PNG\r\n\x1a\n broken"), (f"{key}.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def finished_job(tmp_path_factory, ray_local):
    """A small job run end to end once per test run (300 database images with a corrupt one
    among them, 90 queries): shared by the end-to-end, viewer and browser tests."""
    from pipeline.config import parse_job
    from pipeline.data.fashion_mnist import write_split_shards
    from pipeline.layout import JobLayout
    from pipeline.runtime.job import run_job

    root = tmp_path_factory.mktemp("e2e")
    images, labels = synthetic_images(300, seed=5)
    write_split_shards(images, labels, root / "db", "train", samples_per_shard=80)
    append_corrupt_sample(root / "db" / "00001.tar", "corrupt-key")
    q_images, q_labels = synthetic_images(90, seed=6)
    write_split_shards(q_images, q_labels, root / "q", "test", samples_per_shard=50)
    spec = parse_job({
        "name": "e2e", "output_dir": str(root / "job"),
        "data": {"database": str(root / "db"), "queries": str(root / "q")},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "features": {"layers": E2E_LAYERS, "pca_dim": 8, "pca_sample": 200, "batch_size": 64},
        "index": {"factory": "IVF4,Flat", "train_sample": 200, "nprobe": 4},
        "store": {"partitions": 2},
        "evaluate": {"num_queries": 60, "k": 10, "attacks": [{"name": "pgd", "steps": 3}]},
        "runtime": {"progress": False},
    })
    summary = run_job(spec)
    return spec, JobLayout(spec.output_dir), summary, (images, labels)
