"""Evaluation grid: attacks x defenses (none, kNN per layer x weighting) -> accuracy table."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.attacks.pgd import pgd_l2
from pipeline.attacks.projection import normalised_l2
from pipeline.features.backbones import images_to_tensor

WEIGHTING_NAMES = {"uw": "UW", "cbw_e": "CBW-E", "cbw_d": "CBW-D"}


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def attack_label(attack) -> str:
    return f"{attack.name}-{attack.threat}@{attack.budget:g}"


def run_attack(model, x: torch.Tensor, y: torch.Tensor, attack, seed: int, progress: bool
               ) -> torch.Tensor:
    """Adversarial images for one attack spec, in batches."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    starts = range(0, len(x), attack.batch_size)
    for s in tqdm(starts, desc=attack_label(attack), unit="batch", disable=not progress):
        xb, yb = x[s:s + attack.batch_size], y[s:s + attack.batch_size]
        if attack.name == "pgd":
            out.append(pgd_l2(model, xb, yb, attack.budget, attack.steps, attack.step_size,
                              attack.random_start, gen))
        else:  # the config schema only admits known attacks
            raise ValueError(f"unknown attack {attack.name!r}")
    return torch.cat(out)


def evaluate_grid(defense, images: np.ndarray, labels: np.ndarray, eval_spec, layers,
                  progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Accuracy rows (condition x defense) and per-condition attack stats."""
    x = images_to_tensor(images)
    y = torch.as_tensor(labels, dtype=torch.long)
    conditions = [("clean", None, x)]
    for attack in eval_spec.attacks:
        conditions.append((attack_label(attack), attack,
                           run_attack(defense.model, x, y, attack, eval_spec.seed, progress)))
    rows, attack_stats = [], []
    for cond, attack, x_cond in conditions:
        probs, neigh = defense.neighbours_all_layers(x_cond, layers, eval_spec.k)
        ach = normalised_l2(x_cond, x).numpy()
        undefended = probs.argmax(1)
        attack_stats.append({
            "condition": cond, "budget": attack.budget if attack else 0.0,
            "achieved_l2_mean": float(ach.mean()), "achieved_l2_max": float(ach.max()),
            "pixels_in_range": bool(((x_cond >= 0) & (x_cond <= 1)).all()),
            "undefended_error_rate": float((undefended != labels).mean()),
        })
        rows.append(_row(cond, "none", "-", undefended, labels))
        for layer in layers:
            for rule in eval_spec.weightings:
                pred, _ = defense.vote(neigh[layer], rule)
                rows.append(_row(cond, layer, rule, pred, labels))
    return rows, attack_stats


def _row(condition: str, layer: str, weighting: str, pred: np.ndarray, labels: np.ndarray) -> dict:
    correct = int((pred == labels).sum())
    lo, hi = wilson_interval(correct, len(labels))
    return {"condition": condition, "layer": layer, "weighting": weighting, "n": len(labels),
            "correct": correct, "accuracy": correct / len(labels), "ci95_low": lo, "ci95_high": hi}


def markdown_table(rows: list[dict], attack_stats: list[dict]) -> str:
    """Defenses as rows, conditions as columns (accuracy ± CI half-width), like the paper's tables."""
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    defenses = list(dict.fromkeys((r["layer"], r["weighting"]) for r in rows))
    by = {(r["condition"], r["layer"], r["weighting"]): r for r in rows}
    n = rows[0]["n"] if rows else 0
    lines = [f"| defense | layer | {' | '.join(conditions)} |",
             "|---|---|" + "---:|" * len(conditions)]
    for layer, rule in defenses:
        cells = []
        for c in conditions:
            r = by[(c, layer, rule)]
            cells.append(f"{r['accuracy']:.3f} ±{(r['ci95_high'] - r['ci95_low']) / 2:.3f}")
        name = "no defense" if layer == "none" else f"kNN {WEIGHTING_NAMES.get(rule, rule)}"
        lines.append(f"| {name} | {'' if layer == 'none' else layer} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"Accuracy on {n} query images, ± half-width of the 95% Wilson interval.")
    for s in attack_stats:
        if s["budget"]:
            lines.append(f"{s['condition']}: budget {s['budget']:g}, achieved normalised L2 mean "
                         f"{s['achieved_l2_mean']:.4f} (max {s['achieved_l2_max']:.4f}), pixels in "
                         f"[0,1]: {s['pixels_in_range']}, undefended error rate "
                         f"{s['undefended_error_rate']:.3f}.")
    return "\n".join(lines) + "\n"


def write_results(eval_dir: str | os.PathLike, rows: list[dict], attack_stats: list[dict]) -> dict:
    """results.csv, attacks.csv, results.md and accuracy.png under ``eval_dir``."""
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (("results.csv", rows), ("attacks.csv", attack_stats)):
        tmp = eval_dir / (name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
        os.replace(tmp, eval_dir / name)
    md = markdown_table(rows, attack_stats)
    (eval_dir / "results.md").write_text(md)
    plot_accuracy(rows, eval_dir / "accuracy.png")
    return {"markdown": md}


def plot_accuracy(rows: list[dict], path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    defenses = list(dict.fromkeys((r["layer"], r["weighting"]) for r in rows))
    by = {(r["condition"], r["layer"], r["weighting"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(defenses) + 2), 4))
    width = 0.8 / len(conditions)
    xs = np.arange(len(defenses))
    for i, cond in enumerate(conditions):
        acc = np.array([by[(cond, *d)]["accuracy"] for d in defenses])
        err = np.array([[acc[j] - by[(cond, *d)]["ci95_low"], by[(cond, *d)]["ci95_high"] - acc[j]]
                        for j, d in enumerate(defenses)]).T.clip(min=0)  # float round-off at 0 or 1
        ax.bar(xs + i * width, acc, width, yerr=err, capsize=2, label=cond)
    labels = ["no defense" if layer == "none" else f"{layer}\n{WEIGHTING_NAMES.get(w, w)}"
              for layer, w in defenses]
    ax.set_xticks(xs + width * (len(conditions) - 1) / 2, labels, fontsize=7)
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("kNN defense: accuracy by layer and weighting (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
