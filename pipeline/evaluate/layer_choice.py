"""The query side's default layer, chosen from a job's own evaluation.

The last tap is not a safe default: against the demo's gray-box PGD it is the least robust layer
(conv_4_2 0.094 against 0.556 at conv_2_2). So when a job has been evaluated, ``serve`` and
``classify`` default to the layer with the best worst-case accuracy at the headline budget; where
the 95% intervals of several layers overlap with the best one (a difference the evaluation cannot
tell from noise), the one with the better clean accuracy among them. The choice and its reason go
to ``eval/default_layer.json``; ``--layer`` (or ``layer=``) overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.layout import write_json


def choose_default_layer(rows: list[dict], *, database: str, weighting: str, k: int,
                         budget: float | None) -> dict | None:
    """{"layer", "reason", "weighting", "k", "budget", "by_layer"} from evaluation ``rows``
    (results.csv's), or None when they hold no kNN row for this weighting and k."""
    def pick(attack: str, at_budget: float | None) -> dict[str, dict]:
        return {r["layer"]: r for r in rows
                if r["database"] == database and r["layer"] != "none" and r["weighting"] == weighting
                and int(r["k"]) == int(k) and r["attack"] == attack
                and (at_budget is None or r["budget"] == at_budget)}

    clean = pick("clean", None)
    worst = pick("worst-case", budget) if budget is not None else {}
    if not clean:
        return None
    by_layer = {layer: {"clean": round(row["accuracy"], 4),
                        "worst_case": round(worst[layer]["accuracy"], 4) if layer in worst else None}
                for layer, row in clean.items()}
    if worst:
        best = max(worst.values(), key=lambda r: r["accuracy"])
        tied = [layer for layer, r in worst.items() if r["ci95_high"] >= best["ci95_low"]]
        layer = max(tied, key=lambda name: clean[name]["accuracy"])
        if len(tied) == 1:
            why = (f"best worst-case accuracy at budget {budget:g} ({worst[layer]['accuracy']:.3f}; "
                   f"no other layer's 95% interval reaches it)")
        else:
            why = (f"worst-case accuracy at budget {budget:g} within the 95% interval of the best "
                   f"for {', '.join(sorted(tied))}; of those, the best clean accuracy "
                   f"({clean[layer]['accuracy']:.3f})")
    else:
        layer = max(clean, key=lambda name: clean[name]["accuracy"])
        why = f"no attack was evaluated: the best clean accuracy ({clean[layer]['accuracy']:.3f})"
    return {"layer": layer, "reason": f"{layer}: {why} ({weighting}, k={k}, {database})",
            "weighting": weighting, "k": int(k), "budget": budget, "by_layer": by_layer}


def record_default_layer(path: str | os.PathLike, rows: list[dict], *, database: str,
                         weighting: str, k: int, budget: float | None) -> dict | None:
    """Write the choice to ``path`` (eval/default_layer.json); returns it."""
    choice = choose_default_layer(rows, database=database, weighting=weighting, k=k,
                                  budget=budget)
    if choice is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, choice)
    return choice
