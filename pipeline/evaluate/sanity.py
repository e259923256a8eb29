"""Sanity checks of an evaluation grid (Carlini et al. 2019, "On Evaluating Adversarial
Robustness"; Tramer et al. 2020): each computed from the grid's per-image predictions, written
to claims.json and the report. A failed check flags the database's table.

Comparisons pass within paired noise: a gap of at most 1 point, or an exact McNemar test on the
same images with p >= 0.05, so noise alone does not flag a table. A check whose conditions are
not in the grid says what it needs instead of passing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluate.grid import wilson_interval

GAP = 0.01  # one point
ALPHA = 0.05
UNBOUNDED = 1.0  # Δ >= 1: the whole image may change
MAX_LISTED = 12  # violations listed per check (all are counted)


@dataclass
class Outcome:
    """One condition's per-image correctness for each defense: ``correct`` [D, n] (1/0, or the
    fraction of draws right for random noise) on the query images ``images`` (indices into the
    sample; None = all of them)."""

    meta: dict  # condition, attack (with tag), name, tag, threat, budget, target_layer, ...
    defenses: list[tuple]
    correct: np.ndarray
    images: np.ndarray | None = None
    _rows: dict = field(default_factory=dict, repr=False)

    def row(self, defense: tuple) -> np.ndarray | None:
        if not self._rows:
            self._rows.update({d: i for i, d in enumerate(self.defenses)})
        i = self._rows.get(defense)
        return None if i is None else self.correct[i]


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar test of paired 0/1 outcomes (binomial on the discordant pairs)."""
    only_a = int(np.sum(a.astype(bool) & ~b.astype(bool)))
    only_b = int(np.sum(~a.astype(bool) & b.astype(bool)))
    n = only_a + only_b
    if n == 0:
        return 1.0
    low = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _aligned(a: Outcome, b: Outcome, defense: tuple):
    """Both outcomes' correctness for ``defense`` on the images they share (None if either
    lacks the defense)."""
    ra, rb = a.row(defense), b.row(defense)
    if ra is None or rb is None:
        return None
    if a.images is None and b.images is None:
        return ra, rb
    ia = np.arange(len(ra)) if a.images is None else a.images
    ib = np.arange(len(rb)) if b.images is None else b.images
    _, pa, pb = np.intersect1d(ia, ib, return_indices=True)
    return ra[pa], rb[pb]


def lower_beyond_noise(low: np.ndarray, high: np.ndarray) -> tuple[bool, dict]:
    """Is ``low``'s accuracy below ``high``'s by more than paired noise? (both on the same
    images, 0/1). Returns (verdict, the numbers)."""
    acc_low, acc_high = float(np.mean(low)), float(np.mean(high))
    p = mcnemar_p(low, high)
    gap = acc_high - acc_low
    return bool(gap > GAP and p < ALPHA), {"gap": round(gap, 4), "p": round(p, 4)}


def _name(defense: tuple) -> str:
    layer, rule, k = defense
    return "no defense" if layer == "none" else f"{layer} {rule} K={k}"


def _title(o: Outcome) -> str:
    m = o.meta
    extra = f"/{m['queries']}q" if m.get("queries") else ""
    at = f"[{m['target_layer']}]" if m.get("target_layer") else ""
    return f"{m['attack']} {m['threat']}{at}@{m['budget']:g}{extra}"


def _result(description: str, compared: int, violations: list[dict], needs: str | None = None,
            **extra) -> dict:
    if compared == 0:
        return {"check": description, "status": "not run", "needs": needs, "compared": 0,
                "violations": 0, "listed": []}
    return {"check": description, "status": "fail" if violations else "pass", "compared": compared,
            "violations": len(violations), "listed": violations[:MAX_LISTED], **extra}


