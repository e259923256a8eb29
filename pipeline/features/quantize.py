"""Storage codes for PCA-reduced features: 8-bit scalar codes and binary (sign / ITQ) codes.

* :class:`ScalarQuantizer8` - per-dimension uniform 8-bit codes over a fitted [min, max] range
  (widened by a small margin); error <= step / 2 inside the range, values outside are clipped.
* :class:`SignQuantizer` - one bit per dimension, ``x - mean > 0``, no rotation.
* :class:`ITQ` - iterative quantisation (Gong & Lazebnik, CVPR 2011 / TPAMI 2013): a rotation R,
  learnt by alternating ``B = sign(V R)`` and the orthogonal Procrustes solution for R, that
  minimises the quantisation loss ``||B - V R||_F^2`` of the centred data V. Apply it to
  PCA-reduced (optionally whitened) features: the number of bits is the input dimension.

Binary codes are packed with :func:`numpy.packbits` (``D / 8`` bytes per vector, D must be a
multiple of 8) - the layout FAISS's binary indexes (``IndexBinaryFlat``/``IndexBinaryIVF``) take.
Every quantiser saves to one npz format with a ``kind`` field (:func:`save_quantizer` /
:func:`load_quantizer`) whose sha256 goes into the Parquet metadata. Both binary quantisers
centre with the mean of their fitting sample (a no-op for PCA outputs, which are centred).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.features.backbones import file_sha256
from pipeline.layout import atomic_write_bytes

FORMAT_VERSION = 1
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _as_2d(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [N, D] array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} has {x.shape[1]} dims, the quantiser was fitted on {dim}")
    return x


def _check_finite(x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        raise ValueError("input holds NaN or infinite values")


def _check_bits(dim: int) -> None:
    if dim % 8:
        raise ValueError(f"binary codes need a dimension that is a multiple of 8 (packed into "
                         f"bytes), got {dim}; reduce with PCA to a multiple of 8 first")


# --------------------------------------------------------------------------------------------
# 8-bit scalar quantiser
# --------------------------------------------------------------------------------------------

@dataclass
class ScalarQuantizer8:
    """Per-dimension uniform 8-bit codes: ``code = round((x - vmin) / step)``, ``step =
    (vmax - vmin) / 255``, clipped to 0..255."""

    vmin: np.ndarray  # [D] float32
    vmax: np.ndarray  # [D] float32
    kind: ClassVar[str] = "sq8"

    @classmethod
    def fit(cls, x: np.ndarray, margin: float = 0.01) -> ScalarQuantizer8:
        """Range = sample [min, max] widened by ``margin`` x width on each side (dimensions
        constant in the sample get a width of ``margin * max(|value|, 1)`` each side)."""
        x = _as_2d(x, None, "sample").astype(np.float64)
        if len(x) == 0:
            raise ValueError("cannot fit on an empty sample")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        _check_finite(x)
        lo, hi = x.min(0), x.max(0)
        width = hi - lo
        pad = margin * np.where(width > 0, width, np.maximum(np.abs(lo), 1.0))
        return cls((lo - pad).astype(np.float32), (hi + pad).astype(np.float32))

    @property
    def dim(self) -> int:
        return int(self.vmin.shape[0])

    @property
    def code_size(self) -> int:
        """Bytes per vector."""
        return self.dim

    @property
    def step(self) -> np.ndarray:
        """Quantisation step per dimension (float64); error inside the range is <= step / 2."""
        step = (self.vmax.astype(np.float64) - self.vmin.astype(np.float64)) / 255.0
        return np.where(step > 0, step, 1.0)

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = _as_2d(x, self.dim, "input").astype(np.float64)
        _check_finite(x)
        q = np.rint((x - self.vmin.astype(np.float64)) / self.step)
        return np.clip(q, 0, 255).astype(np.uint8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = _as_2d(codes, self.dim, "codes")
        if codes.dtype != np.uint8:
            raise ValueError(f"codes must be uint8, got {codes.dtype}")
        return (self.vmin.astype(np.float64) + codes * self.step).astype(np.float32)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"vmin": self.vmin.astype(np.float32), "vmax": self.vmax.astype(np.float32)}

    @classmethod
    def _from_arrays(cls, z) -> ScalarQuantizer8:
        return cls(z["vmin"], z["vmax"])


# --------------------------------------------------------------------------------------------
# Binary codes
# --------------------------------------------------------------------------------------------

def quantization_loss(v: np.ndarray, rotation: np.ndarray | None = None) -> float:
    """``||B - V R||_F^2`` with ``B = sign(V R)`` in {-1, +1} (R = identity when None)."""
    vr = np.asarray(v, np.float64)
    if rotation is not None:
        vr = vr @ np.asarray(rotation, np.float64)
    b = np.where(vr > 0, 1.0, -1.0)
    return float(((b - vr) ** 2).sum())


def random_rotation(dim: int, seed: int) -> np.ndarray:
    """Haar-random orthogonal [dim, dim] matrix (QR of a Gaussian, signs fixed), float64."""
    g = np.random.default_rng(seed).standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


class _BinaryQuantizer:
    """Shared part of the binary quantisers: bits = ``project(x) > 0``, packed with packbits."""

    mean: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def code_size(self) -> int:
        """Bytes per vector."""
        return self.dim // 8

    def _centred(self, x: np.ndarray) -> np.ndarray:
        return _as_2d(x, self.dim, "input").astype(np.float64) - self.mean.astype(np.float64)

    def project(self, x: np.ndarray) -> np.ndarray:
        """The real-valued vectors whose signs are the bits (float64)."""
        raise NotImplementedError

    def bits(self, x: np.ndarray) -> np.ndarray:
        """Unpacked bits [N, D] (bool)."""
        return self.project(x) > 0

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Packed codes [N, D / 8] (uint8)."""
        return np.packbits(self.bits(x), axis=1)

    def quantization_loss(self, x: np.ndarray) -> float:
        """``||B - V R||_F^2`` of ``x`` under this quantiser."""
        return quantization_loss(self.project(x))


