"""R-MAC pooling (Tolias, Sicre & Jegou, ICLR 2016) with regional PCA-whitening.

The paper's 50B-scale features are conv_5_1 R-MAC: per-region spatial max -> L2 -> PCA-whiten
-> L2 -> sum over regions -> L2. :func:`rmac` is pure torch (runs on GPU, differentiable for the
attacks); the whitening is fitted in numpy on a sample of regional vectors and saved as a file
whose hash is recorded downstream, like the PCA of :mod:`pipeline.features.transforms`.

Region grid (:func:`rmac_regions`): the reference grid of Tolias et al.'s MATLAB
``rmac_regions.m`` as ported in cnnimageretrieval-pytorch (``cirtorch.layers.functional.rmac``):

* ``w = min(H, W)``; at level ``l = 1..L`` square regions of side ``wl = floor(2 w / (l + 1))``;
* along the long side ``l + extra`` regions, where ``extra = 1 + argmin_i |1 - b_i / w - ovr|``
  over ``b_i = (max(H, W) - w) / (steps_i - 1)``, ``steps = 2..7``, ``ovr = 0.4`` (the overlap
  of consecutive regions at level 1); ``extra = 0`` for a square map; ``l`` regions along the
  short side;
* region starts uniformly spaced: ``floor(wl2 + k b) - wl2`` with ``b = (side - wl) / (n - 1)``
  and ``wl2 = floor(wl / 2 - 1)``, which equals ``floor(k (side - wl) / (n - 1))``; computed here
  in exact integer arithmetic (the reference uses float32, which agrees whenever rounding does not
  land on an integer boundary), then clipped inside the map; empty regions (``wl == 0``) dropped;
* like cirtorch, the full map is prepended as an extra region (``full_map=True``). For a square
  map it coincides with the level-1 region, so the global max is counted twice, exactly as in
  cirtorch; ``full_map=False`` gives the original MATLAB grid.

So a 7x7 map has 1 + (1 + 4 + 9) = 15 regions and a 7x10 map 1 + (2 + 6 + 12) = 21.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.features.backbones import file_sha256
from pipeline.features.transforms import fit_pca
from pipeline.layout import atomic_write_bytes

Region = tuple[int, int, int, int]  # (y, x, height, width) in feature-map cells

RMAC_OVERLAP = 0.4
RMAC_STEPS = (2, 3, 4, 5, 6, 7)
EPS = 1e-6  # added to L2 norms, as in cirtorch


def _long_side_extra(h: int, w: int, overlap: float) -> int:
    """Number of extra regions along the long side (0 for a square map)."""
    if h == w:
        return 0
    short, long_ = min(h, w), max(h, w)
    best, best_err = 0, float("inf")
    for i, s in enumerate(RMAC_STEPS):
        b = (long_ - short) / (s - 1)
        err = abs((short * short - short * b) / (short * short) - overlap)
        if err < best_err:  # strict: first minimum wins, like torch.min / MATLAB min
            best, best_err = i, err
    return best + 1


def _starts(side: int, wl: int, n: int) -> list[int]:
    if n == 1:
        return [0]
    return [min(max(k * (side - wl) // (n - 1), 0), side - wl) for k in range(n)]


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = RMAC_OVERLAP,
                 full_map: bool = True) -> list[Region]:
    """R-MAC regions ``(y, x, height, width)`` of an ``h x w`` feature map (see module doc)."""
    if h < 1 or w < 1:
        raise ValueError(f"feature map must be at least 1x1, got {h}x{w}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    side = min(h, w)
    extra = _long_side_extra(h, w, overlap)
    wd, hd = (extra, 0) if h < w else (0, extra)
    regions: list[Region] = [(0, 0, h, w)] if full_map else []
    for level in range(1, levels + 1):
        wl = (2 * side) // (level + 1)
        if wl == 0:
            continue
        for y in _starts(h, wl, level + hd):
            for x in _starts(w, wl, level + wd):
                regions.append((y, x, wl, wl))
    return regions


def _check_regions(fmap: torch.Tensor, regions: Sequence[Region]) -> None:
    if fmap.ndim != 4:
        raise ValueError(f"expected a [N, C, H, W] feature map, got shape {tuple(fmap.shape)}")
    if len(regions) == 0:
        raise ValueError("no regions")
    hh, ww = fmap.shape[-2:]
    for y, x, h, w in regions:
        if h < 1 or w < 1 or y < 0 or x < 0 or y + h > hh or x + w > ww:
            raise ValueError(f"region {(y, x, h, w)} is not inside a {hh}x{ww} map")


def region_max_pool(fmap: torch.Tensor, regions: Sequence[Region]) -> torch.Tensor:
    """Per-region spatial max: [N, C, H, W] -> [N, R, C]."""
    _check_regions(fmap, regions)
    return torch.stack([fmap[:, :, y:y + h, x:x + w].amax(dim=(2, 3))
                        for y, x, h, w in regions], dim=1)


def _l2n(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


@dataclass
class Whitening:
    """``apply(x) = (x - mean) @ projection.T``; projection rows are principal axes already
    scaled by 1/sqrt(eigenvalue + eps)."""

    mean: np.ndarray  # [d_in] float32
    projection: np.ndarray  # [d_out, d_in] float32

    @property
    def dim(self) -> int:
        return self.projection.shape[0]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) @ self.projection.T).astype(np.float32)

    def apply_torch(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)
        proj = torch.as_tensor(self.projection, dtype=x.dtype, device=x.device)
        return (x - mean) @ proj.T


def rmac_region_vectors(fmap: torch.Tensor, regions: Sequence[Region] | None = None
                        ) -> np.ndarray:
    """L2-normalised regional max vectors [N * R, C] (float32), the whitening's fitting sample."""
    if regions is None:
        regions = rmac_regions(*fmap.shape[-2:])
    with torch.no_grad():
        v = _l2n(region_max_pool(fmap, regions).float())
    return v.reshape(-1, v.shape[-1]).cpu().numpy()


