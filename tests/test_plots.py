"""The report's plots: every series its own style, legends outside the axes, every plot written
from a realistic grid (hard-label, noise, unbounded and worst-case rows included)."""

from __future__ import annotations

import logging

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb

from pipeline.config import EvaluateSpec
from pipeline.evaluate import plots
from pipeline.evaluate.grid import wilson_interval
from pipeline.evaluate.plots import (
    HATCHES,
    MARKERS,
    figures,
    series_style,
    series_styles,
    write_plots,
)

LAYERS = ["conv_2_2", "conv_3_2", "conv_4_1", "conv_4_2"]
WEIGHTINGS = ["uw", "cbw_e", "cbw_d"]
BUDGETS = [0.02, 0.04, 0.06, 0.08, 0.10]
HEADLINE = 0.06
N = 400
EXPECTED = ["accuracy.png", "acc_vs_budget.png", "acc_vs_k.png", "acc_vs_layer.png",
            "acc_vs_dbsize.png", "whitebox.png", "acc_vs_queries.png"]

# The titles a full reproduction's columns carry (report.title_of), tagged variants included.
TITLES = ["clean", "FGSM gray", "I-FGSM gray", "PGD gray", "CW-L2 gray", "FGSM black", "PGD black",
          "PGD-PR white", "PGD-FS white", "adaptive white", "min-norm kNN white",
          "min-norm kNN guides white", "min-norm kNN k05 white", "PGD unbounded gray",
          "HSJ 1k hard-label", "HSJ 5k hard-label", "HSJ 10k hard-label", "random noise",
          "worst-case", "worst-case, hard-label subsample"]


def _ev() -> EvaluateSpec:
    return EvaluateSpec(k=50, ks=[1, 50], weightings=["uw", "cbw_e", "cbw_d"], headline_budget=HEADLINE)


def _rows(databases=(("small", 10_000), ("full", 100_000))) -> list[dict]:
    """A grid as evaluate writes it: every defense under every condition (white-box and
    hard-label sets once per attacked layer), PGD gray and the worst case swept over budgets."""
    rng = np.random.default_rng(0)
    defenses = [("none", "-", 0)] + [(x, w, k) for x in LAYERS for w in WEIGHTINGS for k in (1, 50)]
    conds = [("clean", "-", "", 0.0, {})]
    conds += [(a, "gray_box", "", HEADLINE, {}) for a in ("fgsm", "ifgsm", "cw")]
    conds += [("pgd", "gray_box", "", b, {}) for b in BUDGETS]
    conds += [("pgd.unbounded", "gray_box", "", 1.0, {})]
    conds += [(a, "black_box", "", HEADLINE, {}) for a in ("fgsm", "pgd")]
    conds += [(a, "white_box", x, HEADLINE, {}) for a in ("pgd_pr", "pgd_fs", "adaptive", "min_norm")
              for x in LAYERS]
    conds += [(f"hsj.{q // 1000}k", "hard_label", x, HEADLINE, {"queries": q, "n": 100})
              for q in (1000, 5000, 10000) for x in ["", *LAYERS]]
    conds += [("noise", "random", "", HEADLINE, {})]
    conds += [("worst-case", "all", "", b, {"attacks_in_worst_case": i + 3})
              for i, b in enumerate(BUDGETS)]
    conds += [("worst-case-subsample", "all", "", HEADLINE, {"n": 100})]
    rows = []
    for db, size in databases:
        for attack, threat, target, budget, extra in conds:
            if db != databases[0][0] and attack not in ("clean", "pgd", "worst-case"):
                continue
            for layer, rule, k in defenses:
                if threat == "hard_label" and target != ("" if layer == "none" else layer):
                    continue  # a hard-label set queries only the classifier it attacks
                n = extra.get("n", N)
                correct = int(rng.integers(0, n + 1))
                lo, hi = wilson_interval(correct, n)
                rows.append({"database": db, "db_size": size,
                             "condition": f"{attack}-{threat}@{budget:g}", "attack": attack,
                             "threat": threat, "target_layer": target, "budget": budget,
                             "layer": layer, "weighting": rule, "k": k, "n": n, "correct": correct,
                             "accuracy": correct / n, "ci95_low": lo, "ci95_high": hi,
                             "attacks_in_worst_case": extra.get("attacks_in_worst_case", ""),
                             **({"queries": extra["queries"]} if "queries" in extra else {})})
    return rows


def test_styles_are_distinct_and_stable():
    styles = series_styles(TITLES)
    pairs = [(s["color"], s["hatch"]) for s in styles.values()]
    assert len(set(pairs)) == len(TITLES), "two series share colour and hatch"
    lines = [(s["color"], s["marker"], str(s["linestyle"])) for s in styles.values()]
    assert len(set(lines)) == len(TITLES), "two line series share colour, marker and line style"
    # The same set in another order: the same styles (keyed by title, not position).
    assert series_styles(list(reversed(TITLES))) == styles
    # Untagged known attacks keep series_style's own style whatever else is plotted with them.
    for t in ("clean", "FGSM gray", "PGD gray", "PGD black", "PGD-PR white", "worst-case"):
        assert styles[t] == series_style(t) == series_styles([t, "PGD gray"])[t]


