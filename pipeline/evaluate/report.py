"""Tables (CSV, Markdown in the paper's Table 1/2 layout) and plots (PNG) of an evaluation grid."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from pipeline.evaluate.grid import WEIGHTING_NAMES
from pipeline.evaluate.suite import attack_title

SUBSAMPLE_WORST = "worst-case, hard-label subsample"


def title_of(row: dict) -> str:
    if row["attack"] in ("clean", "worst-case"):
        return row["attack"]
    if row["attack"] == "worst-case-subsample":
        return SUBSAMPLE_WORST
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
    """clean, every attack title at ``budget`` (config order), worst-case (and the worst case of
    the hard-label subsample, when there is one)."""
    special = ("clean", "worst-case", "worst-case-subsample")
    titles = [title_of(r) for r in rows if r["attack"] not in special and r["budget"] == budget]
    worst = [title for attack, title in (("worst-case", "worst-case"),
                                         ("worst-case-subsample", SUBSAMPLE_WORST))
             if any(r["attack"] == attack and r["budget"] == budget for r in rows)]
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
    head = [c if c in ("clean", "worst-case", SUBSAMPLE_WORST) else f"{c} {budget:g}" for c in cols]
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


def markdown_report(rows: list[dict], attacks: list[dict], ev, title: str,
                    sanity: dict | None = None, hard_label: dict | None = None) -> str:
    budget = headline_budget(ev, rows)
    databases = list(dict.fromkeys(r["database"] for r in rows))
    n = rows[0]["n"] if rows else 0
    parts = [f"# {title}", ""]
    for db in databases:
        db_rows = [r for r in rows if r["database"] == db]
        size = db_rows[0]["db_size"]
        parts += [f"## Database {db}" + (f" ({size:,} images)" if size else ""), ""]
        if (sanity or {}).get(db, {}).get("flagged"):
            parts += [f"> **Flagged**: sanity check(s) failed for this database: "
                      f"{', '.join(sanity[db]['failed'])} (see Sanity checks below).", ""]
        parts += [main_table(db_rows, ev, budget), ""]
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
    if any(r["threat"] == "hard_label" for r in rows):
        hn = next(r["n"] for r in rows if r["threat"] == "hard_label")
        parts.append(f"Hard-label (HSJ) columns and the worst case of the hard-label subsample: "
                     f"on a seeded subsample of {hn} of those images (its intervals are wider); "
                     "the hard-label attack's images count into that worst case only.")
    parts += ["", "Attacks (checked after crafting):", *attack_notes(attacks)]
    if hard_label:
        parts += ["", hard_label_section(hard_label)]
    return "\n".join(parts) + "\n"


def hard_label_section(hard_label: dict) -> str:
    """Per hard-label attack and classifier: queries, achieved and minimal Δ, cost."""
    lines = ["### Hard-label attack (HopSkipJump, labels only, on the deployed classifiers)", "",
             "| attack | classifier | images attacked | broken at max queries | median queries to "
             "success (broken) | achieved Δ (broken) | median minimal Δ found | queries per image | "
             "seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    def fmt(value, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for label, records in hard_label.items():
        for r in records:
            who = "no defense" if r["classifier"] == "none" else \
                f"{r['classifier']} {WEIGHTING_NAMES.get(r['weighting'], r['weighting'])} K={r['k']}"
            lines.append(f"| {label} @{r['budget']:g} | {who} | {r['attacked']} of {r['images']} | "
                         f"{r['broken_at_max']} | {fmt(r['median_queries_to_success'], '.0f')} | "
                         f"{fmt(r['achieved_l2_mean'], '.4f')} | {fmt(r['min_norm_median'], '.4f')} | "
                         f"{r['queries_per_image']:,} | {r['seconds']:.0f} |")
    lines += ["", "Images not attacked were misclassified when clean (broken at 0 queries) or had "
              "no image of another label to start from (robust at every budget). Queries are "
              "counted per image and call (the batch runs in lockstep, so a broken image keeps "
              "being charged; the starting point's label is one query; labelling the pool of "
              "starting points and the up to four 8-bit checks per budget are not counted); an "
              "image counts as broken only if its adversarial image, rounded to 8-bit levels, is "
              "still misclassified within the budget. Median queries to success is over the "
              "broken images; achieved Δ is the counted 8-bit images' mean."]
    return "\n".join(lines)


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
                 title: str = "evaluation", note: str | None = None, sanity: dict | None = None,
                 hard_label: dict | None = None) -> dict:
    """results.csv (every cell), attacks.csv (every set), results.md (tables) and plots.
    ``note``: a paragraph under the title (e.g. how many queries decontamination excluded)."""
    from pipeline.evaluate.claims import claims_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    if attacks:
        write_csv(out / "attacks.csv", attacks)
    md = markdown_report(rows, attacks, ev, title, sanity, hard_label)
    if note:
        head, _, rest = md.partition("\n\n")
        md = f"{head}\n\n{note}\n\n{rest}"
    claims = claims_report(rows, ev, headline_budget(ev, rows))
    if claims["markdown"]:
        md += "\n" + claims["markdown"]
    if sanity:
        from pipeline.evaluate.sanity import markdown as sanity_markdown

        md += "\n" + sanity_markdown(sanity)
    (out / "results.md").write_text(md)
    from pipeline.evaluate.plots import write_plots

    plots = write_plots(out, rows, ev)
    from pipeline.layout import write_json

    # the paper's claims (C1-C5) and, beside them, the sanity checks per database
    write_json(out / "claims.json", {**claims["claims"], **({"sanity": sanity} if sanity else {})})
    return {"markdown": md, "plots": plots, "claims": claims["claims"], "sanity": sanity}
