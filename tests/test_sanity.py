"""The sanity checks (pipeline/evaluate/sanity.py): each one on a toy grid that violates it, on
one that passes, and noise alone (a 1-point or non-significant gap) never flags a table."""

import numpy as np
import pytest

from pipeline.evaluate.report import markdown_report
from pipeline.evaluate.sanity import (
    Outcome,
    mcnemar_p,
    sanity_checks,
)

N = 200
NONE = ("none", "-", 0)
KNN = ("conv_4_1", "cbw_d", 50)
DEFENSES = [NONE, KNN]


def correct(acc: float, n: int = N, seed: int = 0) -> np.ndarray:
    """A 0/1 vector with exactly round(acc * n) ones, the first ones (so two vectors of the
    same length are nested: the smaller one's right images are the larger one's too)."""
    out = np.zeros(n, dtype=bool)
    out[:round(acc * n)] = True
    return out


def outcome(name, budget, accs, threat="gray_box", tag=None, images=None, **meta):
    label = name + (f".{tag}" if tag else "")
    rows = np.stack([correct(a, N if images is None else len(images)) for a in accs])
    return Outcome({"condition": f"{label}-{threat}@{budget:g}", "attack": label, "name": name,
                    "tag": tag, "threat": threat, "target_layer": "", "budget": budget, **meta},
                   DEFENSES, rows, images)


CLEAN = outcome("clean", 0.0, [0.90, 0.88], threat="-")


def checks(outcomes, budget=0.06):
    return sanity_checks(outcomes, CLEAN, DEFENSES, 10, budget)


def test_mcnemar_exact_values():
    a, b = np.array([1] * 10 + [0] * 5), np.array([0] * 10 + [0] * 5)
    assert mcnemar_p(a, b) == pytest.approx(2 / 2 ** 10)  # 10 discordant, all one way
    assert mcnemar_p(a, a) == 1.0
    x, y = np.array([1, 0, 1, 0]), np.array([0, 1, 0, 1])
    assert mcnemar_p(x, y) == 1.0  # balanced discordance


def test_budget_monotone_flags_accuracy_that_rises_with_the_budget():
    bad = checks([outcome("pgd", 0.02, [0.30, 0.40]), outcome("pgd", 0.06, [0.60, 0.70])])
    c = bad["checks"]["budget_monotone"]
    assert c["status"] == "fail" and c["violations"] == 2 and bad["flagged"]
    assert "budget_monotone" in bad["failed"]
    v = c["listed"][0]
    assert v["accuracy_smaller"] == 0.30 and v["accuracy_larger"] == 0.60 and v["p"] < 0.05
    ok = checks([outcome("pgd", 0.02, [0.60, 0.70]), outcome("pgd", 0.06, [0.30, 0.40])])
    assert ok["checks"]["budget_monotone"]["status"] == "pass" and not ok["flagged"]


def test_noise_alone_does_not_flag():
    # 0.5 pt higher at the larger budget (1 image): within one point
    wiggle = checks([outcome("pgd", 0.02, [0.300, 0.4]), outcome("pgd", 0.06, [0.305, 0.4])])
    assert wiggle["checks"]["budget_monotone"]["status"] == "pass"
    # 3 pt higher but on few discordant images the other way round: McNemar p >= 0.05
    low = correct(0.30)
    high = low.copy()
    high[60:66] = True  # 6 more right, none fewer: p = 2/64 < 0.05 -> flagged
    o1 = Outcome({**outcome("pgd", 0.02, [0.3, 0.3]).meta}, DEFENSES, np.stack([low, low]))
    o2 = Outcome({**outcome("pgd", 0.06, [0.3, 0.3]).meta}, DEFENSES, np.stack([high, low]))
    assert checks([o1, o2])["checks"]["budget_monotone"]["violations"] == 1
    mixed = high.copy()
    mixed[:4] = False  # 6 gained, 4 lost: a 1-pt gap, p = 0.75
    o3 = Outcome({**o2.meta}, DEFENSES, np.stack([mixed, low]))
    assert checks([o1, o3])["checks"]["budget_monotone"]["status"] == "pass"