def test_worst_case_and_clean_stand_out():
    styles = series_styles(TITLES)
    worst = {t: s for t, s in styles.items() if t.startswith("worst-case")}
    others = {t: s for t, s in styles.items() if not t.startswith("worst-case")}
    assert worst["worst-case"]["hatch"] == "xx" and worst["worst-case"]["linestyle"] == "--"
    for s in worst.values():
        assert s["color"] == "black" and s["edgecolor"] == "black" and s["marker"] == "X"
        assert s["linewidth"] > max(o["linewidth"] for o in others.values())
    for s in others.values():
        assert s["color"] != "black" and s["hatch"] != "xx" and s["marker"] != "X"
    assert "X" not in MARKERS and "xx" not in HATCHES
    assert styles["clean"]["color"] == "#404040"


def test_families_share_a_hue_and_no_colour():
    styles = series_styles(TITLES)
    fam = {t: s["family"] for t, s in styles.items()}
    assert fam["FGSM gray"] == fam["PGD gray"] == "gray"
    assert fam["PGD black"] == "black" and fam["adaptive white"] == "white"
    assert fam["HSJ 1k hard-label"] == "hard_label" and fam["random noise"] == "noise"
    colours: dict[str, str] = {}
    for s in styles.values():
        assert colours.setdefault(s["color"], s["family"]) == s["family"]
    # Hard-label query budgets: one hue, darker with more queries.
    hsj = [styles[f"HSJ {q} hard-label"]["color"] for q in ("1k", "5k", "10k")]
    assert len(set(hsj)) == 3
    lum = [sum(to_rgb(c)) for c in hsj]
    assert lum == sorted(lum, reverse=True)


def test_many_unknown_titles_still_distinct():
    titles = [f"attack{i} {threat}" for i in range(12) for threat in ("gray", "black", "white")]
    titles += [f"HSJ {q}k hard-label" for q in range(1, 15)] + ["foo", "bar", "baz"]
    pairs = {(s["color"], s["hatch"]) for s in series_styles(titles).values()}
    assert len(pairs) == len(titles)


def _legends(fig) -> list:
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]


def test_every_plot_written_with_legend_outside(tmp_path, monkeypatch, caplog):
    drawn = {}

    def keep(rows, ev):  # write_plots' figures, kept for a look after they are saved
        for name, fig in figures(rows, ev):
            drawn[name] = fig
            yield name, fig

    monkeypatch.setattr(plots, "figures", keep)
    with caplog.at_level(logging.WARNING):
        written = write_plots(tmp_path, _rows(), _ev())
    assert written == EXPECTED and not caplog.records
    for name in EXPECTED:
        assert (tmp_path / name).stat().st_size > 5_000, name
        fig = drawn[name]
        renderer = FigureCanvasAgg(fig).get_renderer()  # closed figures lose their canvas
        legends = _legends(fig)
        assert len(legends) == 1, f"{name}: one legend per figure"
        box = legends[0].get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), f"{name}: legend on a panel"


def _labels(fig) -> list[str]:
    return [t.get_text() for leg in _legends(fig) for t in leg.get_texts()]


def _built(rows) -> dict:
    """The figures, built but not rendered (closed again)."""
    import matplotlib.pyplot as plt

    figs = dict(figures(rows, _ev()))
    for fig in figs.values():
        plt.close(fig)
    return figs


def test_plot_contents():
    figs = _built(_rows())
    bars = _labels(figs["accuracy.png"])
    assert bars[0] == "clean" and bars[-2] == "worst-case"
    assert bars[-1].startswith("worst-case") and bars[-1].endswith("(n=100)")
    assert sum(b.startswith("HSJ") and b.endswith("(n=100)") for b in bars) == 3
    assert "random noise" in bars and "PGD unbounded gray" not in bars
    assert len(bars) == len(set(bars))
    handles = [h for leg in _legends(figs["accuracy.png"]) for h in leg.legend_handles]
    drawn = {(tuple(h.get_facecolor()), h.get_hatch()) for h in handles}
    assert len(drawn) == len(bars), "two bar series look alike"
    assert len(figs["accuracy.png"].axes) == 3  # a panel per weighting
    # The unbounded set does not stretch the budget axis.
    for ax in figs["acc_vs_budget.png"].axes:
        assert ax.get_xlim()[1] < 0.5
    assert [ax.get_title() for ax in figs["acc_vs_budget.png"].axes] == ["PGD gray", "worst-case"]
    assert figs["acc_vs_queries.png"].axes[0].get_xscale() == "log"
    assert _labels(figs["acc_vs_queries.png"]) == ["no defense"] + [f"kNN CBW-D {x}" for x in LAYERS]


JUNK = [
    {"database": "small", "attack": "mystery.x", "threat": "psychic", "budget": 0.06,
     "target_layer": "", "layer": "none", "weighting": "-", "k": 0, "n": 5, "accuracy": 0.2,
     "ci95_low": 0.0, "ci95_high": 0.6},
    {"attack": "pgd", "budget": "not a number", "layer": "none"},
    {"database": "small", "attack": "pgd", "threat": "gray_box", "budget": None,
     "layer": "conv_2_2", "weighting": "odd", "k": "50", "accuracy": "0.5"},
    {"something": "else"},
]


def test_unknown_rows_do_not_crash(caplog):
    one_db = _rows(databases=(("small", 10_000),))
    with caplog.at_level(logging.WARNING):
        figs = _built(one_db + JUNK)
    assert list(figs) == [n for n in EXPECTED if n != "acc_vs_dbsize.png"] and not caplog.records


def test_no_hard_label_rows_no_queries_plot(tmp_path):
    rows = [r for r in _rows(databases=(("small", 10_000),)) if r["threat"] != "hard_label"]
    figs = _built(rows)
    assert "acc_vs_queries.png" not in figs and "accuracy.png" in figs
    assert write_plots(tmp_path, [], _ev()) == []