def _binary_sample(x: np.ndarray, min_rows: int) -> np.ndarray:
    x = _as_2d(x, None, "sample").astype(np.float64)
    _check_bits(x.shape[1])
    if len(x) < min_rows:
        raise ValueError(f"need a sample of at least {min_rows} vectors, got {len(x)}")
    _check_finite(x)
    return x


@dataclass
class SignQuantizer(_BinaryQuantizer):
    """Bit ``d`` = ``x_d - mean_d > 0`` (no rotation)."""

    mean: np.ndarray  # [D] float32
    kind: ClassVar[str] = "sign"

    @classmethod
    def fit(cls, x: np.ndarray) -> SignQuantizer:
        return cls(_binary_sample(x, 1).mean(0).astype(np.float32))

    def project(self, x: np.ndarray) -> np.ndarray:
        return self._centred(x)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean.astype(np.float32)}

    @classmethod
    def _from_arrays(cls, z) -> SignQuantizer:
        return cls(z["mean"])


@dataclass
class ITQ(_BinaryQuantizer):
    """Iterative quantisation: bits = ``(x - mean) @ rotation > 0``."""

    mean: np.ndarray  # [D] float32
    rotation: np.ndarray  # [D, D] float32, orthogonal
    kind: ClassVar[str] = "itq"

    @classmethod
    def fit(cls, x: np.ndarray, n_iter: int = 50, seed: int = 0) -> ITQ:
        """Random orthogonal init from ``seed``, then ``n_iter`` alternations of
        ``B = sign(V R)`` and ``R = U W^T`` from the SVD ``V^T B = U S W^T`` (orthogonal
        Procrustes). ``n_iter=0`` gives the random-rotation baseline. Deterministic for a seed."""
        x = _binary_sample(x, 2)
        mean = x.mean(0)
        v = x - mean
        r = random_rotation(x.shape[1], seed)
        for _ in range(n_iter):
            b = np.where(v @ r > 0, 1.0, -1.0)
            u, _s, wt = np.linalg.svd(v.T @ b)
            r = u @ wt
        return cls(mean.astype(np.float32), r.astype(np.float32))

    def project(self, x: np.ndarray) -> np.ndarray:
        return self._centred(x) @ self.rotation.astype(np.float64)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean.astype(np.float32),
                "rotation": self.rotation.astype(np.float32)}

    @classmethod
    def _from_arrays(cls, z) -> ITQ:
        return cls(z["mean"], z["rotation"])


def hamming(codes_a: np.ndarray, codes_b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances [Na, Nb] (int32) between packed uint8 codes [N, D/8]."""
    a = np.atleast_2d(np.asarray(codes_a))
    b = np.atleast_2d(np.asarray(codes_b))
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8, got {a.dtype} and {b.dtype}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"code shapes {a.shape} and {b.shape} do not match")
    out = np.empty((len(a), len(b)), np.int32)
    chunk = max(1, (1 << 24) // max(1, len(b) * a.shape[1]))
    for i in range(0, len(a), chunk):
        x = np.bitwise_xor(a[i:i + chunk, None, :], b[None, :, :])
        out[i:i + chunk] = _POPCOUNT[x].sum(-1, dtype=np.int32)
    return out


# --------------------------------------------------------------------------------------------
# One file format for every quantiser
# --------------------------------------------------------------------------------------------

Quantizer = ScalarQuantizer8 | SignQuantizer | ITQ
KINDS: dict[str, type] = {c.kind: c for c in (ScalarQuantizer8, SignQuantizer, ITQ)}


def save_quantizer(q: Quantizer, path: str | os.PathLike) -> str:
    """Write ``q`` atomically as npz (``kind``, ``format_version`` + its arrays; the bytes depend
    only on the contents); returns the file's sha256."""
    if type(q) not in KINDS.values():
        raise TypeError(f"not a quantiser: {type(q).__name__}")
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, kind=np.array(q.kind), format_version=np.array(FORMAT_VERSION, np.int64),
             **q._arrays())
    atomic_write_bytes(path, buf.getvalue())
    return file_sha256(path)


def load_quantizer(path: str | os.PathLike) -> Quantizer:
    with np.load(path, allow_pickle=False) as z:
        if "kind" not in z.files:
            raise ValueError(f"{path} is not a quantiser file (no 'kind' field)")
        kind = str(z["kind"])
        if kind not in KINDS:
            raise ValueError(f"{path}: unknown quantiser kind {kind!r}; known: {sorted(KINDS)}")
        version = int(z["format_version"]) if "format_version" in z.files else None
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported quantiser format version {version}")
        return KINDS[kind]._from_arrays(z)