def test_unbounded_budget_must_reach_chance():
    bad = checks([outcome("pgd", 1.0, [0.05, 0.50], tag="unbounded")])
    c = bad["checks"]["unbounded"]
    assert c["status"] == "fail" and c["violations"] == 1 and c["limit"] == pytest.approx(0.15)
    assert c["listed"][0]["defense"].startswith("conv_4_1")
    # the strongest unbounded set per defense counts (the adaptive one for the kNN vote)
    ok = checks([outcome("pgd", 1.0, [0.05, 0.50], tag="unbounded"),
                 outcome("adaptive", 1.0, [0.30, 0.10], threat="white_box", tag="unbounded")])
    assert ok["checks"]["unbounded"]["status"] == "pass"
    assert checks([])["checks"]["unbounded"]["status"] == "not run"


def test_random_noise_must_stay_within_the_clean_interval():
    def noise(fracs):
        rows = np.stack([np.full(N, f) for f in fracs])
        return Outcome({"condition": "noise-random@0.06", "attack": "noise", "name": "noise", "tag": None,
                        "threat": "random", "target_layer": "", "budget": 0.06, "draws": 20},
                       DEFENSES, rows)

    bad = checks([noise([0.60, 0.88])])["checks"]["random_noise"]
    assert bad["status"] == "fail" and bad["violations"] == 1 and bad["draws"] == 20
    assert checks([noise([0.89, 0.87])])["checks"]["random_noise"]["status"] == "pass"
    # noise at another budget than the headline one is not the control
    assert checks([noise([0.6, 0.6])], budget=0.1)["checks"]["random_noise"]["status"] == "not run"


def test_iterative_must_be_at_least_as_strong_as_single_step():
    bad = checks([outcome("fgsm", 0.06, [0.30, 0.50]), outcome("ifgsm", 0.06, [0.60, 0.52])])
    c = bad["checks"]["iterative_vs_single"]
    assert c["status"] == "fail" and c["violations"] == 1
    ok = checks([outcome("fgsm", 0.06, [0.40, 0.50]), outcome("pgd", 0.06, [0.10, 0.40])])
    assert ok["checks"]["iterative_vs_single"]["status"] == "pass"


def test_convergence_flags_a_stronger_long_pgd_and_names_the_number_to_report():
    base = outcome("pgd", 0.06, [0.30, 0.50], steps=10, restarts=1)
    strong = outcome("pgd", 0.06, [0.29, 0.30], tag="converged", steps=100, restarts=5)
    c = checks([base, strong])["checks"]["convergence"]
    assert c["status"] == "fail" and c["violations"] == 1
    assert c["report_instead"] == {"pgd gray_box@0.06": "pgd.converged gray_box@0.06"}
    # too few restarts: not the convergence check's set
    weak = outcome("pgd", 0.06, [0.1, 0.1], tag="long", steps=100, restarts=1)
    assert checks([base, weak])["checks"]["convergence"]["status"] == "not run"


def test_black_box_must_not_beat_gray_box():
    bad = checks([outcome("pgd", 0.06, [0.30, 0.50]),
                  outcome("pgd", 0.06, [0.20, 0.50], threat="black_box")])
    assert bad["checks"]["black_vs_gray"]["status"] == "fail"
    ok = checks([outcome("pgd", 0.06, [0.30, 0.50]),
                 outcome("pgd", 0.06, [0.60, 0.55], threat="black_box")])
    assert ok["checks"]["black_vs_gray"]["status"] == "pass"


def test_hard_label_series_on_a_subsample():
    images = np.arange(0, N, 4)  # 50 of the 200
    series = [outcome("hsj", 0.06, [a, a], threat="hard_label", images=images, queries=q)
              for a, q in ((0.5, 1000), (0.7, 5000))]
    c = checks(series)["checks"]["budget_monotone"]
    assert c["status"] == "fail"  # more queries, more accuracy: impossible for a kept best
    pgd = outcome("pgd", 0.06, [0.30, 0.50])
    v = checks([pgd, *series])["checks"]["hard_label_validation"]
    assert v["status"] == "gap" and v["flags_table"] is False
    (res,) = v["by_attack"].values()
    assert res["images"] == 50 and res["hard_label"] == 0.7  # compared on the subsample only
    assert res["pgd_gray"] == pytest.approx(np.mean(correct(0.30)[images]))
    assert not checks([pgd, *series])["failed"].count("hard_label_validation")


