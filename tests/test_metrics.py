"""`classification_metrics` and `roc_curve`: against values worked out by hand from first principles, then against
scikit-learn (which the library no longer imports) on random data with ties, absent classes and edge cases."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn import metrics as sk

from fpt.config import METRIC_NAMES
from fpt.errors import FPTError
from fpt.metrics import classification_metrics, roc_curve


def one_hot_probabilities(predictions: list[int], num_classes: int) -> np.ndarray:
    """Rows of 0.2 with 0.2 + (1 - 0.2 * K) on the predicted class: the argmax is ``predictions``."""
    probabilities = np.full((len(predictions), num_classes), 0.2)
    probabilities[np.arange(len(predictions)), predictions] += 1 - 0.2 * num_classes
    return probabilities


def test_binary_metrics_by_hand() -> None:
    labels = [0, 0, 1, 1, 0, 1]
    positive = [0.1, 0.35, 0.35, 0.8, 0.7, 0.9]  # predictions (> 0.5): 0, 0, 0, 1, 1, 1
    probabilities = np.array([[1 - p, p] for p in positive])
    metrics = classification_metrics(np.array(labels), probabilities)
    # AUC: positives score 0.35, 0.8, 0.9; negatives 0.1, 0.35, 0.7 -> 9 (positive, negative) pairs
    #   0.35: beats 0.1, ties 0.35 (counts 1/2), loses to 0.7 -> 1.5
    #   0.8 and 0.9 beat all three                             -> 3 + 3
    assert metrics["auc"] == pytest.approx(7.5 / 9)
    # confusion matrix, rows = true class, columns = predicted class
    assert metrics["confusion_matrix"] == [[2, 1], [1, 2]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    # K = 2: weights 0 on the diagonal, 1 off it; observed off-diagonal share 2/6, expected 0.5 * 0.5 * 2
    assert metrics["kappa"] == pytest.approx(1 - (2 / 6) / 0.5)
    assert metrics["num_samples"] == 6


def test_binary_auc_uses_the_positive_class_probability() -> None:
    labels = np.array([0, 1, 1, 0])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    # positives 0.8, 0.6 vs negatives 0.1, 0.7: 0.8 beats both, 0.6 beats only 0.1 -> 3 of 4 pairs
    assert classification_metrics(labels, probabilities)["auc"] == pytest.approx(3 / 4)


def test_three_class_metrics_by_hand() -> None:
    labels = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    predictions = [0, 0, 1, 2, 1, 1, 0, 2, 2, 2]
    metrics = classification_metrics(np.array(labels), one_hot_probabilities(predictions, 3))
    observed = [[2, 1, 1], [1, 2, 0], [0, 0, 3]]  # rows: true class, columns: predicted class
    assert metrics["confusion_matrix"] == observed
    assert metrics["accuracy"] == pytest.approx(7 / 10)
    # recall per class: 2/4, 2/3, 3/3; precision per class (column sums 3, 3, 4): 2/3, 2/3, 3/4
    recall = [2 / 4, 2 / 3, 3 / 3]
    precision = [2 / 3, 2 / 3, 3 / 4]
    assert metrics["recall"] == pytest.approx(sum(recall) / 3)  # 13/18
    assert metrics["balanced_accuracy"] == pytest.approx(13 / 18)
    assert metrics["precision"] == pytest.approx(25 / 36)
    assert sum(precision) / 3 == pytest.approx(25 / 36)
    # F1 per class = 2pr / (p + r): 4/7, 2/3, 6/7
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    assert f1 == pytest.approx([4 / 7, 2 / 3, 6 / 7])
    assert metrics["f1"] == pytest.approx(44 / 63)
    assert metrics["num_samples"] == 10


def test_three_class_quadratic_kappa_by_hand() -> None:
    labels = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    predictions = [0, 0, 1, 2, 1, 1, 0, 2, 2, 2]
    metrics = classification_metrics(np.array(labels), one_hot_probabilities(predictions, 3))
    # weights w_ij = (i - j)^2 / (K - 1)^2 with K = 3
    weights = np.array([[0, 0.25, 1], [0.25, 0, 0.25], [1, 0.25, 0]])
    observed = np.array([[2, 1, 1], [1, 2, 0], [0, 0, 3]])
    # expected counts: row total (true 4, 3, 3) x column total (predicted 3, 3, 4) / N (10)
    expected = np.array([[1.2, 1.2, 1.6], [0.9, 0.9, 1.2], [0.9, 0.9, 1.2]])
    assert (weights * observed).sum() == pytest.approx(1.5)  # 0.25 + 1 + 0.25
    assert (weights * expected).sum() == pytest.approx(3.55)  # 0.3 + 1.6 + 0.225 + 0.3 + 0.9 + 0.225
    assert metrics["kappa"] == pytest.approx(1 - 1.5 / 3.55)  # = 41/71
    assert metrics["kappa"] == pytest.approx(41 / 71)


def test_kappa_weights_distant_mistakes_more() -> None:
    # same accuracy (4 of 6), but mistakes one grade off versus two grades off
    labels = np.array([0, 0, 1, 1, 2, 2])
    near = classification_metrics(labels, one_hot_probabilities([0, 1, 1, 1, 2, 1], 3))
    far = classification_metrics(labels, one_hot_probabilities([0, 2, 1, 1, 2, 0], 3))
    assert near["accuracy"] == far["accuracy"] == pytest.approx(4 / 6)
    assert near["kappa"] > far["kappa"]
    # near: observed weighted disagreement 0.25 + 0.25 = 0.5; row totals r = 2, 2, 2, column totals c = 1, 4, 1
    #   expected: sum_ij w_ij r_i c_j / 6 = (2 / 6) * sum_j c_j * (column sum of w: 1.25, 0.5, 1.25)
    #           = (2 / 6) * (1.25 + 2 + 1.25) = 1.5
    assert near["kappa"] == pytest.approx(1 - 0.5 / 1.5)
    # far: observed 1 + 1 = 2; column totals 2, 2, 2, so expected = (2 / 6) * 2 * (1.25 + 0.5 + 1.25) = 2
    assert far["kappa"] == pytest.approx(1 - 2 / 2)


def test_multiclass_auc_is_the_macro_one_vs_rest_average() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.3, 0.4, 0.3],
            [0.2, 0.6, 0.2],
            [0.5, 0.3, 0.2],
            [0.1, 0.3, 0.6],
            [0.4, 0.1, 0.5],
        ]
    )
    # each class: 2 positives x 4 negatives = 8 pairs
    # class 0: positives 0.7, 0.3 vs 0.2, 0.5, 0.1, 0.4 -> 4 + 2           = 6   -> 0.75
    # class 1: positives 0.6, 0.3 vs 0.2, 0.4, 0.3, 0.1 -> 4 + 2 + 1/2 tie = 6.5 -> 0.8125
    # class 2: positives 0.6, 0.5 vs 0.1, 0.3, 0.2, 0.2 -> 4 + 4           = 8   -> 1
    assert classification_metrics(labels, probabilities)["auc"] == pytest.approx((0.75 + 0.8125 + 1) / 3)


def test_multiclass_auc_with_a_class_absent_from_the_labels_averages_the_present_classes() -> None:
    labels = np.array([0, 0, 2, 2])
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.1, 0.6], [0.1, 0.2, 0.7]])
    # class 0: positives 0.6, 0.2 vs 0.3, 0.1 -> 2 + 1 = 3 of 4; class 2: 0.6, 0.7 vs 0.1, 0.3 -> 4 of 4
    assert classification_metrics(labels, probabilities)["auc"] == pytest.approx((3 / 4 + 1) / 2)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_auc_is_none_when_the_labels_hold_one_class(num_classes: int) -> None:
    labels = np.array([1, 1, 1])
    probabilities = one_hot_probabilities([1, 0, 1], num_classes)
    metrics = classification_metrics(labels, probabilities)
    assert metrics["auc"] is None
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["num_samples"] == 3


def test_class_never_predicted_has_zero_precision_without_failing() -> None:
    labels = [0, 0, 1, 2, 2]
    predictions = [0, 0, 0, 2, 2]  # class 1 is never predicted
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ill-defined precision" warning either
        metrics = classification_metrics(np.array(labels), one_hot_probabilities(predictions, 3))
    assert metrics["confusion_matrix"] == [[2, 0, 0], [1, 0, 0], [0, 0, 2]]
    # precision 2/3, 0 (no predictions), 2/2; recall 2/2, 0/1, 2/2; F1 4/5, 0, 1
    assert metrics["precision"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert metrics["recall"] == pytest.approx((1 + 0 + 1) / 3)
    assert metrics["f1"] == pytest.approx((4 / 5 + 0 + 1) / 3)
    assert metrics["accuracy"] == pytest.approx(4 / 5)
    # quadratic kappa: observed weighted disagreement 0.25 (one 1 -> 0); expected, with row totals 2, 1, 2 and
    # column totals 3, 0, 2: (1*2*2 + 0.25*1*3 + 0.25*1*2 + 1*2*3) / 5 = 2.25
    assert metrics["kappa"] == pytest.approx(1 - 0.25 / 2.25)


def test_perfect_predictions() -> None:
    labels = np.array([0, 1, 2, 2, 1])
    metrics = classification_metrics(labels, one_hot_probabilities(labels.tolist(), 3))
    for name in METRIC_NAMES:
        assert metrics[name] == pytest.approx(1.0), name
    assert metrics["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [0, 0, 2]]


def test_kappa_of_a_single_class_agreeing_everywhere_is_one_not_nan() -> None:
    metrics = classification_metrics(np.array([0, 0, 0]), one_hot_probabilities([0, 0, 0], 2))
    assert metrics["kappa"] == 1.0


def test_metrics_are_plain_json_serialisable_values() -> None:
    metrics = classification_metrics(np.array([0, 1, 1, 0]), one_hot_probabilities([0, 1, 0, 0], 2))
    assert set(METRIC_NAMES) <= set(metrics)
    assert set(metrics) == {*METRIC_NAMES, "confusion_matrix", "num_samples"}
    assert json.loads(json.dumps(metrics)) == metrics
    assert isinstance(metrics["num_samples"], int)
    assert all(isinstance(metrics[name], float) for name in METRIC_NAMES)


def sklearn_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """What `classification_metrics` documents, computed with scikit-learn."""
    num_classes = probabilities.shape[1]
    predictions = probabilities.argmax(axis=1)
    present = np.unique(labels)
    macro = {"labels": list(range(num_classes)), "average": "macro", "zero_division": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(present) < 2:
            auc = None
        elif num_classes == 2:
            auc = sk.roc_auc_score(labels, probabilities[:, 1])
        elif len(present) == num_classes:
            auc = sk.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
        else:
            auc = np.mean([sk.roc_auc_score(labels == c, probabilities[:, c]) for c in present])
        single = len(np.unique(np.concatenate([labels, predictions]))) < 2
        return {
            "auc": auc,
            "accuracy": sk.accuracy_score(labels, predictions),
            "balanced_accuracy": sk.balanced_accuracy_score(labels, predictions),
            "f1": sk.f1_score(labels, predictions, **macro),
            "precision": sk.precision_score(labels, predictions, **macro),
            "recall": sk.recall_score(labels, predictions, **macro),
            "kappa": 1.0 if single else sk.cohen_kappa_score(labels, predictions, weights="quadratic"),
            "confusion_matrix": sk.confusion_matrix(labels, predictions, labels=macro["labels"]).tolist(),
            "num_samples": len(labels),
        }


def tied_probabilities(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of tenths summing to 1, leaning to the label: few distinct values, so many ties."""
    lean = np.full((len(labels), num_classes), 1.0)
    lean[np.arange(len(labels)), labels] += 1.5
    counts = np.array([rng.multinomial(10, row / row.sum()) for row in lean])
    return counts / 10


