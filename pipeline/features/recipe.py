"""The feature recipe: the numeric path that turned an image into a stored vector, as one object.

Two vectors can only be compared at distance ~0 when the same arithmetic made them: the same
weights and transforms, but also the same device kind, precision (fp32, TF32 or bf16 autocast),
JPEG decoder and resize/crop. The recipe goes into the features fingerprint (changing any part of
it redoes the features), into every feature shard's metadata and into ``index.json``; ``verify``
refuses a job folder whose shards disagree, and the query side (``DefendedClassifier``) runs the
database's recipe where it can (:func:`query_recipe`) and says what differs where it cannot.

Precisions:

- ``fp32``: float32 everywhere. On a GPU this means TF32 *off* (cuDNN convolutions use TF32 by
  default, which keeps only a 10-bit mantissa), so it is the recipe a CPU reproduces best.
- ``tf32``: float32 tensors with TF32 tensor-core convolutions and matmuls (GPU only; on a CPU
  it is plain fp32 arithmetic, recorded as such).
- ``bf16``: bf16 autocast (torch.autocast). The CPU emulates it with its own bf16 kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
# The GPU default, chosen from the measured agreement between recipes (docs/gpu.md): bf16 would
# stay the default only if the lower end of the 95% interval of both the rank-1 self-retrieval
# rate and the defense's decision agreement against the CPU query path were >= 99.9%.
GPU_DEFAULT_PRECISION = "fp32"


def resolve_precision(requested: str, device_kind: str) -> str:
    """``auto`` -> the device's default; ``tf32`` on a CPU is fp32 arithmetic, so recorded as
    fp32 (the recipe says what ran, not what was asked)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        return GPU_DEFAULT_PRECISION if device_kind == "cuda" else "fp32"
    if requested == "tf32" and device_kind != "cuda":
        return "fp32"
    return requested


@contextlib.contextmanager
def precision_context(device_kind: str, precision: str):
    """Run the forward pass inside with ``precision`` on ``device_kind``: bf16 autocast, or
    float32 with TF32 switched on or off (both of torch's global TF32 flags, restored after)."""
    import torch

    if precision == "bf16":
        with torch.autocast(device_kind, dtype=torch.bfloat16):
            yield
        return
    if device_kind != "cuda":
        yield
        return
    tf32 = precision == "tf32"
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass(frozen=True)
class FeatureRecipe:
    """Everything numeric that made a feature vector (see the module docstring)."""

    device: str  # "cpu" | "cuda": the kind; which GPU does not change the arithmetic
    precision: str  # fp32 | tf32 | bf16
    decoder: str  # pil | torchvision
    resize: int
    crop: int
    interpolation: str
    weights_sha256: str
    transforms_sha256: str  # one hash over every layer's transform stack hash

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def id(self) -> str:
        """A short hash naming the recipe (in fingerprints, metadata and error messages)."""
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> FeatureRecipe:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def differences(self, other: FeatureRecipe) -> dict[str, tuple]:
        """{field: (self's, other's)} for every field that differs."""
        a, b = self.as_dict(), other.as_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def transforms_hash(transform_sha256: dict[str, str]) -> str:
    """One hash over the per-layer transform stack hashes."""
    text = json.dumps(transform_sha256, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_recipe(preprocess: dict, device_kind: str, precision: str, decoder: str,
                weights_sha256: str, transform_sha256: dict[str, str]) -> FeatureRecipe:
    """The recipe of features made on ``device_kind`` with the requested ``precision`` and
    ``decoder`` (``auto`` resolved for that device) from a model's ``preprocess`` dict."""
    from pipeline.features.tensor_decode import resolve_backend

    return FeatureRecipe(device=device_kind, precision=resolve_precision(precision, device_kind),
                         decoder=resolve_backend(decoder, device_kind),
                         resize=int(preprocess["resize"]), crop=int(preprocess["crop"]),
                         interpolation=str(preprocess["interpolation"]),
                         weights_sha256=weights_sha256,
                         transforms_sha256=transforms_hash(transform_sha256))


def query_recipe(database: FeatureRecipe, device_kind: str) -> tuple[FeatureRecipe, dict]:
    """The recipe a query path on ``device_kind`` runs to match ``database``: the same
    precision (a CPU emulates bf16 autocast; TF32 is a GPU's arithmetic, so a CPU runs fp32)
    and the same decoder (torchvision's decode runs on a CPU too). Returns it and what still
    differs ({} when the query path reproduces the database's arithmetic)."""
    precision = resolve_precision(database.precision, device_kind)
    query = FeatureRecipe(**{**database.as_dict(), "device": device_kind,
                             "precision": precision})
    return query, database.differences(query)


class RecipeMismatch(ValueError):
    """Feature files of one job made by different recipes."""


def check_one_recipe(recipes: dict[str, dict | None]) -> FeatureRecipe | None:
    """The one recipe shared by every file in ``recipes`` ({file: recipe dict or None for files
    written before recipes were recorded}); raises :class:`RecipeMismatch` naming two files
    that disagree and how."""
    first_file, first = None, None
    for path, raw in recipes.items():
        if raw is None:
            continue
        recipe = FeatureRecipe.from_dict(raw)
        if first is None:
            first_file, first = path, recipe
        elif recipe != first:
            diff = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in first.differences(recipe).items())
            raise RecipeMismatch(
                f"{path}: made by feature recipe {recipe.id} but {first_file} by {first.id} "
                f"({diff}): one job's vectors must come from one recipe; re-run the features "
                "stage with one features.precision/decode_backend and one kind of device")
    return first
