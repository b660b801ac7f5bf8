"""The run report: report.html with PNG plots (curves, confusion matrices, ROC curves)."""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fpt.evaluate import RunResults
from fpt.metrics import roc_curve
from fpt.render import TABLE_METRICS, html_page, save_figure
from fpt.run import CHECKPOINTS, REPORT_FILE, predictions_file, read_metrics

DPI = 110


def write_report(run_dir: str | Path, extra_figures: list[tuple[str, str]] | None = None) -> Path:
    """Write ``report.html`` and its PNGs into ``run_dir``; ``extra_figures`` are (title, png name) pairs."""
    run_dir = Path(run_dir)
    history = read_metrics(run_dir)
    results = RunResults.load(run_dir).to_dict()
    classes = results["classes"]
    figures = [("Training curves", _plot_curves(history, run_dir / "curves.png"))]
    for name in CHECKPOINTS:
        matrix = np.array(results[name]["confusion_matrix"])
        confusion = _plot_confusion(matrix, classes, run_dir / f"confusion_{name}.png")
        figures.append((f"Confusion matrix, {name} checkpoint (test)", confusion))
        predictions = predictions_file(run_dir, name)
        if predictions.is_file():
            roc = _plot_roc(predictions, classes, run_dir / f"roc_{name}.png")
            figures.append((f"ROC curves, {name} checkpoint (test)", roc))
    figures += extra_figures or []
    rows = "".join(
        f"<tr><th>{name}</th>" + "".join(f"<td>{_format(results[name].get(m))}</td>" for m in TABLE_METRICS) + "</tr>"
        for name in CHECKPOINTS
    )
    images = "".join(
        f"<h2>{html.escape(title)}</h2><img src='{png}' alt='{html.escape(title)}'>" for title, png in figures
    )
    title = f"fpt run {run_dir.name}"
    page = html_page(
        title,
        f"""<h1>{html.escape(title)}</h1>
<p>Classes: {html.escape(", ".join(classes))}. Best epoch (validation): {results.get("best_epoch")}.</p>
<h2>Test metrics</h2><table><tr><th>checkpoint</th>{"".join(f"<th>{m}</th>" for m in TABLE_METRICS)}</tr>{rows}</table>
{images}""",
        extra_style="img{max-width:100%}",
    )
    path = run_dir / REPORT_FILE
    path.write_text(page)
    return path


def _format(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _plot_curves(history: list[dict[str, Any]], path: Path) -> str:
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(11, 4))
    loss_axis, metric_axis = figure.subplots(1, 2)
    loss_axis.plot(epochs, [row["train_loss"] for row in history], label="train (training criterion)")
    loss_axis.plot(epochs, [row["val_loss"] for row in history], label="validation (plain cross-entropy)")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    loss_axis.legend()
    for name in ("auc", "accuracy", "kappa"):
        values = [row.get(f"val_{name}") for row in history]
        metric_axis.plot(epochs, [np.nan if v is None else v for v in values], label=name)
    metric_axis.set(xlabel="epoch", title="Validation metrics")
    metric_axis.legend()
    return save_figure(figure, path, DPI).name


def _plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> str:
    figure = Figure(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    axis = figure.subplots()
    axis.imshow(matrix, cmap="Blues")
    axis.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true")
    axis.set_xticklabels(classes, rotation=45, ha="right")
    axis.set_yticklabels(classes)
    for (row, column), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        axis.text(column, row, str(count), ha="center", va="center", color=color)
    return save_figure(figure, path, DPI).name


def _plot_roc(predictions: Path, classes: list[str], path: Path) -> str:
    with predictions.open() as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(row["label"]) for row in rows])
    probabilities = np.array([[float(row[f"p_{c}"]) for c in classes] for row in rows])
    figure = Figure(figsize=(5.5, 5))
    axis = figure.subplots()
    shown = [1] if len(classes) == 2 else range(len(classes))
    for index in shown:
        if 0 < (labels == index).sum() < len(labels):
            false_positive, true_positive = roc_curve(labels == index, probabilities[:, index])
            axis.plot(false_positive, true_positive, label=classes[index])
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title="One-vs-rest ROC")
    axis.legend()
    return save_figure(figure, path, DPI).name
