"""Weighting rules for the kNN vote over neighbours' softmax vectors (Dubey et al., Sec. 3).

All functions take neighbour softmax vectors ``s`` of shape [N, K, C] and return weights [N, K].
Prediction = argmax_c sum_k w_k s_kc (ties go to the lowest class index, as numpy's argmax).
"""

from __future__ import annotations

import numpy as np


def uniform_weights(s: np.ndarray) -> np.ndarray:
    """UW: every neighbour counts the same."""
    return np.ones(s.shape[:-1], np.float64)


def entropy_weights(s: np.ndarray) -> np.ndarray:
    """CBW-E: w = |log C + sum_c s_c log s_c|, the gap between max entropy and the entropy."""
    s = np.asarray(s, np.float64)
    plogp = np.where(s > 0, s * np.log(np.where(s > 0, s, 1.0)), 0.0)
    return np.abs(np.log(s.shape[-1]) + plogp.sum(-1))


def diversity_weights(s: np.ndarray, m: int = 20, p: float = 3.0) -> np.ndarray:
    """CBW-D: w = sum_{j=2}^{M+1} (s_(1) - s_(j))^P with s sorted descending;
    M is capped at C - 1 when there are fewer than M + 1 classes."""
    s = np.asarray(s, np.float64)
    m = min(m, s.shape[-1] - 1)
    top = -np.sort(-s, axis=-1)[..., : m + 1]
    return ((top[..., :1] - top[..., 1:]) ** p).sum(-1)


def neighbour_weights(s: np.ndarray, rule: str, m: int = 20, p: float = 3.0) -> np.ndarray:
    if rule == "uw":
        return uniform_weights(s)
    if rule == "cbw_e":
        return entropy_weights(s)
    if rule == "cbw_d":
        return diversity_weights(s, m, p)
    raise ValueError(f"unknown weighting {rule!r}; use uw, cbw_e or cbw_d")


def vote(s: np.ndarray, weights: np.ndarray, found: np.ndarray | None = None) -> np.ndarray:
    """Class scores [N, C] = sum_k w_k s_k, normalised to sum to 1 (missing neighbours ignored)."""
    w = np.asarray(weights, np.float64)
    if found is not None:
        w = w * found
    scores = np.einsum("nk,nkc->nc", w, np.asarray(s, np.float64))
    total = scores.sum(-1, keepdims=True)
    return np.divide(scores, total, out=np.zeros_like(scores), where=total > 0)


def predict(s: np.ndarray, rule: str, found: np.ndarray | None = None, m: int = 20, p: float = 3.0
            ) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], scores [N, C]) of the weighted kNN vote."""
    scores = vote(s, neighbour_weights(s, rule, m, p), found)
    return scores.argmax(-1), scores
