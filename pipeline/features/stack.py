"""A layer's whole feature transform, fitted once and applied identically to database images and
queries: pooling (average or R-MAC with its regional whitening) -> PCA (optionally whitened) ->
storage code (float16 / float32, 8-bit scalar codes, or packed binary codes).

Saved as one folder per layer under ``transforms/``; its hash (over every file in it) is recorded
in each Parquet shard's metadata and in the index, so mismatched parts are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.features.backbones import pool
from pipeline.features.quantize import (
    ITQ,
    ScalarQuantizer8,
    SignQuantizer,
    load_quantizer,
    save_quantizer,
)
from pipeline.features.rmac import (
    Whitening,
    fit_rmac_whitening,
    load_whitening,
    rmac,
    rmac_region_vectors,
    save_whitening,
)
from pipeline.features.transforms import PCA, fit_pca, load_pca, save_pca
from pipeline.layout import atomic_write_bytes

BINARY_CODES = ("itq", "sign")


@dataclass
class LayerTransform:
    pooling: str  # avg | rmac
    pca: PCA
    whiten: bool = False  # PCA-whitening: scale each component to unit variance
    storage: str = "float16"  # float16 | float32 | sq8 | itq | sign
    rmac_whitening: Whitening | None = None
    quantizer: object | None = None

    @property
    def binary(self) -> bool:
        return self.storage in BINARY_CODES

    @property
    def dim(self) -> int:
        """Dimension of what FAISS sees: floats, or bits for binary codes."""
        return self.pca.dim

    @property
    def code_size(self) -> int:
        return {"float16": 2 * self.dim, "float32": 4 * self.dim, "sq8": self.dim}.get(
            self.storage, self.dim // 8)

    def pool(self, tap: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] activation -> [N, C] (torch, differentiable, on the tap's device)."""
        if self.pooling == "rmac":
            return rmac(tap.float(), whitening=self.rmac_whitening)
        return pool(tap.float(), self.pooling)

    def _scale(self) -> np.ndarray:
        ev = self.pca.explained_variance
        return 1.0 / np.sqrt(ev + 1e-6 * ev.max()) if self.whiten else np.ones_like(ev)

    def project(self, pooled: np.ndarray) -> np.ndarray:
        return (self.pca.apply(pooled) * self._scale()).astype(np.float32)

    def project_torch(self, pooled: torch.Tensor) -> torch.Tensor:
        """:meth:`project` in torch (differentiable, for attacks on the defense)."""
        as_t = lambda a: torch.as_tensor(a, dtype=pooled.dtype, device=pooled.device)  # noqa: E731
        return ((pooled - as_t(self.pca.mean)) @ as_t(self.pca.components).T) * as_t(self._scale())

    def encode(self, projected: np.ndarray) -> np.ndarray:
        """Storage codes written to Parquet."""
        if self.storage in ("float16", "float32"):
            return projected.astype(self.storage)
        return self.quantizer.encode(projected)

    def search_vectors(self, stored: np.ndarray) -> np.ndarray:
        """What FAISS indexes and searches: float32 vectors, or packed uint8 codes (Hamming)."""
        if self.binary:
            return np.ascontiguousarray(stored, np.uint8)
        if self.storage == "sq8":
            return self.quantizer.decode(stored)
        return np.asarray(stored, np.float32)

    def query_vectors(self, pooled: np.ndarray) -> np.ndarray:
        """Pooled query features -> exactly the database's path (same rounding / codes)."""
        return self.search_vectors(self.encode(self.project(pooled)))

    # -- files --------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> str:
        """Write every part into ``folder``; returns the stack's hash."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"pca.npz": save_pca(self.pca, folder / "pca.npz")}
        if self.rmac_whitening is not None:
            files["rmac_whitening.npz"] = save_whitening(self.rmac_whitening, folder / "rmac_whitening.npz")
        if self.quantizer is not None:
            files["quantizer.npz"] = save_quantizer(self.quantizer, folder / "quantizer.npz")
        meta = {"pooling": self.pooling, "whiten": self.whiten, "storage": self.storage,
                "files": files}
        atomic_write_bytes(folder / "stack.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        return stack_hash(folder)


def stack_hash(folder: str | os.PathLike) -> str:
    meta = (Path(folder) / "stack.json").read_text()
    return hashlib.sha256(meta.encode()).hexdigest()  # stack.json lists every file's sha256


def load_stack(folder: str | os.PathLike) -> LayerTransform:
    folder = Path(folder)
    if not (folder / "stack.json").is_file():
        raise FileNotFoundError(f"{folder}: no fitted transform; run the transforms stage")
    meta = json.loads((folder / "stack.json").read_text())
    return LayerTransform(
        pooling=meta["pooling"], pca=load_pca(folder / "pca.npz"), whiten=meta["whiten"],
        storage=meta["storage"],
        rmac_whitening=load_whitening(folder / "rmac_whitening.npz")
        if "rmac_whitening.npz" in meta["files"] else None,
        quantizer=load_quantizer(folder / "quantizer.npz") if "quantizer.npz" in meta["files"] else None)


def fit_stacks(forward_batches, layers, *, pooling: str, pca_dim: int, whiten: bool, storage: str,
               rmac_sample: int = 2000, seed: int = 0) -> dict[str, LayerTransform]:
    """Fit every layer's stack from one pass over the fitting sample (two with R-MAC: regional
    whitening first, then the PCA on R-MAC vectors). ``forward_batches(limit)`` yields
    ``{layer: activation [N, C, H, W]}`` for at most ``limit`` images (None = the whole sample)."""
    whitening: dict[str, Whitening] = {}
    if pooling == "rmac":
        regions: dict[str, list] = {name: [] for name in layers}
        for taps in forward_batches(rmac_sample):
            for name in layers:
                regions[name].append(rmac_region_vectors(taps[name].float()))
        for name, parts in regions.items():
            sample = np.concatenate(parts)
            whitening[name] = fit_rmac_whitening(sample, min(sample.shape[1], len(sample) - 1))
    stacks = {name: LayerTransform(pooling, None, whiten, storage, whitening.get(name))
              for name in layers}
    pooled: dict[str, list] = {name: [] for name in layers}
    for taps in forward_batches(None):
        for name in layers:
            pooled[name].append(stacks[name].pool(taps[name]).cpu().numpy())
    for name, stack in stacks.items():
        sample = np.concatenate(pooled[name])
        stack.pca = fit_pca(sample, pca_dim)
        if storage in BINARY_CODES and stack.pca.dim % 8:
            raise ValueError(f"{name}: binary codes need a PCA dim divisible by 8, got {stack.pca.dim}")
        stack.quantizer = fit_quantizer(storage, stack.project(sample), seed)
    return stacks


def fit_quantizer(storage: str, projected: np.ndarray, seed: int = 0):
    """The storage quantiser fitted on projected sample vectors (None for float storage)."""
    if storage == "sq8":
        return ScalarQuantizer8.fit(projected)
    if storage == "itq":
        return ITQ.fit(projected, seed=seed)
    if storage == "sign":
        return SignQuantizer.fit(projected)
    return None
