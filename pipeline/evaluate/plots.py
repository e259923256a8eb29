"""Plots (PNG) of an evaluation grid, drawn to be read: every attack series has its own style,
legends sit outside the axes, the worst case stands out.

Styles (``series_style``) depend on the series title alone, so an attack looks the same in every
plot: the hue says the attack family (gray-box blues, black-box greens, white-box reds/oranges,
hard-label purples, random noise browns), the shade and marker the attack, the hatch and line
style its tag ("min-norm kNN k05 white", "HSJ 5k hard-label"); "clean" is dark grey and every
"worst-case..." series black with an "xx"-type hatch, a thick dashed line and an "X" marker.
``series_styles`` resolves the rare clash of two tagged titles within one figure.

Rows the plots do not recognise are skipped, and a plot that fails is logged and left out: the
tables and CSVs of a report never depend on its plots.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pipeline.evaluate.grid import WEIGHTING_NAMES
from pipeline.evaluate.report import _cell, aimed, defense_name, headline_budget, title_of

log = logging.getLogger(__name__)

UNBOUNDED = 1.0  # budgets from here up are sanity sets, not points of a budget sweep
DPI = 120
LEGEND_FONT = 7

# --- series styles ------------------------------------------------------------------------------

CLEAN_COLOUR = "#404040"
WORST_COLOUR = "black"
FAMILY_COLOURS = {  # distinct hues per family, clearly different shades within one
    "gray": ["#1f4e9c", "#4a90d9", "#17becf", "#9cc3e6", "#2f7f8f", "#0b2545"],
    "black": ["#1b7837", "#5aae61", "#a6d96a", "#bcbd22", "#00441b", "#66c2a4"],
    "white": ["#b2182b", "#ef6548", "#ff7f0e", "#fdb863", "#e7298a", "#67001f"],
    "hard_label": ["#bcbddc", "#9e9ac8", "#807dba", "#6a51a3", "#54278f", "#3f007d"],  # light->dark
    "noise": ["#8c510a", "#bf812d", "#dfc27d", "#543005", "#a6761d", "#e6ab02"],
    "other": ["#e377c2", "#c49c94", "#dbdb8d", "#9edae5", "#f7b6d2", "#ffbb78"],
    "clean": [CLEAN_COLOUR],
}
SHADE_ORDER = {  # known attacks take fixed shades; others hash into the rest
    "gray": ["FGSM", "I-FGSM", "PGD", "CW-L2"],
    "black": ["FGSM", "I-FGSM", "PGD", "CW-L2"],
    "white": ["PGD-PR", "PGD-FS", "adaptive", "min-norm kNN", "PGD", "CW-L2"],
    "hard_label": ["HSJ"],
    "noise": ["random noise"],
}
QUERY_LADDER = [1_000, 2_000, 5_000, 10_000, 20_000]  # hard-label shades: more queries, darker
ALIASES = {"CW": "CW-L2", "HopSkipJump": "HSJ"}
KNOWN_BASES = sorted({b for names in SHADE_ORDER.values() for b in names} | {"noise", *ALIASES},
                     key=len, reverse=True)
MARKERS = ["o", "s", "^", "D", "v", "P", "<", ">", "h", "*"]  # never "X": the worst case's
HATCHES = ["", "//", "\\\\", "..", "oo", "++", "--", "||"]  # never "xx": the worst case's
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)), (0, (6, 2, 1, 2))]
WORST_HATCHES = ["xx", "..", "++", "oo", "\\\\", "//"]
WORST_LINESTYLES = ["--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1))]
WORST_FACES = ["white", "#c8c8c8", "#e6e6e6", "#a8a8a8", "#f2f2f2", "#d8d8d8"]


def is_worst(title: str) -> bool:
    return title.startswith("worst-case")


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _family(title: str) -> tuple[str, str]:
    """(family, the title without its threat word)."""
    if title == "clean":
        return "clean", title
    if is_worst(title):
        return "worst", title
    for suffix, family in ((" gray", "gray"), (" black", "black"), (" white", "white")):
        if title.endswith(suffix):
            return family, title[: -len(suffix)].strip()
    if "hard-label" in title or "hard_label" in title:
        return "hard_label", " ".join(title.replace("hard_label", "hard-label")
                                      .replace("hard-label", " ").split())
    if "noise" in title.lower() or title.startswith("random"):
        return "noise", title
    return "other", title


def _slot(title: str) -> tuple[str, int, int, bool]:
    """(family, shade index, hatch index, tagged) of a title, before clash resolution."""
    family, key = _family(title)
    if family == "clean":
        return family, 0, 0, False
    if family == "worst":
        tagged = title != "worst-case"
        return family, 0, (1 + _crc(title) % (len(WORST_HATCHES) - 1)) if tagged else 0, tagged
    base = next((b for b in KNOWN_BASES if key == b or key.startswith(b + " ")), key)
    tag = key[len(base):].strip()
    base = ALIASES.get(base, base)
    order = SHADE_ORDER.get(family, [])
    shades = len(FAMILY_COLOURS[family])
    if base in order:
        shade = order.index(base) % shades
    else:  # unknown attack: a shade no known one of the family takes, if there is one left
        free = shades - len(order)
        shade = len(order) + _crc(base) % free if free > 0 else _crc(base) % shades
    hatch = 1 + _crc(tag) % (len(HATCHES) - 1) if tag else 0
    queries = _queries(tag) if family == "hard_label" else None
    if queries is not None:  # "HSJ 5k": the query budget picks the shade, the attack the hatch
        shade = sum(queries > q for q in QUERY_LADDER)
        hatch = order.index(base) if base in order else 1 + _crc(base) % (len(HATCHES) - 1)
    return family, shade, hatch, bool(tag)


def _queries(tag: str) -> int | None:
    """1000 for "1k" or "1000", 2000000 for "2m"; None if the tag is no query count."""
    scale = {"k": 1_000, "m": 1_000_000}.get(tag[-1:].lower(), 1)
    try:
        return int(float(tag[:-1] if scale > 1 else tag) * scale)
    except ValueError:
        return None


def _sizes(family: str) -> tuple[int, int]:
    if family == "worst":
        return 1, len(WORST_HATCHES)
    return len(FAMILY_COLOURS[family]), len(HATCHES)


def _contrast(colour: str) -> str:
    """A hatch/edge colour that shows on ``colour``."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(colour)
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.55 else "#222222"


