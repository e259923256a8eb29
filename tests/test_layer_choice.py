"""The query side's default layer: chosen from the job's evaluation, with its reason."""

from __future__ import annotations

import numpy as np

from pipeline.evaluate.grid import accuracy_row
from pipeline.evaluate.layer_choice import choose_default_layer, record_default_layer


def rows_for(accuracies: dict[str, tuple[float, float]], n: int = 1000) -> list[dict]:
    """clean and worst-case@0.06 rows per layer from (clean, worst) accuracies."""
    rows = []
    for layer, (clean, worst) in accuracies.items():
        for attack, acc, budget in (("clean", clean, 0.0), ("worst-case", worst, 0.06)):
            mask = np.arange(n) < round(acc * n)
            rows.append(accuracy_row(mask, database="demo", layer=layer, weighting="cbw_d", k=50,
                                     attack=attack, budget=budget))
    rows += [dict(r, weighting="uw", accuracy=0.0) for r in rows]  # other rules: ignored
    return rows


def choose(rows, budget=0.06):
    return choose_default_layer(rows, database="demo", weighting="cbw_d", k=50, budget=budget)


def test_the_clearly_most_robust_layer_wins_over_the_last():
    # the demo's situation: the last tap is the least robust against PGD
    choice = choose(rows_for({"conv_2_2": (0.80, 0.556), "conv_3_2": (0.85, 0.30),
                              "conv_4_2": (0.91, 0.094)}))
    assert choice["layer"] == "conv_2_2"
    assert "best worst-case accuracy at budget 0.06 (0.556" in choice["reason"]
    assert choice["by_layer"]["conv_4_2"] == {"clean": 0.91, "worst_case": 0.094}


def test_within_noise_the_better_clean_accuracy_decides():
    # worst cases 0.032-0.055 on 1,000 images overlap: the better clean accuracy wins
    choice = choose(rows_for({"conv_2_2": (0.80, 0.055), "conv_3_2": (0.88, 0.045),
                              "conv_4_2": (0.91, 0.032)}))
    assert choice["layer"] == "conv_4_2"
    assert "within the 95% interval of the best for conv_2_2, conv_3_2, conv_4_2" in choice["reason"]


def test_without_attacks_clean_accuracy_decides_and_nothing_without_rows(tmp_path):
    rows = [r for r in rows_for({"a": (0.7, 0.1), "b": (0.9, 0.2)}) if r["attack"] == "clean"]
    assert choose(rows, budget=None)["layer"] == "b"
    assert "no attack was evaluated" in choose(rows, budget=None)["reason"]
    assert choose([]) is None
    assert record_default_layer(tmp_path / "eval" / "default_layer.json", [], database="demo",
                                weighting="cbw_d", k=50, budget=None) is None
    assert not (tmp_path / "eval").exists()