def test_flagged_table_and_claims_json_in_the_report():
    from pipeline.config import EvaluateSpec

    bad = checks([outcome("pgd", 0.02, [0.30, 0.40]), outcome("pgd", 0.06, [0.60, 0.70])])
    rows = [{"database": "db", "db_size": 10, "condition": "clean", "attack": "clean", "threat": "-",
             "target_layer": "", "budget": 0.0, "layer": "none", "weighting": "-", "k": 0, "n": N,
             "correct": 180, "accuracy": 0.9, "ci95_low": 0.85, "ci95_high": 0.93}]
    md = markdown_report(rows, [], EvaluateSpec(k=50), "t", sanity={"db": bad})
    assert "**Flagged**: sanity check(s) failed for this database: budget_monotone" in md


# --- the grid: controls, the hard-label attack and the checks, end to end on the toy harness ---

from tests.test_evaluate_harness import _grid, _spec, toy  # noqa: E402, F401  (the module's toy)


def test_grid_writes_noise_hard_label_and_sanity_and_resumes(toy, tmp_path, monkeypatch):  # noqa: F811
    import json

    from pipeline.evaluate import experiment, hard_label
    from pipeline.evaluate.report import write_report

    attacks = [
        {"name": "fgsm", "budget": [0.05, 0.1]},
        {"name": "pgd", "steps": 2, "budget": [0.05, 0.1]},
        {"name": "pgd", "tag": "converged", "steps": 20, "restarts": 5, "random_start": True,
         "budget": 0.1},
        {"name": "pgd", "tag": "unbounded", "steps": 3, "budget": 1.0},
        {"name": "noise", "draws": 4, "budget": 0.1},
        {"name": "hsj", "num_images": 6, "query_budgets": [20, 60], "budget": 0.1},
    ]
    ev = _spec(attacks, headline_budget=0.1)
    r = _grid(toy, tmp_path, ev)
    rows = r["rows"]
    noise = [x for x in rows if x["attack"] == "noise"]
    assert len(noise) == 1 and noise[0]["n"] == 40 and noise[0]["draws"] == 4
    hsj = {x["attack"]: x for x in rows if x["threat"] == "hard_label"}
    assert set(hsj) == {"hsj.20", "hsj.60"} and hsj["hsj.60"]["n"] == 6
    assert hsj["hsj.60"]["accuracy"] <= hsj["hsj.20"]["accuracy"]
    (sub,) = [x for x in rows if x["attack"] == "worst-case-subsample"]
    assert sub["n"] == 6 and sub["accuracy"] <= hsj["hsj.60"]["accuracy"]
    checks = r["sanity"]["undefended"]["checks"]
    assert checks["unbounded"]["status"] == "pass"  # PGD at Δ 1 fools the band model
    assert checks["random_noise"]["status"] in ("pass", "fail") and checks["random_noise"]["draws"] == 4
    assert checks["convergence"]["compared"] == 1 and checks["iterative_vs_single"]["compared"] == 3
    assert r["hard_label"]["hsj"][0]["classifier"] == "none"
    out = write_report(tmp_path, rows, r["attacks"], ev, sanity=r["sanity"], hard_label=r["hard_label"])
    md = (tmp_path / "results.md").read_text()
    assert "## Sanity checks" in md and "### Hard-label attack" in md and "HSJ 60 hard-label 0.1" in md
    assert "worst-case, hard-label subsample" in md
    assert json.loads((tmp_path / "claims.json").read_text())["sanity"]["undefended"]["checks"]
    assert "acc_vs_queries.png" in out["plots"]
    # everything is on disk: a second run neither draws noise nor attacks again
    monkeypatch.setattr(experiment, "random_noise", lambda *a: pytest.fail("noise redrawn"))
    monkeypatch.setattr(hard_label, "hop_skip_jump", lambda *a, **k: pytest.fail("re-attacked"))
    again = _grid(toy, tmp_path, ev)
    assert again["sets_crafted"] == 0 and again["sanity"] == json.loads(json.dumps(r["sanity"]))


def test_hard_label_series_are_per_classifier():
    images = np.arange(0, N, 4)
    series = []
    for d, accs in ((NONE, (0.2, 0.5)), (KNN, (0.3, 0.6))):
        for a, q in zip(accs, (1000, 5000), strict=True):
            meta = {"condition": f"hsj-hard_label@0.06/{q}", "attack": "hsj", "name": "hsj", "tag": None,
                    "threat": "hard_label", "target_layer": "", "budget": 0.06, "queries": q}
            series.append(Outcome(meta, [d], correct(a, len(images))[None], images))
    c = checks(series)["checks"]["budget_monotone"]
    assert c["compared"] == 2 and c["violations"] == 2
