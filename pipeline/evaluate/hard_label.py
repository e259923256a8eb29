"""The hard-label attack on the deployed classifiers of a grid: HopSkipJump (foolbox) against the
undefended network and each layer's hard kNN vote over the database's real index and store, on
one seeded subsample of the query images, read at each query budget.

Each classifier's result is written once (``hard_label/<set>/<classifier>.npz``) and reused, so
a killed run loses at most the classifier it was attacking.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.attacks.hard_label import hop_skip_jump
from pipeline.evaluate.grid import NONE, accuracy_row, save_npz


def query_label(q: int) -> str:
    """1000 -> '1k', 2500 -> '2.5k', 300 -> '300' (column titles: 'HSJ 1k hard-label')."""
    return f"{q / 1000:g}k" if q >= 1000 else str(q)


def classifiers(db, layers: list[str], ev) -> list[tuple]:
    """What the attack targets: the undefended network, then each layer's vote with the tables'
    weighting and K (the deployed configuration)."""
    if db.defense is None:
        return [NONE]
    return [NONE] + [(layer, ev.weightings[-1], ev.k) for layer in layers]


def labels_function(db, model, defense: tuple, batch: int = 256):
    """``images -> labels`` of one classifier: what ``serve`` would answer."""
    layer, rule, k = defense

    def undefended(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.cat([model(images[s:s + batch]).argmax(1)
                              for s in range(0, len(images), batch)]).numpy()

    def defended(images: torch.Tensor) -> np.ndarray:
        _, found = db.defense.neighbours_all_layers(images, [layer], k)
        return db.defense.vote(found[layer], rule)[0]

    return undefended if layer == "none" else defended


def subsample(n: int, num_images: int, seed: int) -> np.ndarray:
    """The same sorted, seeded subsample of query indices for every classifier."""
    if num_images >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, num_images, replace=False))


def run_hard_label(out: Path, spec, x: torch.Tensor, y: torch.Tensor, db, model, layers: list[str],
                   ev, set_fp: str, num_classes: int, progress: bool = True) -> list[dict]:
    """Attack every classifier (or load its saved result). Returns one record per classifier:
    its defense tuple, the subsample, per-image ``correct`` [Q, n] and summary statistics."""
    budget = spec.budgets[0]
    images = subsample(len(x), spec.num_images, ev.seed)
    xs, ys = x[images], y[images]
    folder = out / "hard_label" / f"{spec.label}@{budget:g}-{set_fp}"
    records = []
    targets = classifiers(db, layers, ev)
    bar = tqdm(total=len(targets) * len(images), desc=f"{spec.label} (hard-label)", unit="img",
               disable=not progress)
    for defense in targets:
        path = folder / f"{'-'.join(map(str, defense))}.npz"
        if path.is_file():
            with np.load(path) as saved:
                result = {k: saved[k] for k in saved.files if k != "stats"}
                stats = json.loads(str(saved["stats"]))
            bar.update(len(images))
        else:
            t = time.time()
            bar.set_postfix_str("none" if defense == NONE else defense[0])
            result = hop_skip_jump(labels_function(db, model, defense), xs, ys, budget,
                                   spec.query_budgets, num_classes, pool=x,
                                   initial_gradient_evals=spec.initial_gradient_evals,
                                   batch_size=spec.batch_size, seed=ev.seed, progress=bar)
            result = {k: np.asarray(v) for k, v in result.items()}
            # the counted images, as serve would receive them (8-bit)
            result["adversarial"] = np.round(result["adversarial"] * 255).astype(np.uint8)
            stats = summary(result, time.time() - t)
            save_npz(path, stats=json.dumps(stats), **result)
        records.append({"defense": defense, "images": images, "correct": result["correct"],
                        "stats": stats})
    bar.close()
    return records


def summary(result: dict, seconds: float) -> dict:
    """Per classifier: images attacked, broken at the largest budget, median queries to success
    (of the broken images: a conditional median, read beside the number broken), achieved
    normalised L2 of the counted 8-bit images, median minimal L2 found, queries spent."""
    broken = ~result["correct"][-1] & result["clean_correct"]
    q = result["queries_to_success"][broken & np.isfinite(result["queries_to_success"])]
    achieved = result["achieved"][-1][broken]
    min_norm = result["min_norm"][result["attacked"].astype(bool)]
    return {"images": int(len(result["attacked"])), "attacked": int(result["attacked"].sum()),
            "clean_correct": int(result["clean_correct"].sum()),
            "broken_at_max": int(broken.sum()),
            "median_queries_to_success": float(np.median(q)) if len(q) else None,
            "achieved_l2_mean": float(np.nanmean(achieved)) if len(achieved) else None,
            "min_norm_median": float(np.median(min_norm)) if len(min_norm) else None,
            "queries_per_image": int(result["queries"]), "seconds": round(seconds, 1)}


def hard_label_rows(records: list[dict], spec, labels: np.ndarray, db_fields: dict) -> list[dict]:
    """Accuracy rows: one per (classifier, query budget), on the subsample."""
    budget = spec.budgets[0]
    rows = []
    for rec in records:
        layer, rule, k = rec["defense"]
        for qi, q in enumerate(spec.query_budgets):
            rows.append(accuracy_row(
                rec["correct"][qi], **db_fields,
                condition=f"{spec.label}-hard_label@{budget:g}/{q}",
                attack=f"{spec.label}.{query_label(q)}", threat="hard_label", target_layer="",
                budget=budget, attacks_in_worst_case="", layer=layer, weighting=rule, k=k, queries=q))
    return rows


def subsample_worst_case_rows(records: list[dict], clean: np.ndarray, sets: list[np.ndarray],
                              defenses: list[tuple], labels: np.ndarray, budget: float,
                              db_fields: dict) -> list[dict]:
    """Worst case on the hard-label subsample: right when clean, under every set of the grid at
    ``budget`` or less, and under the hard-label attack at its largest query budget. Reported
    beside the full sample's worst case, never mixed into it."""
    rows = []
    for rec in records:
        if rec["defense"] not in defenses:
            continue
        i, images = defenses.index(rec["defense"]), rec["images"]
        robust = clean[i, images] == labels[images]
        for preds in sets:
            robust &= preds[i, images] == labels[images]
        robust &= rec["correct"][-1]
        layer, rule, k = rec["defense"]
        rows.append(accuracy_row(robust, **db_fields, condition=f"worst-case-subsample@{budget:g}",
                                 attack="worst-case-subsample", threat="all", target_layer="",
                                 budget=budget, attacks_in_worst_case=len(sets) + 1,
                                 layer=layer, weighting=rule, k=k))
    return rows
