"""Metric math against hand-computed examples (no TensorFlow needed)."""

import numpy as np
import pytest

from training.evaluate import confusion_matrix, expected_calibration_error, rates, roc_auc, score

# crack (1) is the positive class
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])
CRACK_P = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.3, 0.45, 0.4, 0.95, 0.05])
PROBS = np.stack([1 - CRACK_P, CRACK_P], axis=1)


def test_confusion_matrix_rows_are_true_class():
    # predictions: 0 1 0 1 1 0 0 0 1 0 -> tn 4 (idx 0,2,7,9), fp 1 (1), fn 2 (5,6), tp 3 (3,4,8)
    cm = confusion_matrix(Y_TRUE, PROBS.argmax(axis=1))
    assert cm.tolist() == [[4, 1], [2, 3]]


def test_rates_from_confusion_matrix():
    r = rates([[4, 1], [2, 3]])
    assert r["accuracy"] == pytest.approx(0.7)
    assert r["precision"] == pytest.approx(3 / 4)
    assert r["recall"] == pytest.approx(3 / 5)
    assert r["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)


def test_rates_without_positive_predictions_are_zero_not_nan():
    assert rates([[5, 0], [3, 0]]) == {"accuracy": 5 / 8, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_roc_auc_counts_ranked_pairs():
    # 22 of the 25 (positive, negative) pairs rank the positive higher
    assert roc_auc(Y_TRUE, CRACK_P) == pytest.approx(22 / 25)
    assert roc_auc([1, 1], [0.2, 0.9]) is None


def test_expected_calibration_error_by_hand():
    probs = [[0.2, 0.8], [0.2, 0.8], [0.9, 0.1], [0.6, 0.4]]
    y = [1, 0, 0, 1]
    # bins: {0.8, 0.8}: acc 0.5 vs conf 0.8; {0.9}: acc 1 vs 0.9; {0.6}: acc 0 vs 0.6
    expected = 0.5 * 0.3 + 0.25 * 0.1 + 0.25 * 0.6
    assert expected_calibration_error(probs, y) == pytest.approx(expected)
    assert expected_calibration_error([[0.0, 1.0], [1.0, 0.0]], [1, 0]) == pytest.approx(0.0)


def test_score_has_every_reported_key():
    result = score(Y_TRUE, PROBS)
    assert set(result) >= {"accuracy", "precision", "recall", "f1", "roc_auc", "ece", "confusion_matrix", "n"}
    assert result["n"] == 10 and result["confusion_matrix"] == [[4, 1], [2, 3]]