def _compare(pairs, defenses: list[tuple], names: tuple[str, str]) -> tuple[int, list[dict]]:
    """Each (first, second) pair of sets under each defense: how many comparisons were made, and
    the violations, where the first set's accuracy is below the second's beyond paired noise
    (each named by ``names``, with both accuracies)."""
    compared, violations = 0, []
    for first, second in pairs:
        for d in defenses:
            pair = _aligned(first, second, d)
            if pair is None:
                continue
            compared += 1
            bad, nums = lower_beyond_noise(pair[0], pair[1])
            if bad:
                violations.append({"defense": _name(d), names[0]: _title(first),
                                   names[1]: _title(second),
                                   f"accuracy_{names[0]}": round(float(pair[0].mean()), 4),
                                   f"accuracy_{names[1]}": round(float(pair[1].mean()), 4), **nums})
    return compared, violations


def budget_monotone(outcomes: list[Outcome], clean: Outcome, defenses: list[tuple]) -> dict:
    """Accuracy never rises with the budget (clean is budget 0), nor with the model queries of
    a hard-label attack, for every attack and defense."""
    series: dict[tuple, list[Outcome]] = {}
    for o in outcomes:
        m = o.meta
        if m["name"] == "noise":
            continue
        # a hard-label outcome holds one classifier: its series is per classifier, over queries
        key = (m["attack"], m["threat"], m.get("target_layer", ""),
               (m["budget"], tuple(o.defenses)) if m.get("queries") else None)
        series.setdefault(key, []).append(o)
    pairs = []
    for key, members in series.items():
        hard = key[3] is not None
        members = sorted(members, key=lambda o: o.meta["queries"] if hard else o.meta["budget"])
        chain = members if hard else [clean, *members]
        pairs.extend(zip(chain, chain[1:], strict=False))
    # a violation: the smaller budget below the larger
    compared, violations = _compare(pairs, defenses, ("smaller", "larger"))
    return _result("accuracy is non-increasing in the budget (and in model queries)", compared,
                   violations, "an attack at two or more budgets")


def unbounded(outcomes: list[Outcome], defenses: list[tuple], num_classes: int) -> dict:
    """At Δ >= 1 the attacks take every classifier to at most chance + 5 points (per defense,
    the strongest of the unbounded sets evaluated on it)."""
    sets = [o for o in outcomes if o.meta["budget"] >= UNBOUNDED and o.meta["name"] != "noise"]
    limit = 1.0 / num_classes + 0.05
    compared, violations, per_defense = 0, [], {}
    for d in defenses:
        accs = {_title(o): float(o.row(d).mean()) for o in sets if o.row(d) is not None}
        if not accs:
            continue
        compared += 1
        worst = min(accs, key=accs.get)
        per_defense[_name(d)] = {"accuracy": round(accs[worst], 4), "by": worst}
        if accs[worst] > limit:
            violations.append({"defense": _name(d), "accuracy": round(accs[worst], 4),
                               "limit": round(limit, 4), "strongest": worst,
                               "all": {t: round(a, 4) for t, a in accs.items()}})
    return _result(f"at an unbounded budget (Δ >= {UNBOUNDED:g}) accuracy <= chance + 5 pt",
                   compared, violations, "a set at budget 1.0 (e.g. pgd.unbounded, adaptive.unbounded)",
                   limit=round(limit, 4), per_defense=per_defense,
                   seconds={_title(o): o.meta.get("seconds") for o in sets})


def random_noise(outcomes: list[Outcome], clean: Outcome, defenses: list[tuple],
                 budget: float | None) -> dict:
    """Random noise of the headline budget's norm leaves accuracy within the clean 95% interval."""
    noise = [o for o in outcomes if o.meta["name"] == "noise" and o.meta["budget"] == budget]
    compared, violations, per_defense = 0, [], {}
    for o in noise:
        for d in defenses:
            rn, rc = o.row(d), clean.row(d)
            if rn is None or rc is None:
                continue
            compared += 1
            lo, hi = wilson_interval(int(rc.sum()), len(rc))
            acc = float(rn.mean())
            per_defense[_name(d)] = {"noise": round(acc, 4), "clean": round(float(rc.mean()), 4),
                                     "clean_ci95": [round(lo, 4), round(hi, 4)]}
            if not lo <= acc <= hi:
                violations.append({"defense": _name(d), **per_defense[_name(d)]})
    draws = noise[0].meta.get("draws") if noise else None
    return _result("random noise of the same norm stays within the clean interval", compared,
                   violations, "a noise set at the headline budget", draws=draws,
                   per_defense=per_defense)


