"""glue_data.py's metrics against scipy and the leaderboard's rules."""

import warnings

import numpy as np
import pytest
import scipy.stats

import glue_data
from conftest import GLUE

# -- glue_data.py: metrics ---------------------------------------------------------------------

def independent_binary_metrics(predictions: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    tp = np.sum((predictions == 1) & (labels == 1))
    tn = np.sum((predictions == 0) & (labels == 0))
    fp = np.sum((predictions == 1) & (labels == 0))
    fn = np.sum((predictions == 0) & (labels == 1))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return float(f1), float(mcc)


def test_metrics_agree_with_independent_computations():
    """F1 and MCC agree with confusion-count formulas, Pearson/Spearman (ties too) with scipy, to 1e-9."""
    rng = np.random.default_rng(0)
    for _ in range(25):
        n = int(rng.integers(20, 400))
        labels = rng.integers(0, 2, n)
        predictions = np.where(rng.random(n) < 0.7, labels, rng.integers(0, 2, n))
        f1, mcc = independent_binary_metrics(predictions, labels)
        assert glue_data.f1(predictions, labels) == pytest.approx(f1, abs=1e-9)
        assert glue_data.matthews_corrcoef(predictions, labels) == pytest.approx(mcc, abs=1e-9)
        assert glue_data.accuracy(predictions, labels) == pytest.approx(np.mean(predictions == labels),
                                                                        abs=1e-12)
        x = rng.normal(size=n)
        y = x + rng.normal(size=n)
        tied_x, tied_y = np.round(x), np.round(y * 2) / 2  # many ties
        assert glue_data.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-9)
        for a, b in ((x, y), (tied_x, tied_y), (tied_x, y)):
            assert glue_data.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-9)


def test_multiclass_mcc_equals_the_one_hot_correlation():
    """3-class MCC equals the correlation of the one-hot label and prediction matrices (its definition)."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 500)
    predictions = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 3, 500))
    x, y = np.eye(3)[predictions], np.eye(3)[labels]
    x, y = x - x.mean(0), y - y.mean(0)
    expected = np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y))
    assert glue_data.matthews_corrcoef(predictions, labels) == pytest.approx(expected, abs=1e-9)


def test_degenerate_predictions_score_zero_without_warnings():
    """Constant predictions give MCC 0 and correlations 0, with no NaN and no warning."""
    labels = np.array([0, 1, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert glue_data.matthews_corrcoef(np.zeros(5, np.int64), labels) == 0.0
        assert glue_data.matthews_corrcoef(np.ones(5, np.int64), np.ones(5, np.int64)) == 0.0
        assert glue_data.f1(np.zeros(5, np.int64), labels) == 0.0
        assert glue_data.pearson(np.full(5, 2.5), labels.astype(float)) == 0.0
        assert glue_data.spearman(np.full(5, 2.5), labels.astype(float)) == 0.0
        scores = glue_data.compute_metrics(GLUE["STS-B"], np.full(5, 3.0), np.arange(5.0))
    assert scores == {"spearman": 0.0, "pearson": 0.0}


def test_task_scores_and_glue_average_follow_the_leaderboard():
    """A task's score is the mean of its metrics; MNLI matched/mismatched count as one task in the average."""
    metrics = glue_data.compute_metrics(GLUE["MRPC"], np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    assert list(metrics) == ["f1", "accuracy"] and metrics["accuracy"] == 0.75
    assert glue_data.task_score(GLUE["MRPC"], metrics) == pytest.approx((2 / 3 + 0.75) / 2)
    mnli = {"accuracy_matched": 0.8, "accuracy_mismatched": 0.9}  # per-split metrics, as train.py keeps them
    assert glue_data.task_score(GLUE["MNLI"], mnli) == pytest.approx(0.85)
    scores = {"MNLI/dev_matched": 0.8, "MNLI/dev_mismatched": 0.9, "CoLA": 0.5, "RTE": 0.7}
    assert glue_data.glue_average(scores) == pytest.approx((0.85 + 0.5 + 0.7) / 3)
    with pytest.raises(ValueError, match="class indices"):
        glue_data.compute_metrics(GLUE["CoLA"], np.array([0.2, 0.9]), np.array([0, 1]))