def _style(family: str, shade: int, hatch: int) -> dict:
    if family == "worst":
        return {"color": WORST_COLOUR, "facecolor": WORST_FACES[hatch % len(WORST_FACES)],
                "edgecolor": WORST_COLOUR, "hatch": WORST_HATCHES[hatch], "marker": "X",
                "linestyle": WORST_LINESTYLES[hatch % len(WORST_LINESTYLES)], "linewidth": 2.6,
                "markersize": 8, "edgewidth": 1.0, "zorder": 4, "family": family}
    colour = FAMILY_COLOURS[family][shade]
    clean = family == "clean"
    return {"color": colour, "facecolor": colour, "edgecolor": _contrast(colour),
            "hatch": HATCHES[hatch], "marker": "o" if clean else MARKERS[shade % len(MARKERS)],
            "linestyle": LINESTYLES[hatch], "linewidth": 1.9 if clean else 1.4,
            "markersize": 5, "edgewidth": 0.4, "zorder": 3 if clean else 2, "family": family}


def series_style(title: str) -> dict:
    """The style of an attack/condition series, from its title alone: ``color`` (lines, markers),
    ``facecolor``/``edgecolor``/``hatch``/``edgewidth`` (bars), ``marker``/``linestyle``/
    ``linewidth``/``markersize`` (lines), ``zorder`` and ``family``."""
    family, shade, hatch, _ = _slot(title)
    return _style(family, shade, hatch)


