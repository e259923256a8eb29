"""Does a compact softmax encoding change the defense's decisions? Measured, not assumed.

For each weighting rule the kNN vote over the full neighbour softmax vectors is compared with the
vote over the encoded-then-decoded vectors; CBW-E / CBW-D use the weights stored in the values
(:func:`pipeline.store.softmax_store.decode_with_weights`), as the query path does.
"""

from __future__ import annotations

import numpy as np

from pipeline.store.softmax_store import decode_with_weights, encode_many
from pipeline.weighting import predict, vote

RULES = ("uw", "cbw_e", "cbw_d")


def decisions_agree(softmax_neighbours: np.ndarray, encoding: str, m: int = 20, p: float = 3.0,
                    found: np.ndarray | None = None, **options) -> dict:
    """Agreement of kNN decisions, full vectors vs ``encoding``, for neighbour sets [N, K, C].

    ``options`` go to the encoder (e.g. ``k`` for topk); ``m``/``p`` are CBW-D's and are also
    what topk values store. Returns ``{"uw": frac, "cbw_e": frac, "cbw_d": frac,
    "bytes_per_value": mean value size, "max_score_diff": {rule: max |scores - scores_full|},
    "max_disagreement_margin": {rule: largest full-vote margin (top score minus the score of the
    class the encoded vote chose) among disagreeing sets - small means flips only at near-ties},
    "n": N, "encoding": encoding}``."""
    s = np.asarray(softmax_neighbours, np.float32)
    if s.ndim != 3:
        raise ValueError(f"softmax_neighbours must be [N, K, C], got shape {s.shape}")
    n, k, num_classes = s.shape
    enc_options = dict(options, m=m, p=p) if encoding == "topk" else options
    values = encode_many(s.reshape(-1, num_classes), encoding, **enc_options)
    dense = np.empty((n * k, num_classes), np.float32)
    weights = np.empty((n * k, 2), np.float64)
    for j, value in enumerate(values):
        dense[j], weights[j, 0], weights[j, 1] = decode_with_weights(value, m, p)
    dense = dense.reshape(n, k, num_classes)
    weights = weights.reshape(n, k, 2)
    out: dict = {"n": n, "encoding": encoding,
                 "bytes_per_value": float(np.mean([len(v) for v in values])),
                 "max_score_diff": {}, "max_disagreement_margin": {}}
    for rule in RULES:
        labels_full, scores_full = predict(s, rule, found, m, p)
        if rule == "uw":
            w = np.ones((n, k))
        else:
            w = weights[..., 0] if rule == "cbw_e" else weights[..., 1]
        scores = vote(dense, w, found)
        labels = scores.argmax(-1)
        out[rule] = float(np.mean(labels == labels_full))
        out["max_score_diff"][rule] = float(np.abs(scores - scores_full).max()) if n else 0.0
        # How close to a tie the full vote was where the encoded one chose another class.
        rows = np.flatnonzero(labels != labels_full)
        gap = scores_full[rows, labels_full[rows]] - scores_full[rows, labels[rows]]
        out["max_disagreement_margin"][rule] = float(gap.max()) if len(rows) else 0.0
    return out
