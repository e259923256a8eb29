import gzip
import os
import struct

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