def series_styles(titles) -> dict[str, dict]:
    """``series_style`` of each title, every one with its own (colour, hatch) and (colour, line
    style): where two tagged titles land on one slot, the one later in (untagged first, then
    alphabetical) order moves to the next free hatch, then shade, of its family. The result
    depends on the set of titles, not on their order."""
    slots = {t: _slot(t) for t in dict.fromkeys(titles)}
    used: set[tuple[str, int, int]] = set()
    out = {}
    for t in sorted(slots, key=lambda t: (slots[t][3], t)):
        family, shade, hatch, _ = slots[t]
        n_shades, n_hatches = _sizes(family)
        for step in range(n_shades * n_hatches):
            h = (hatch + step) % n_hatches
            s = (shade + (hatch + step) // n_hatches) % n_shades
            if (family, s, h) not in used:
                shade, hatch = s, h
                break
        used.add((family, shade, hatch))
        out[t] = _style(family, shade, hatch)
    return {t: out[t] for t in slots}


def classifier_styles(layers: list[str]) -> dict[str, dict]:
    """Line styles for curves with one line per classifier: the undefended one dark grey and
    dashed with squares, the kNN layers along a sequential colour map, shallow to deep."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    deep = [x for x in layers if x != "none"]
    out = {"none": {"color": CLEAN_COLOUR, "marker": "s", "linestyle": "--", "linewidth": 1.6,
                    "markersize": 5, "zorder": 3}}
    for i, layer in enumerate(deep):
        pos = 0.0 if len(deep) == 1 else 0.85 * i / (len(deep) - 1)
        out[layer] = {"color": cmap(pos), "marker": MARKERS[i % len(MARKERS)], "linestyle": "-",
                      "linewidth": 1.5, "markersize": 5, "zorder": 2}
    return out


def _bar_kw(style: dict) -> dict:
    return {"color": style["facecolor"], "edgecolor": style["edgecolor"], "hatch": style["hatch"],
            "linewidth": style["edgewidth"], "zorder": style["zorder"]}


def _line_kw(style: dict) -> dict:
    return {k: style[k] for k in ("color", "marker", "linestyle", "linewidth", "markersize",
                                  "zorder")}


# --- rows ---------------------------------------------------------------------------------------

_NAMES = {"hsj": "HSJ", "hop_skip_jump": "HSJ", "noise": "random noise"}
_THREATS = {"hard_label": "hard-label", "random": "", "all": "", "-": ""}


def _title(row: dict) -> str:
    """``report.title_of``, or a readable title where it does not know the attack."""
    try:
        title = title_of(row)
        if isinstance(title, str) and title:
            return title
    except Exception:  # an attack the report does not know yet
        pass
    from pipeline.evaluate.suite import ATTACK_NAMES, THREAT_NAMES

    attack, threat = str(row.get("attack", "")), str(row.get("threat", "") or "")
    threat_name = THREAT_NAMES.get(threat, _THREATS.get(threat, threat.replace("_", "-")))
    if is_worst(attack):
        rest = attack[len("worst-case"):].strip("-_. ").replace("-", " ").replace("_", " ")
        rest = " ".join(filter(None, (threat_name, rest)))
        return "worst-case" + (f", {rest}" if rest else "")
    name, _, tag = attack.partition(".")
    if name == "noise":
        return " ".join(filter(None, ("random noise", tag)))
    return " ".join(filter(None, (ATTACK_NAMES.get(name, _NAMES.get(name, name)), tag, threat_name)))


def _clean_rows(rows: list[dict]) -> list[dict]:
    """Copies of the rows the plots understand, with numeric fields and a ``_title``; others
    are left out."""
    out = []
    for r in rows:
        try:
            row = {**r, "budget": float(r["budget"] or 0.0), "k": int(float(r["k"] or 0)),
                   "accuracy": float(r["accuracy"]), "layer": str(r["layer"]),
                   "weighting": str(r["weighting"]), "attack": str(r["attack"]),
                   "threat": str(r.get("threat") or ""), "target_layer": str(r.get("target_layer") or ""),
                   "database": str(r["database"])}
            for key in ("ci95_low", "ci95_high"):
                value = r.get(key)
                row[key] = row["accuracy"] if value in (None, "") else float(value)
            for key in ("n", "db_size", "queries"):
                if r.get(key) not in (None, ""):
                    row[key] = int(float(r[key]))
            row["_title"] = _title(row)
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        out.append(row)
    return out


def _index(rows: list[dict]) -> dict:
    return {(r["_title"], r["budget"], r["target_layer"], r["layer"], r["weighting"], r["k"]): r
            for r in rows}


def _columns(rows: list[dict], budget: float | None) -> list[str]:
    """clean, every attack title at ``budget`` (config order), then the worst cases."""
    titles = list(dict.fromkeys(r["_title"] for r in rows
                                if r["budget"] == budget and r["_title"] != "clean"))
    return (["clean"] + [t for t in titles if not is_worst(t)] + [t for t in titles if is_worst(t)])


def _err(sel: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    acc = np.array([r["accuracy"] if r else np.nan for r in sel], dtype=float)
    lo = np.array([r["ci95_low"] if r else np.nan for r in sel], dtype=float)
    hi = np.array([r["ci95_high"] if r else np.nan for r in sel], dtype=float)
    return acc, np.nan_to_num(np.vstack([acc - lo, hi - acc]), nan=0.0).clip(min=0)


def _by_x(sel: list[dict], key: str) -> list[dict]:
    """One row per x value (the first), in x order."""
    seen: dict = {}
    for r in sel:
        seen.setdefault(r[key], r)
    return [seen[x] for x in sorted(seen)]


# --- figures ------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class _Ctx:
    """What every plot needs, computed once."""

    def __init__(self, rows: list[dict], ev):
        self.ev = ev
        self.rows = rows
        self.budget = headline_budget(ev, rows)
        self.databases = list(dict.fromkeys(r["database"] for r in rows))
        self.primary = [r for r in rows if r["database"] == self.databases[0]]
        self.rule = ev.weightings[-1]
        self.rule_name = WEIGHTING_NAMES.get(self.rule, self.rule)
        self.layers = [x for x in dict.fromkeys(r["layer"] for r in self.primary) if x != "none"]
        self.cols = _columns(self.primary, self.budget)
        self.by = _index(self.primary)
        self.styles = series_styles(r["_title"] for r in rows)
        self.lines = classifier_styles(self.layers)
        counts = Counter(r["n"] for r in self.primary if "n" in r)
        self.n = counts.most_common(1)[0][0] if counts else None

    def k_of(self, layer: str) -> int:
        return 0 if layer == "none" else self.ev.k

    def label(self, title: str, hits: list) -> str:
        """The title, with its sample size where that differs from the report's."""
        ns = {h["n"] for h in hits if h and "n" in h}
        return f"{title} (n={min(ns)})" if self.n is not None and ns and ns != {self.n} else title

    @property
    def budget_text(self) -> str:
        return f"budget {self.budget:g}" if self.budget is not None else "no budget"


def _legend(ax, height: float) -> None:
    """The axes' legend outside it, to the right (in more columns than a ``height``-inch figure
    holds in one)."""
    handles, labels = ax.get_legend_handles_labels()
    if labels:
        ncol = max(1, math.ceil(len(labels) / max(1, int(height / 0.17))))
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize=LEGEND_FONT, ncol=ncol, frameon=False, borderaxespad=0.0)


