"""PCA fitted on a sample of pooled features, saved as a file whose hash is recorded downstream."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np

from pipeline.features.backbones import file_sha256
from pipeline.layout import atomic_write_bytes


@dataclass
class PCA:
    mean: np.ndarray  # [d_in]
    components: np.ndarray  # [d_out, d_in], rows = principal axes, by decreasing variance
    explained_variance: np.ndarray  # [d_out]

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) @ self.components.T).astype(np.float32)


def fit_pca(x: np.ndarray, dim: int) -> PCA:
    """PCA to ``min(dim, d_in)`` dims by eigen-decomposition of the covariance (float64)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"PCA needs a [N >= 2, d] sample, got shape {x.shape}")
    dim = min(dim, x.shape[1])
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:dim]
    comps = vecs[:, order].T
    # Fix each axis's sign (largest-magnitude coefficient positive) so refits are reproducible.
    signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(1)])
    comps *= np.where(signs == 0, 1, signs)[:, None]
    return PCA(mean.astype(np.float32), comps.astype(np.float32),
               np.clip(vals[order], 0, None).astype(np.float32))


def save_pca(pca: PCA, path: str | os.PathLike) -> str:
    """Write atomically; returns the file's sha256."""
    buf = io.BytesIO()
    np.savez(buf, mean=pca.mean, components=pca.components, explained_variance=pca.explained_variance)
    atomic_write_bytes(path, buf.getvalue())
    return file_sha256(path)


def load_pca(path: str | os.PathLike) -> PCA:
    with np.load(path) as z:
        return PCA(z["mean"], z["components"], z["explained_variance"])
