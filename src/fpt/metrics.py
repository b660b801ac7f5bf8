"""Classification metrics from true labels and predicted class probabilities, in numpy.

The values match scikit-learn's (``roc_auc_score``, ``cohen_kappa_score(weights="quadratic")``, macro
``precision/recall/f1_score(zero_division=0)``, ...) without the seconds it takes to import it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fpt.errors import FPTError


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Metrics of probabilities [N, K] (softmax outputs, not logits) against labels [N] in 0..K-1.

    AUC is on the positive-class probability for K = 2 and the macro one-vs-rest average for K > 2 (over the
    classes present in the labels); it is None when the labels hold a single class. Kappa is quadratic-weighted
    (classes taken as ordered). Macro averages count a class with no predictions as 0 rather than failing.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if not np.isfinite(probabilities).all():
        raise FPTError("the model's probabilities are not finite (NaN or inf): training diverged; try a lower --lr")
    num_classes = probabilities.shape[1]
    predictions = probabilities.argmax(axis=1)
    confusion = np.bincount(num_classes * labels + predictions, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    true_positives = np.diag(confusion)
    true_totals, predicted_totals = confusion.sum(axis=1), confusion.sum(axis=0)
    present = true_totals > 0
    return {
        "auc": _auc(labels, probabilities),
        "accuracy": float(np.mean(labels == predictions)),
        "balanced_accuracy": float(np.mean(true_positives[present] / true_totals[present])),
        "f1": _macro(2 * true_positives, true_totals + predicted_totals),
        "precision": _macro(true_positives, predicted_totals),
        "recall": _macro(true_positives, true_totals),
        "kappa": _kappa(confusion),
        "confusion_matrix": confusion.tolist(),
        "num_samples": len(labels),
    }


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates from (0, 0), one point per distinct score, highest first.

    ``labels`` are booleans (True = positive) holding both classes.
    """
    order = np.argsort(scores, kind="stable")[::-1]
    scores, labels = np.asarray(scores)[order], np.asarray(labels, dtype=bool)[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last sample of each distinct score
    true_positives = np.r_[0, np.cumsum(labels)[last]]
    false_positives = np.r_[0, last + 1] - true_positives
    return false_positives / false_positives[-1], true_positives / true_positives[-1]


def _macro(numerator: np.ndarray, denominator: np.ndarray) -> float:
    """Mean over classes of numerator / denominator, a zero denominator counting as 0."""
    return float(np.mean(np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)))


def _auc(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probabilities.shape[1] == 2:
        return _binary_auc(labels == 1, probabilities[:, 1])
    return float(np.mean([_binary_auc(labels == c, probabilities[:, c]) for c in present]))


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """The Mann-Whitney statistic: the share of (positive, negative) pairs ranked right, ties counting 1/2."""
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_ranks = np.cumsum(counts) - (counts - 1) / 2  # 1-based ranks, ties sharing their mean
    num_positive = positive.sum()
    num_negative = len(positive) - num_positive
    rank_sum = average_ranks[group][positive].sum()
    return float((rank_sum - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))


def _kappa(confusion: np.ndarray) -> float:
    """Quadratic-weighted kappa; weights count steps between the classes that occur, as scikit-learn does."""
    occurring = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    if occurring.sum() < 2:  # labels and predictions are one and the same class
        return 1.0
    confusion = confusion[np.ix_(occurring, occurring)].astype(np.float64)
    steps = np.arange(len(confusion))
    weights = (steps[:, None] - steps[None, :]) ** 2
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / confusion.sum()
    return float(1 - (weights * confusion).sum() / (weights * expected).sum())