def _fig_legend(fig, axes) -> None:
    """One legend for a figure of panels, right of them all (call after tight_layout)."""
    entries: dict = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, h)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="upper left",
                   bbox_to_anchor=(1.0, 0.98), fontsize=LEGEND_FONT, frameon=False)


def _panels(plt, n: int, width: float = 4.3, height: float = 3.5, max_cols: int = 3):
    ncols = min(max_cols, n)
    nrows = math.ceil(n / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    flat = list(grid.ravel())
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]


def _grid(ax) -> None:
    ax.yaxis.grid(True, color="#e3e3e3", linewidth=0.6)
    ax.set_axisbelow(True)


def _grouped_bars(ax, ctx: _Ctx, series: list[tuple[str, list]], groups: list[str]) -> None:
    """Bars: a group per entry of ``groups``, a bar per (title, hits) series, with 95% CIs."""
    width = 0.84 / max(1, len(series))
    xs = np.arange(len(groups))
    for i, (title, hits) in enumerate(series):
        acc, err = _err(hits)
        ax.bar(xs + (i - (len(series) - 1) / 2) * width, acc, width, yerr=err,
               error_kw={"elinewidth": 0.5, "ecolor": "#555555", "capsize": 0},
               label=ctx.label(title, hits), **_bar_kw(ctx.styles[title]))
    for x in xs[:-1]:
        ax.axvline(x + 0.5, color="#d0d0d0", linewidth=0.6, zorder=0)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_xticks(xs, groups, fontsize=7)
    ax.set(ylabel="top-1 accuracy", ylim=(0, 1))
    _grid(ax)


