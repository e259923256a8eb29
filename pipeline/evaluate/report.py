"""Tables (CSV, Markdown in the paper's Table 1/2 layout) and plots (PNG) of an evaluation grid."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from pipeline.evaluate.grid import WEIGHTING_NAMES
from pipeline.evaluate.suite import attack_title


def title_of(row: dict) -> str:
    if row["attack"] in ("clean", "worst-case"):
        return row["attack"]
    return attack_title(row["attack"], row["threat"])


def defense_name(layer: str, rule: str) -> str:
    return "no defense" if layer == "none" else f"kNN {WEIGHTING_NAMES.get(rule, rule)}"


def headline_budget(ev, rows: list[dict]) -> float | None:
    budgets = sorted({r["budget"] for r in rows if r["budget"]})
    if ev.headline_budget is not None:
        return ev.headline_budget
    return 0.06 if 0.06 in budgets else (budgets[0] if budgets else None)


def _fmt(row: dict | None) -> str:
    if row is None:
        return "–"
    return f"{row['accuracy']:.3f} ±{(row['ci95_high'] - row['ci95_low']) / 2:.3f}"


def _columns(rows: list[dict], budget: float | None) -> list[str]:
    """clean, every attack title at ``budget`` (config order), worst-case."""
    titles = [title_of(r) for r in rows if r["attack"] not in ("clean", "worst-case")
              and r["budget"] == budget]
    worst = ["worst-case"] if any(r["attack"] == "worst-case" and r["budget"] == budget
                                  for r in rows) else []
    return ["clean"] + list(dict.fromkeys(titles)) + worst


def _cell(rows_by: dict, title: str, budget, layer: str, rule: str, k: int) -> dict | None:
    """The row for a defense under a column; white-box columns use the set aimed at its layer."""
    if title == "clean":
        return rows_by.get(("clean", 0.0, "", layer, rule, k))
    hit = rows_by.get((title, budget, "", layer, rule, k))
    if hit is None and layer != "none":
        hit = rows_by.get((title, budget, layer, layer, rule, k))
    return hit


def _index(rows: list[dict]) -> dict:
    return {(title_of(r), r["budget"], r["target_layer"], r["layer"], r["weighting"], r["k"]): r
            for r in rows}


def main_table(rows: list[dict], ev, budget: float | None) -> str:
    """Defenses as rows, clean / each attack at the headline budget / worst case as columns."""
    cols = _columns(rows, budget)
    by = _index(rows)
    defenses = list(dict.fromkeys((r["layer"], r["weighting"]) for r in rows
                                  if r["k"] in (ev.k, 0)))
    head = [c if c in ("clean", "worst-case") else f"{c} {budget:g}" for c in cols]
    lines = [f"| defense | layer | {' | '.join(head)} |", "|---|---|" + "---:|" * len(cols)]
    for layer, rule in defenses:
        k = 0 if layer == "none" else ev.k
        cells = [_fmt(_cell(by, c, budget, layer, rule, k)) for c in cols]
        lines.append(f"| {defense_name(layer, rule)} | {'' if layer == 'none' else layer} | "
                     f"{' | '.join(cells)} |")
    return "\n".join(lines)


def aimed(row: dict) -> bool:
    """A row of a transfer (gray/black-box) set, or of a white-box set aimed at the row's own
    layer: the sets a per-layer curve should use."""
    return not row["target_layer"] or row["target_layer"] == row["layer"]


def sweep_table(rows: list[dict], ev, values: list, key: str, title: str, layer_rows: bool = True) -> str:
    """Accuracy of each defense (rows) against ``values`` of ``key`` (columns) for one condition."""
    lines = [f"| defense | layer | {' | '.join(f'{key} {v:g}' for v in values)} |",
             "|---|---|" + "---:|" * len(values)]
    defenses = list(dict.fromkeys((r["layer"], r["weighting"]) for r in rows
                                  if layer_rows or r["layer"] == "none"))
    for layer, rule in defenses:
        cells = []
        for v in values:
            hit = [r for r in rows if r["layer"] == layer and r["weighting"] == rule
                   and r[key] == v and (key == "k" or r["k"] in (ev.k, 0))]
            cells.append(_fmt(hit[0]) if hit else "–")
        lines.append(f"| {defense_name(layer, rule)} | {'' if layer == 'none' else layer} | "
                     f"{' | '.join(cells)} |")
    return f"{title}\n\n" + "\n".join(lines)


def attack_notes(attacks: list[dict]) -> list[str]:
    notes = []
    for s in attacks:
        extra = ""
        if "transfer_rate" in s:
            extra += (f", surrogate error rate {s['surrogate_error_rate']:.3f}, transfer rate "
                      f"{s['transfer_rate']:.3f}")
        for prefix, name in (("cw", "CW"), ("min_norm", "the min-norm search")):
            if f"{prefix}_under_budget_rate" in s:  # minimum-norm attacks, then projected
                extra += (f", {name} found an adversarial image for "
                          f"{s[f'{prefix}_success_rate']:.3f}, its minimal one was within the "
                          f"budget for {s[f'{prefix}_under_budget_rate']:.3f}")
        notes.append(f"- {s['condition']}: budget {s['budget']:g}, achieved normalised L2 mean "
                     f"{s['achieved_l2_mean']:.4f} (max {s['achieved_l2_max']:.4f}), pixels in "
                     f"[0,1]: {s['pixels_in_range']}, undefended error rate "
                     f"{s['undefended_error_rate']:.3f}{extra} ({s['seconds']:.0f} s).")
    return notes


def markdown_report(rows: list[dict], attacks: list[dict], ev, title: str) -> str:
    budget = headline_budget(ev, rows)
    databases = list(dict.fromkeys(r["database"] for r in rows))
    n = rows[0]["n"] if rows else 0
    parts = [f"# {title}", ""]
    for db in databases:
        db_rows = [r for r in rows if r["database"] == db]
        size = db_rows[0]["db_size"]
        parts += [f"## Database {db}" + (f" ({size:,} images)" if size else ""), "",
                  main_table(db_rows, ev, budget), ""]
    primary = [r for r in rows if r["database"] == databases[0]]
    for column in dict.fromkeys(title_of(r) for r in primary if r["budget"]):
        budgets = sorted({r["budget"] for r in primary if title_of(r) == column})
        if len(budgets) > 1:
            sel = [r for r in primary if title_of(r) == column and aimed(r)]
            if sel:
                parts += [sweep_table(sel, ev, budgets, "budget",
                                      f"### {column}: accuracy vs budget ({databases[0]})"), ""]
    if len(ev.all_ks) > 1:
        for cond in ("clean", "PGD gray"):
            sel = [r for r in primary if title_of(r) == cond and r["budget"] in (0.0, budget)
                   and r["layer"] != "none"]
            if sel:
                parts += [sweep_table(sel, ev, ev.all_ks, "k",
                                      f"### {cond}: accuracy vs K ({databases[0]})"), ""]
    if len(databases) > 1:
        parts += [database_table(rows, ev, budget), ""]
    parts.append(f"Accuracy on {n} query images (K = {ev.k} unless stated), ± half-width of the "
                 "95% Wilson interval. Worst case: an image counts only if it is right when clean "
                 "and under every attack of that budget or a smaller one.")
    parts += ["", "Attacks (checked after crafting):", *attack_notes(attacks)]
    return "\n".join(parts) + "\n"


def database_table(rows: list[dict], ev, budget) -> str:
    """Rows: database x layer (the last weighting); columns: clean, attacks, worst case."""
    rule = ev.weightings[-1]
    sel = [r for r in rows if r["weighting"] == rule and r["k"] == ev.k]
    cols = _columns(rows, budget)
    lines = [f"### Accuracy vs database ({WEIGHTING_NAMES[rule]}, K = {ev.k}, budget {budget:g})", "",
             f"| database | images | layer | {' | '.join(cols)} |", "|---|---:|---|" + "---:|" * len(cols)]
    for db in dict.fromkeys(r["database"] for r in sel):
        db_rows = [r for r in sel if r["database"] == db]
        by = _index(db_rows)
        for layer in dict.fromkeys(r["layer"] for r in db_rows):
            cells = [_fmt(_cell(by, c, budget, layer, rule, ev.k)) for c in cols]
            lines.append(f"| {db} | {db_rows[0]['db_size']:,} | {layer} | {' | '.join(cells)} |")
    return "\n".join(lines)


def write_csv(path: Path, data: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in data for k in row))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(data)
    os.replace(tmp, path)


def write_report(out_dir: str | os.PathLike, rows: list[dict], attacks: list[dict], ev,
                 title: str = "evaluation", note: str | None = None) -> dict:
    """results.csv (every cell), attacks.csv (every set), results.md (tables) and plots.
    ``note``: a paragraph under the title (e.g. how many queries decontamination excluded)."""
    from pipeline.evaluate.claims import claims_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    if attacks:
        write_csv(out / "attacks.csv", attacks)
    md = markdown_report(rows, attacks, ev, title)
    if note:
        head, _, rest = md.partition("\n\n")
        md = f"{head}\n\n{note}\n\n{rest}"
    claims = claims_report(rows, ev, headline_budget(ev, rows))
    if claims["markdown"]:
        md += "\n" + claims["markdown"]
    (out / "results.md").write_text(md)
    plots = write_plots(out, rows, ev)
    from pipeline.layout import write_json

    write_json(out / "claims.json", claims["claims"])
    return {"markdown": md, "plots": plots, "claims": claims["claims"]}


# --- plots -------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _err(sel):
    acc = np.array([r["accuracy"] for r in sel])
    return acc, np.array([[a - r["ci95_low"], r["ci95_high"] - a] for a, r in zip(acc, sel, strict=True)]).T.clip(min=0)


def write_plots(out: Path, rows: list[dict], ev) -> list[str]:
    plt = _plt()
    budget = headline_budget(ev, rows)
    databases = list(dict.fromkeys(r["database"] for r in rows))
    primary = [r for r in rows if r["database"] == databases[0]]
    rule = ev.weightings[-1]
    layers = [x for x in dict.fromkeys(r["layer"] for r in primary) if x != "none"]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)

    # bar chart: every defense under clean / each attack at the headline budget
    cols = _columns(primary, budget)
    by = _index(primary)
    defenses = list(dict.fromkeys((r["layer"], r["weighting"]) for r in primary))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(defenses) + 2), 4))
    width = 0.8 / len(cols)
    xs = np.arange(len(defenses))
    for i, c in enumerate(cols):
        hits = [_cell(by, c, budget, layer, w, 0 if layer == "none" else ev.k) for layer, w in defenses]
        acc = np.array([h["accuracy"] if h else np.nan for h in hits])
        ax.bar(xs + i * width, acc, width, label=c)
    ax.set_xticks(xs + width * (len(cols) - 1) / 2,
                  [defense_name(layer, w) if layer == "none" else f"{layer}\n{WEIGHTING_NAMES[w]}"
                   for layer, w in defenses], fontsize=7)
    ax.set(ylabel="top-1 accuracy", ylim=(0, 1),
           title=f"accuracy by defense{f' (budget {budget:g})' if budget else ''}")
    ax.legend(fontsize=7)
    save(fig, "accuracy.png")

    sweeps = [t for t in dict.fromkeys(title_of(r) for r in primary if r["budget"] and aimed(r))
              if len({r["budget"] for r in primary if title_of(r) == t}) > 1]
    if sweeps:
        fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 3.8), squeeze=False)
        for ax, t in zip(axes[0], sweeps, strict=True):
            for layer in ["none", *layers]:
                w = "-" if layer == "none" else rule
                sel = sorted([r for r in primary if title_of(r) == t and r["layer"] == layer and aimed(r)
                              and r["weighting"] == w and r["k"] in (0, ev.k)], key=lambda r: r["budget"])
                clean = _series(primary, attack="clean", layer=layer, weighting=w, k=0 if layer == "none" else ev.k)
                sel = clean + sel
                acc, err = _err(sel)
                ax.errorbar([r["budget"] for r in sel], acc, yerr=err, marker="o", capsize=2,
                            label=defense_name(layer, w) + ("" if layer == "none" else f" {layer}"))
            ax.set(xlabel="budget Δ = ||x*-x|| / ||x||", ylabel="top-1 accuracy", ylim=(0, 1), title=t)
        axes[0][0].legend(fontsize=7)
        save(fig, "acc_vs_budget.png")

    def per_layer_panels(conds, pick, x_key, xlabel, title, name):
        """One panel per condition: accuracy (95% CI) against ``x_key`` on a log axis, a line
        per layer; ``pick(cond, layer)`` selects the rows."""
        fig, axes = plt.subplots(1, len(conds), figsize=(4.5 * len(conds), 3.8), squeeze=False)
        for ax, c in zip(axes[0], conds, strict=True):
            for layer in layers:
                sel = sorted(pick(c, layer), key=lambda r: r[x_key])
                acc, err = _err(sel)
                ax.errorbar([r[x_key] for r in sel], acc, yerr=err, marker="o", capsize=2, label=layer)
            ax.set_xscale("log")
            ax.set(xlabel=xlabel, ylabel="top-1 accuracy", ylim=(0, 1), title=title(c))
        axes[0][0].legend(fontsize=7)
        save(fig, name)

    if len(ev.all_ks) > 1 and layers:
        per_layer_panels(
            [c for c in ("clean", "PGD gray") if any(title_of(r) == c for r in primary)],
            lambda c, layer: [r for r in primary if title_of(r) == c and r["layer"] == layer
                              and r["weighting"] == rule and r["budget"] in (0.0, budget)],
            "k", "K (neighbours)",
            lambda c: f"{c}{'' if c == 'clean' else f' {budget:g}'} ({WEIGHTING_NAMES[rule]})",
            "acc_vs_k.png")

    if len(layers) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in cols:
            hits = [_cell(by, c, budget, layer, rule, ev.k) for layer in layers]
            ax.plot(layers, [h["accuracy"] if h else np.nan for h in hits], marker="o", label=c)
        ax.set(xlabel="layer", ylabel="top-1 accuracy", ylim=(0, 1),
               title=f"kNN {WEIGHTING_NAMES[rule]} by layer (K={ev.k}, budget {budget:g})")
        ax.legend(fontsize=7)
        save(fig, "acc_vs_layer.png")

    if len(databases) > 1 and layers:
        per_layer_panels(
            [c for c in cols if c in ("clean", "PGD gray", "worst-case")],
            lambda c, layer: [r for r in rows if title_of(r) == c and r["layer"] == layer
                              and r["weighting"] == rule and r["k"] == ev.k
                              and r["budget"] in (0.0, budget) and not r["target_layer"]],
            "db_size", "database size N (images)",
            lambda c: f"{c} ({WEIGHTING_NAMES[rule]}, K={ev.k})", "acc_vs_dbsize.png")

    white = [c for c in cols if c.endswith(" white")]
    if white and layers:
        shown = [c for c in cols if c != "clean"]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(layers) + 2), 4))
        width = 0.8 / len(shown)
        xs = np.arange(len(layers))
        for i, c in enumerate(shown):
            hits = [_cell(by, c, budget, layer, rule, ev.k) for layer in layers]
            ax.bar(xs + i * width, [h["accuracy"] if h else np.nan for h in hits], width, label=c)
        ax.set_xticks(xs + width * (len(shown) - 1) / 2, layers)
        ax.set(ylabel="top-1 accuracy", ylim=(0, 1),
               title=f"gray/black-box vs defense-aware attacks (kNN {WEIGHTING_NAMES[rule]}, {budget:g})")
        ax.legend(fontsize=7)
        save(fig, "whitebox.png")
    return written