def iterative_vs_single(outcomes: list[Outcome], defenses: list[tuple]) -> dict:
    """Iterative attacks (I-FGSM, PGD) are at least as strong as the single-step FGSM of the
    same threat and budget."""
    pairs = [(f, it) for f in outcomes if f.meta["name"] == "fgsm"
             for it in outcomes if it.meta["name"] in ("ifgsm", "pgd")
             and it.meta["threat"] == f.meta["threat"] and it.meta["budget"] == f.meta["budget"]]
    # a violation: FGSM below the iterative attack
    compared, violations = _compare(pairs, defenses, ("single_step", "iterative"))
    return _result("iterative attacks are at least as strong as single-step FGSM", compared,
                   violations, "FGSM and I-FGSM or PGD at one threat and budget")


def convergence(outcomes: list[Outcome], defenses: list[tuple]) -> dict:
    """PGD with >= 10x the steps and >= 5 restarts lowers accuracy by at most paired noise;
    where it does more, its (stronger) number is the one to report."""
    pgd = [o for o in outcomes if o.meta["name"] == "pgd"]
    pairs = [(s, base) for base in pgd for s in pgd
             if s is not base and s.meta["threat"] == base.meta["threat"]
             and s.meta["budget"] == base.meta["budget"]
             and s.meta.get("steps", 0) >= 10 * base.meta.get("steps", math.inf)
             and s.meta.get("restarts", 1) >= 5]
    # a violation: the converged run below the plain one
    compared, violations = _compare(pairs, defenses, ("stronger", "pgd"))
    stronger: dict[str, str] = {}
    for v in violations:
        stronger.setdefault(v["pgd"], v["stronger"])
    return _result("PGD with 10x the steps and 5 random restarts lowers accuracy by <= 1 pt "
                   "(within noise)", compared, violations,
                   "a PGD set with >= 10x the steps and restarts >= 5 beside a PGD set",
                   report_instead=stronger)


def black_vs_gray(outcomes: list[Outcome], defenses: list[tuple]) -> dict:
    """A black-box (transfer) set is no stronger than the gray-box set of the same attack."""
    pairs = [(black, g) for black in outcomes if black.meta["threat"] == "black_box"
             for g in outcomes if g.meta["threat"] == "gray_box"
             and g.meta["attack"] == black.meta["attack"] and g.meta["budget"] == black.meta["budget"]]
    # a violation: black-box below gray-box
    compared, violations = _compare(pairs, defenses, ("black_box", "gray_box"))
    return _result("black-box is no stronger than gray-box", compared, violations,
                   "an attack run both gray-box and black-box at one budget")


def hard_label_validation(outcomes: list[Outcome]) -> dict:
    """On the undefended classifier, the hard-label attack at its largest query budget lands
    within gray-box PGD's 95% interval on the same images (else the gap is stated). Reported,
    not a flag: a decision-based attack may honestly need more queries than it was given."""
    none = ("none", "-", 0)
    hard = [o for o in outcomes if o.meta["threat"] == "hard_label"]
    out = {}
    for h in hard:
        if h.meta["queries"] != max(o.meta["queries"] for o in hard
                                    if o.meta["attack"] == h.meta["attack"]):
            continue
        pgd = [o for o in outcomes if o.meta["name"] == "pgd" and o.meta["threat"] == "gray_box"
               and not o.meta.get("tag") and o.meta["budget"] == h.meta["budget"]]
        for p in pgd:
            pair = _aligned(h, p, none)
            if pair is None:
                continue
            acc_h, acc_p = float(pair[0].mean()), float(pair[1].mean())
            lo, hi = wilson_interval(int(pair[1].sum()), len(pair[1]))
            out[_title(h)] = {"hard_label": round(acc_h, 4), "pgd_gray": round(acc_p, 4),
                              "pgd_ci95": [round(lo, 4), round(hi, 4)], "images": len(pair[0]),
                              "within": bool(lo <= acc_h <= hi), "gap": round(acc_h - acc_p, 4)}
    if not out:
        return {"check": "hard-label attack vs gray-box PGD on the undefended classifier",
                "status": "not run", "needs": "hsj and untagged gray-box pgd at one budget",
                "flags_table": False}
    ok = all(v["within"] for v in out.values())
    return {"check": "hard-label attack vs gray-box PGD on the undefended classifier",
            "status": "pass" if ok else "gap", "flags_table": False, "by_attack": out}


