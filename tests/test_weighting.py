import math

import numpy as np
import pytest

from pipeline.weighting import (
    diversity_weights,
    entropy_weights,
    predict,
    uniform_weights,
    vote,
)


def test_uniform_weights_average_then_argmax():
    s = np.array([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.1, 0.7, 0.2]]])
    assert np.allclose(uniform_weights(s), [[1, 1, 1]])
    labels, scores = predict(s, "uw")
    assert np.allclose(scores, [[0.3, 0.5666667, 0.1333333]])
    assert labels.tolist() == [1]


def test_entropy_weight_of_one_hot_is_log_c():
    for c in (3, 10, 1000):
        s = np.zeros((1, 1, c))
        s[0, 0, c // 2] = 1.0
        assert entropy_weights(s)[0, 0] == pytest.approx(math.log(c))


def test_entropy_weight_hand_computed():
    # |log 3 + 2 * 0.5 log 0.5| = log 3 - log 2; uniform has maximum entropy -> weight 0
    s = np.array([[[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]])
    w = entropy_weights(s)
    assert w[0, 0] == pytest.approx(math.log(3) - math.log(2))
    assert w[0, 1] == pytest.approx(0.0, abs=1e-12)


def test_diversity_weight_hand_computed_and_m_capped():
    s = np.array([[[0.6, 0.3, 0.1]]])
    # M = 20 is capped at C - 1 = 2: (0.6-0.3)^3 + (0.6-0.1)^3
    assert diversity_weights(s, m=20, p=3)[0, 0] == pytest.approx(0.3**3 + 0.5**3)
    assert diversity_weights(s, m=1, p=3)[0, 0] == pytest.approx(0.3**3)
    assert diversity_weights(s, m=2, p=1)[0, 0] == pytest.approx(0.3 + 0.5)
    # unsorted input is sorted first; a tie at the top contributes 0
    tie = np.array([[[0.2, 0.4, 0.4]]])
    assert diversity_weights(tie, m=20, p=3)[0, 0] == pytest.approx(0.0 + 0.2**3)


def test_confident_neighbour_outvotes_uncertain_ones_under_cbw_only():
    confident = [1.0, 0.0, 0.0]
    unsure = [0.1, 0.6, 0.3]
    s = np.array([[confident, unsure, unsure, unsure]])
    assert predict(s, "uw")[0].tolist() == [1]  # [1.3, 1.8, 0.9]
    # CBW-E: 1 * log 3 for class 0 vs 3 * 0.6 * (log 3 - H(unsure)) for class 1
    h = -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3))
    assert math.log(3) > 3 * 0.6 * (math.log(3) - h)
    assert predict(s, "cbw_e")[0].tolist() == [0]
    # CBW-D: 2.0 for class 0 vs 3 * 0.6 * 0.152
    assert predict(s, "cbw_d")[0].tolist() == [0]


def test_ties_go_to_lowest_class_index():
    s = np.array([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]])
    for rule in ("uw", "cbw_e", "cbw_d"):
        assert predict(s, rule)[0].tolist() == [0]


def test_missing_neighbours_are_ignored():
    s = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    found = np.array([[True, False, False]])
    labels, scores = predict(s, "uw", found)
    assert labels.tolist() == [0]
    assert np.allclose(scores, [[1.0, 0.0]])
    assert np.allclose(vote(s, np.zeros((1, 3))), [[0.0, 0.0]])  # all-zero weights: no NaN


def test_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="unknown weighting"):
        predict(np.ones((1, 1, 2)) / 2, "median")
