"""Classification metrics from true labels and predicted class probabilities."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Metrics of probabilities [N, K] (softmax outputs, not logits) against labels [N] in 0..K-1.

    AUC is on the positive-class probability for K = 2 and the macro one-vs-rest average for K > 2; it is
    None when the labels hold a single class. Kappa is quadratic-weighted (classes taken as ordered).
    Macro averages count a class with no predictions as 0 rather than failing.
    """
    with warnings.catch_warnings():  # scikit-learn warns about absent classes, which the docstring covers
        warnings.simplefilter("ignore", UserWarning)
        return _metrics(np.asarray(labels), np.asarray(probabilities, dtype=np.float64))


def _metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    num_classes = probabilities.shape[1]
    classes = list(range(num_classes))
    predictions = probabilities.argmax(axis=1)
    macro = {"labels": classes, "average": "macro", "zero_division": 0}
    return {
        "auc": _auc(labels, probabilities),
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, **macro)),
        "precision": float(precision_score(labels, predictions, **macro)),
        "recall": float(recall_score(labels, predictions, **macro)),
        "kappa": _kappa(labels, predictions),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
        "num_samples": len(labels),
    }


def _auc(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    if len(np.unique(labels)) < 2:
        return None
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    # renormalise against float rounding: sklearn requires rows that sum to 1
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    present = np.unique(labels)
    if len(present) < probabilities.shape[1]:  # one-vs-rest over the classes that occur
        return float(np.mean([roc_auc_score(labels == c, probabilities[:, c]) for c in present]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


def _kappa(labels: np.ndarray, predictions: np.ndarray) -> float:
    if len(np.unique(np.concatenate([labels, predictions]))) < 2:
        return 1.0 if np.array_equal(labels, predictions) else 0.0
    return float(cohen_kappa_score(labels, predictions, weights="quadratic"))