def fit_rmac_whitening(region_vectors: np.ndarray, dim: int, eps: float = 1e-6) -> Whitening:
    """PCA-whitening to ``min(dim, C)`` dims fitted on (re-)L2-normalised regional vectors.

    ``eps`` is added to each eigenvalue before the 1/sqrt scaling (guards dead channels); the
    sample covariance (ddof=1) of the whitened sample is ~identity when eigenvalues >> eps."""
    x = np.asarray(region_vectors, np.float64)
    if x.ndim != 2:
        raise ValueError(f"region vectors must be [M, C], got shape {x.shape}")
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + EPS)
    pca = fit_pca(x, dim)
    scale = 1.0 / np.sqrt(pca.explained_variance.astype(np.float64) + eps)
    proj = pca.components.astype(np.float64) * scale[:, None]
    return Whitening(pca.mean.astype(np.float32), proj.astype(np.float32))


def rmac(fmap: torch.Tensor, regions: Sequence[Region] | None = None,
         whitening: Whitening | None = None, eps: float = EPS) -> torch.Tensor:
    """R-MAC descriptor [N, D]: region max -> L2 -> whiten (optional) -> L2 -> sum -> L2.

    ``regions`` defaults to :func:`rmac_regions` of the map's size. Differentiable."""
    if regions is None:
        regions = rmac_regions(*fmap.shape[-2:])
    v = _l2n(region_max_pool(fmap, regions), eps)  # [N, R, C]
    if whitening is not None:
        v = _l2n(whitening.apply_torch(v), eps)
    return _l2n(v.sum(dim=1), eps)


def save_whitening(w: Whitening, path: str | os.PathLike) -> str:
    """Write atomically (npz, deterministic bytes); returns the file's sha256."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, kind=np.array("rmac_whitening"), mean=np.asarray(w.mean, np.float32),
             projection=np.asarray(w.projection, np.float32))
    atomic_write_bytes(path, buf.getvalue())
    return file_sha256(path)


def load_whitening(path: str | os.PathLike) -> Whitening:
    with np.load(path, allow_pickle=False) as z:
        if "kind" in z.files and str(z["kind"]) != "rmac_whitening":
            raise ValueError(f"{path} holds a {str(z['kind'])!r}, not an R-MAC whitening")
        return Whitening(z["mean"], z["projection"])