def _bar_width(groups: int, series: int) -> float:
    return min(30.0, max(7.0, groups * (0.09 * series + 0.35) + 1.5))


def plot_accuracy(ctx: _Ctx, plt):
    """Every defense under clean / each attack at the headline budget / worst case: a panel per
    weighting, a group per defense (the undefended classifier first)."""
    rules = list(dict.fromkeys(r["weighting"] for r in ctx.primary
                               if r["layer"] != "none" and r["k"] == ctx.ev.k))
    has_none = any(r["layer"] == "none" for r in ctx.primary)
    panels = [(rule, (["none"] if has_none else [])
               + [x for x in ctx.layers if any(r["layer"] == x and r["weighting"] == rule
                                               for r in ctx.primary)]) for rule in rules]
    if not panels and has_none:
        panels = [("-", ["none"])]
    if not panels:
        return None

    def hits(title, layers, rule):
        return [_cell(ctx.by, title, ctx.budget, x, "-" if x == "none" else rule, ctx.k_of(x))
                for x in layers]

    cols = [c for c in ctx.cols if any(any(hits(c, ls, rule)) for rule, ls in panels)]
    if not cols:
        return None
    groups = max(len(ls) for _, ls in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(_bar_width(groups, len(cols)), 2.9 * len(panels)),
                             squeeze=False)
    for ax, (rule, layers) in zip(axes[:, 0], panels, strict=True):
        _grouped_bars(ax, ctx, [(c, hits(c, layers, rule)) for c in cols],
                      [defense_name(x, "-") if x == "none" else x for x in layers])
        ax.set_title(f"kNN {WEIGHTING_NAMES.get(rule, rule)} (K={ctx.ev.k})" if rule != "-"
                     else "no defense", fontsize=9)
    fig.suptitle(f"accuracy by defense ({ctx.budget_text})")
    fig.tight_layout()
    _fig_legend(fig, axes[:, 0])
    return fig


def plot_budget(ctx: _Ctx, plt):
    """Accuracy against the budget, a panel per attack swept over budgets (unbounded sanity sets
    left out), a line per classifier (the last weighting)."""
    def swept(r):
        return 0 < r["budget"] < UNBOUNDED and aimed(r)

    budgets: dict[str, set] = {}
    for r in ctx.primary:
        if swept(r):
            budgets.setdefault(r["_title"], set()).add(r["budget"])
    sweeps = [t for t, b in budgets.items() if len(b) > 1]
    sweeps = [t for t in sweeps if not is_worst(t)] + [t for t in sweeps if is_worst(t)]
    if not sweeps:
        return None
    fig, axes = _panels(plt, len(sweeps))
    for ax, t in zip(axes, sweeps, strict=True):
        for layer in ["none", *ctx.layers]:
            w, k = ("-" if layer == "none" else ctx.rule), ctx.k_of(layer)
            sel = [r for r in ctx.primary if r["_title"] == t and r["layer"] == layer and swept(r)
                   and r["weighting"] == w and r["k"] in (0, ctx.ev.k)]
            if not sel:
                continue
            clean = [r for r in ctx.primary if r["_title"] == "clean" and r["layer"] == layer
                     and r["weighting"] == w and r["k"] == k]
            sel = _by_x(clean[:1] + sel, "budget")
            acc, err = _err(sel)
            ax.errorbar([r["budget"] for r in sel], acc, yerr=err, capsize=2,
                        label=defense_name(layer, w) + ("" if layer == "none" else f" {layer}"),
                        **_line_kw(ctx.lines[layer]))
        if ctx.budget is not None and 0 < ctx.budget < UNBOUNDED:
            ax.axvline(ctx.budget, color="#bbbbbb", linestyle=":", linewidth=0.8, zorder=0)
        ax.set(xlabel="budget Δ = ||x*-x|| / ||x||", ylabel="top-1 accuracy", ylim=(0, 1))
        ax.set_title(t, fontsize=9, fontweight="bold" if is_worst(t) else "normal")
        _grid(ax)
    fig.suptitle(f"accuracy vs budget (kNN {ctx.rule_name}, K={ctx.ev.k})")
    fig.tight_layout()
    _fig_legend(fig, axes)
    return fig


