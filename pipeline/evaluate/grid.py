"""The evaluation grid: adversarial sets x databases x defenses -> per-image predictions (cells,
written once and reused on resume) -> accuracy rows with Wilson CIs, and the worst case.

A defense is (layer, weighting, K), or ("none", "-", 0) for the undefended classifier. The K
values of a grid come from one search with the largest K: the nearest-first neighbour lists
of a smaller K are prefixes of it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.defense.searchers import Neighbours

NONE = ("none", "-", 0)
WEIGHTING_NAMES = {"uw": "UW", "cbw_e": "CBW-E", "cbw_d": "CBW-D", "-": ""}


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def defense_list(layers: list[str], weightings: list[str], ks: list[int]) -> list[tuple]:
    """The undefended classifier first, then every (layer, weighting, K)."""
    return [NONE] + [(layer, rule, k) for layer in layers for rule in weightings for k in ks]


def prefix(neighbours: Neighbours, k: int) -> Neighbours:
    """The k nearest of a nearest-first neighbour list."""
    return Neighbours(*(None if a is None else a[:, :k] for a in neighbours.arrays()))


def predict_defenses(defense, model, x: torch.Tensor, defenses: list[tuple]) -> np.ndarray:
    """Predicted labels [len(defenses), N] for images ``x`` in [0, 1]. ``defense`` (a
    DefendedClassifier) may be None when only the undefended classifier is evaluated."""
    layers = list(dict.fromkeys(d[0] for d in defenses if d != NONE))
    if defense is None or not layers:
        from pipeline.evaluate.suite import predict_labels

        with torch.inference_mode():
            return predict_labels(model, x).numpy()[None].astype(np.int16)
    kmax = max(d[2] for d in defenses)
    probs, found = defense.neighbours_all_layers(x, layers, kmax)
    preds = []
    for layer, rule, k in defenses:
        preds.append(probs.argmax(1) if layer == "none" else
                     defense.vote(prefix(found[layer], k), rule)[0])
    return np.stack(preds).astype(np.int16)


def accuracy_row(correct_mask: np.ndarray, **fields) -> dict:
    correct, n = int(correct_mask.sum()), int(correct_mask.size)
    lo, hi = wilson_interval(correct, n)
    return {**fields, "n": n, "correct": correct, "accuracy": correct / n if n else float("nan"),
            "ci95_low": lo, "ci95_high": hi}


def cell_rows(database: dict, condition: dict, defenses: list[tuple], preds: np.ndarray,
              labels: np.ndarray) -> list[dict]:
    """One row per defense for one (database, condition) cell."""
    return [accuracy_row(preds[i] == labels, **database, **condition,
                         layer=layer, weighting=rule, k=k)
            for i, (layer, rule, k) in enumerate(defenses)]


def worst_case_rows(database: dict, clean: np.ndarray, attacked: dict[float, list[np.ndarray]],
                    defenses: list[tuple], labels: np.ndarray) -> list[dict]:
    """Robust accuracy per budget as AutoAttack counts it: an image is robust for a defense only
    if it is right on the clean image and under every attack set in ``attacked[budget]`` (the
    caller passes every set of that budget or a smaller one)."""
    rows = []
    for budget, pred_sets in sorted(attacked.items()):
        robust = clean == labels[None]
        for preds in pred_sets:
            robust &= preds == labels[None]
        cond = {"condition": f"worst-case@{budget:g}", "attack": "worst-case", "threat": "all",
                "target_layer": "", "budget": budget, "attacks_in_worst_case": len(pred_sets)}
        rows.extend(accuracy_row(robust[i], **database, **cond, layer=layer, weighting=rule, k=k)
                    for i, (layer, rule, k) in enumerate(defenses))
    return rows


def save_npz(path: Path, **arrays) -> None:
    """Atomic: a killed run leaves the old cell or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