def sanity_checks(outcomes: list[Outcome], clean: Outcome, defenses: list[tuple],
                  num_classes: int, headline_budget: float | None) -> dict:
    """Every check on one database's grid. ``defenses``: those the checks cover (the tables'
    K and the undefended classifier); ``flagged``: a check that flags the table failed."""
    checks = {
        "budget_monotone": budget_monotone(outcomes, clean, defenses),
        "unbounded": unbounded(outcomes, defenses, num_classes),
        "random_noise": random_noise(outcomes, clean, defenses, headline_budget),
        "iterative_vs_single": iterative_vs_single(outcomes, defenses),
        "convergence": convergence(outcomes, defenses),
        "black_vs_gray": black_vs_gray(outcomes, defenses),
        "hard_label_validation": hard_label_validation(outcomes),
    }
    failed = [name for name, c in checks.items() if c["status"] == "fail"
              and c.get("flags_table", True)]
    return {"checks": checks, "failed": failed, "flagged": bool(failed)}


def markdown(by_database: dict[str, dict]) -> str:
    """The report's sanity-check block: one line per check (first database in full, the others
    only where they differ)."""
    if not by_database:
        return ""
    names = list(by_database)
    first = by_database[names[0]]["checks"]
    lines = ["## Sanity checks", "",
             "Comparisons pass within paired noise (a gap of at most 1 pt, or McNemar p >= 0.05). "
             "A failed check flags the database's table.", "",
             f"| check | {names[0]} | other databases |", "|---|---|---|"]
    for key, c in first.items():
        others = [f"{db}: {by_database[db]['checks'][key]['status']}" for db in names[1:]
                  if by_database[db]["checks"][key]["status"] != c["status"]]
        rest = ("; ".join(others) or "same") if len(names) > 1 else "–"
        lines.append(f"| {c['check']} | {_verdict(c)} | {rest} |")
    return "\n".join(lines) + "\n"


def _verdict(c: dict) -> str:
    status = c["status"]
    if status == "not run":
        return f"not run (needs {c.get('needs')})"
    if "by_attack" in c:  # the hard-label validation
        return "; ".join(f"{status}: {t} {v['hard_label']:.3f} vs PGD {v['pgd_gray']:.3f} "
                         f"[{v['pgd_ci95'][0]:.3f}, {v['pgd_ci95'][1]:.3f}] on {v['images']} images "
                         f"(gap {v['gap']:+.3f})" for t, v in c["by_attack"].items())
    text = f"**{status}** ({c['violations']} of {c['compared']} comparisons outside noise)"
    if c.get("draws"):
        text += f", {c['draws']} draws per image"
    if c.get("per_defense") and "limit" in c:
        worst = max(c["per_defense"].items(), key=lambda kv: kv[1]["accuracy"])
        text += f"; highest {worst[1]['accuracy']:.3f} ({worst[0]}, by {worst[1]['by']}) vs limit {c['limit']:.3f}"
    if c.get("report_instead"):
        text += "; reported instead: " + ", ".join(f"{a} → {b}" for a, b in c["report_instead"].items())
    for v in c["listed"][:3]:
        text += "; " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "all")
    return text