def _layer_panels(ctx: _Ctx, plt, conds: list[str], pick: Callable, x_key: str, xlabel: str,
                  title: Callable, suptitle: str):
    """A panel per condition: accuracy (95% CI) against ``x_key`` on a log axis, a line per
    layer; ``pick(cond, layer)`` selects the rows."""
    if not conds:
        return None
    fig, axes = _panels(plt, len(conds))
    for ax, c in zip(axes, conds, strict=True):
        for layer in ctx.layers:
            sel = _by_x(pick(c, layer), x_key)
            if not sel:
                continue
            acc, err = _err(sel)
            ax.errorbar([r[x_key] for r in sel], acc, yerr=err, capsize=2, label=layer,
                        **_line_kw(ctx.lines[layer]))
        ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel="top-1 accuracy", ylim=(0, 1))
        ax.set_title(title(c), fontsize=9)
        _grid(ax)
    fig.suptitle(suptitle)
    fig.tight_layout()
    _fig_legend(fig, axes)
    return fig


def plot_k(ctx: _Ctx, plt):
    if len(ctx.ev.all_ks) < 2 or not ctx.layers:
        return None
    return _layer_panels(
        ctx, plt, [c for c in ("clean", "PGD gray") if any(r["_title"] == c for r in ctx.primary)],
        lambda c, layer: [r for r in ctx.primary if r["_title"] == c and r["layer"] == layer
                          and r["weighting"] == ctx.rule and aimed(r)
                          and r["budget"] in (0.0, ctx.budget)],
        "k", "K (neighbours)",
        lambda c: c if c == "clean" or ctx.budget is None else f"{c} {ctx.budget:g}",
        f"accuracy vs K (kNN {ctx.rule_name})")


def plot_layer(ctx: _Ctx, plt):
    """A line per condition across the layers (the last weighting)."""
    if len(ctx.layers) < 2:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(ctx.layers) + 2), 4.2))
    xs = np.arange(len(ctx.layers))
    for c in ctx.cols:
        hits = [_cell(ctx.by, c, ctx.budget, x, ctx.rule, ctx.ev.k) for x in ctx.layers]
        if not any(hits):
            continue
        acc, _ = _err(hits)
        ax.plot(xs, acc, label=ctx.label(c, hits), **_line_kw(ctx.styles[c]))
    ax.set_xticks(xs, ctx.layers)
    ax.set(xlabel="layer", ylabel="top-1 accuracy", ylim=(0, 1),
           title=f"kNN {ctx.rule_name} by layer (K={ctx.ev.k}, {ctx.budget_text})")
    _grid(ax)
    _legend(ax, 4.2)
    fig.tight_layout()
    return fig


def plot_dbsize(ctx: _Ctx, plt):
    if len(ctx.databases) < 2 or not ctx.layers:
        return None
    return _layer_panels(
        ctx, plt, [c for c in ctx.cols if c in ("clean", "PGD gray", "worst-case")],
        lambda c, layer: [r for r in ctx.rows if r["_title"] == c and r["layer"] == layer
                          and r["weighting"] == ctx.rule and r["k"] == ctx.ev.k and "db_size" in r
                          and r["db_size"] > 0 and r["budget"] in (0.0, ctx.budget)
                          and not r["target_layer"]],
        "db_size", "database size N (images)", lambda c: c,
        f"accuracy vs database size (kNN {ctx.rule_name}, K={ctx.ev.k})")


def plot_whitebox(ctx: _Ctx, plt):
    """Every attack at the headline budget against each layer's defense (the last weighting):
    transfer attacks next to the defense-aware ones."""
    if not ctx.layers or not any(c.endswith(" white") for c in ctx.cols):
        return None
    series = [(c, [_cell(ctx.by, c, ctx.budget, x, ctx.rule, ctx.ev.k) for x in ctx.layers])
              for c in ctx.cols if c != "clean"]
    series = [(c, hits) for c, hits in series if any(hits)]
    fig, ax = plt.subplots(figsize=(_bar_width(len(ctx.layers), len(series)), 4.2))
    _grouped_bars(ax, ctx, series, ctx.layers)
    ax.tick_params(axis="x", labelsize=9)
    ax.set_title(f"gray/black-box vs defense-aware attacks (kNN {ctx.rule_name}, K={ctx.ev.k}, "
                 f"{ctx.budget_text})")
    _legend(ax, 4.2)
    fig.tight_layout()
    return fig