def random_case(num_classes: int, occurring: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(occurring, size=200)
    return labels, tied_probabilities(labels, num_classes, rng)


def never_predicting(absent: int, occurring: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes, labels drawn from ``occurring``, and a probability of 0 for class ``absent`` everywhere."""
    labels, probabilities = random_case(4, occurring, seed)
    probabilities[:, absent] = 0
    return labels, probabilities / probabilities.sum(axis=1, keepdims=True)


def rounded_binary_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive-class probabilities rounded to one decimal (not from tenths summing to 1 per row)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=150)
    positive = np.round(0.3 * labels + 0.7 * rng.random(150), 1)
    return labels, np.stack([1 - positive, positive], axis=1)


def binary_case(labels: list[int], positive: list[float]) -> tuple[np.ndarray, np.ndarray]:
    positive_array = np.array(positive)
    return np.array(labels), np.stack([1 - positive_array, positive_array], axis=1)


def one_hot_case(labels: list[int], predictions: list[int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.array(labels), one_hot_probabilities(predictions, num_classes)


CASES = {
    **{f"binary-ties-{seed}": random_case(2, [0, 1], seed) for seed in range(3)},
    **{f"four-class-ties-{seed}": random_case(4, [0, 1, 2, 3], seed) for seed in range(3)},
    "binary-scores-rounded": rounded_binary_scores(7),
    "four-class-labels-without-1": random_case(4, [0, 2, 3], 11),
    "four-class-labels-only-1-and-3": random_case(4, [1, 3], 12),
    "three-class-labels-without-0": random_case(3, [1, 2], 13),
    "never-predicts-class-3": never_predicting(3, [0, 1, 2, 3], 14),
    # kappa's weights then count steps over the classes 0, 2, 3 only, as scikit-learn's do
    "class-1-neither-a-label-nor-predicted": never_predicting(1, [0, 2, 3], 16),
    "single-class-labels": random_case(4, [2], 15),
    "single-class-everywhere": one_hot_case([1, 1, 1, 1], [1, 1, 1, 1], 3),
    "binary-single-class": binary_case([0, 0, 0], [0.2, 0.6, 0.2]),
    "binary-perfect": binary_case([0, 1, 1, 0, 1], [0.1, 0.9, 0.8, 0.3, 0.6]),
    "binary-inverted": binary_case([0, 1, 1, 0, 1], [0.9, 0.1, 0.2, 0.7, 0.4]),
    "binary-all-tied": binary_case([0, 1, 1, 0, 1], [0.5] * 5),
    "four-class-perfect": one_hot_case([0, 1, 2, 3, 3, 1, 0, 2], [0, 1, 2, 3, 3, 1, 0, 2], 4),
    "four-class-inverted": one_hot_case([0, 1, 2, 3, 3, 1, 0, 2], [3, 2, 1, 0, 0, 2, 3, 1], 4),
}


@pytest.mark.parametrize("name", CASES)
def test_metrics_match_scikit_learn(name: str) -> None:
    labels, probabilities = CASES[name]
    ours, theirs = classification_metrics(labels, probabilities), sklearn_metrics(labels, probabilities)
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        if key in ("confusion_matrix", "num_samples") or expected is None:
            assert ours[key] == expected, key
        else:
            assert ours[key] == pytest.approx(expected, rel=0, abs=1e-12), key


def test_the_random_cases_have_many_ties_and_the_absent_classes_they_claim() -> None:
    labels, probabilities = CASES["four-class-ties-0"]
    assert len(np.unique(probabilities)) <= 11
    assert set(CASES["four-class-labels-without-1"][0]) == {0, 2, 3}
    labels, probabilities = CASES["never-predicts-class-3"]
    assert 3 in labels
    assert 3 not in probabilities.argmax(axis=1)
    labels, probabilities = CASES["class-1-neither-a-label-nor-predicted"]
    assert 1 not in {*labels, *probabilities.argmax(axis=1)}


@pytest.mark.parametrize(
    ("labels", "scores"),
    [
        (CASES["binary-ties-0"][0] == 1, CASES["binary-ties-0"][1][:, 1]),
        (CASES["four-class-ties-1"][0] == 2, CASES["four-class-ties-1"][1][:, 2]),
        (np.array([True, False, True, False]), np.array([0.5, 0.5, 0.5, 0.5])),
        (np.array([False, False, True, True]), np.array([0.1, 0.4, 0.35, 0.8])),
        (np.array([True, True, False]), np.array([0.9, 0.8, 0.1])),
    ],
)
def test_roc_curve_has_scikit_learns_points_one_per_distinct_score(labels: np.ndarray, scores: np.ndarray) -> None:
    false_positive, true_positive = roc_curve(labels, scores)
    expected_false, expected_true, thresholds = sk.roc_curve(labels, scores, drop_intermediate=False)
    assert len(false_positive) == len(np.unique(scores)) + 1 == len(thresholds)
    np.testing.assert_array_equal(false_positive, expected_false)
    np.testing.assert_array_equal(true_positive, expected_true)


def test_metrics_and_report_do_not_import_scikit_learn() -> None:
    code = "import fpt.metrics, fpt.report, sys; assert 'sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_probabilities_that_are_not_finite_are_refused_in_one_line() -> None:
    probabilities = np.array([[0.5, 0.5], [np.nan, np.nan]])
    with pytest.raises(FPTError, match=r"not finite .* try a lower --lr"):
        classification_metrics(np.array([0, 1]), probabilities)