def plot_queries(ctx: _Ctx, plt):
    """Hard-label attacks: accuracy against the attacker's model queries (log axis), a panel per
    attack, a line per classifier (the undefended one, each layer with the last weighting)."""
    hard = [r for r in ctx.primary if r["threat"] == "hard_label" and r.get("queries")]
    if not hard:
        return None
    names = list(dict.fromkeys(r["attack"].partition(".")[0] for r in hard))
    fig, axes = _panels(plt, len(names), width=4.8, height=3.8)
    drew = False
    for ax, name in zip(axes, names, strict=True):
        mine = [r for r in hard if r["attack"].partition(".")[0] == name]
        budgets = sorted({r["budget"] for r in mine})
        budget = ctx.budget if ctx.budget in budgets else budgets[0]
        for layer in ["none", *ctx.layers]:
            w, k = ("-" if layer == "none" else ctx.rule), ctx.k_of(layer)
            sel = [r for r in mine if r["layer"] == layer and r["weighting"] == w and r["k"] == k
                   and r["budget"] == budget and r["target_layer"] in ("", "none", layer)]
            # a set aimed at this classifier before a transfer one
            sel.sort(key=lambda r: r["target_layer"] != layer)
            sel = _by_x(sel, "queries")
            if not sel:
                continue
            acc, err = _err(sel)
            ax.errorbar([r["queries"] for r in sel], acc, yerr=err, capsize=2,
                        label=defense_name(layer, w) + ("" if layer == "none" else f" {layer}"),
                        **_line_kw(ctx.lines[layer]))
            drew = True
        ns = sorted({r["n"] for r in mine if "n" in r})
        ax.set_xscale("log")
        ax.set(xlabel="model queries per image", ylabel="top-1 accuracy", ylim=(0, 1))
        family_title = _title({"attack": name, "threat": "hard_label"})
        ax.set_title(f"{family_title}, budget {budget:g}"
                     + (f" (n={ns[0]})" if len(ns) == 1 else ""), fontsize=9)
        _grid(ax)
    if not drew:
        plt.close(fig)
        return None
    fig.suptitle(f"hard-label attacks vs queries (kNN {ctx.rule_name}, K={ctx.ev.k})")
    fig.tight_layout()
    _fig_legend(fig, axes)
    return fig


PLOTS: list[tuple[str, Callable]] = [
    ("accuracy.png", plot_accuracy),
    ("acc_vs_budget.png", plot_budget),
    ("acc_vs_k.png", plot_k),
    ("acc_vs_layer.png", plot_layer),
    ("acc_vs_dbsize.png", plot_dbsize),
    ("whitebox.png", plot_whitebox),
    ("acc_vs_queries.png", plot_queries),
]


def figures(rows: list[dict], ev) -> Iterator[tuple[str, object]]:
    """(file name, matplotlib Figure) of each plot the rows allow; the caller closes them. A plot
    that fails is logged and skipped."""
    plt = _plt()
    usable = _clean_rows(rows)
    if not usable:
        return
    ctx = _Ctx(usable, ev)
    for name, build in PLOTS:
        before = set(plt.get_fignums())
        try:
            fig = build(ctx, plt)
        except Exception:  # a plot must never cost the report
            log.exception("plot %s failed; left out", name)
            for num in set(plt.get_fignums()) - before:
                plt.close(num)
            continue
        if fig is not None:
            yield name, fig


def write_plots(out: Path, rows: list[dict], ev) -> list[str]:
    """Write the plots the rows allow under ``out``; returns their file names."""
    plt = _plt()
    written = []
    for name, fig in figures(rows, ev):
        try:
            fig.savefig(Path(out) / name, dpi=DPI, bbox_inches="tight")
        finally:
            plt.close(fig)
        written.append(name)
    return written
