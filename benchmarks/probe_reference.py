"""A reference for the cached linear probe (issue 10): scikit-learn's logistic regression on the same cached
embeddings, raw and standardised, its regularisation C chosen on validation. With ``--kv``, on FPT/FPT+'s cached
keys and values instead, pooled per layer and head (their mean and their maximum over the kept tokens): how much
of a task the kept tokens carry, whatever the fusion makes of them (a cache per token ratio compares selections).

The embeddings are read from a probe cache that `fpt train DATA --method linear` (or `fpt preload`) filled; the
splits and labels from the panel task's ``labels.csv``. This fits each model to convergence (L-BFGS), so it shows
what a linear classifier on these features can reach, against which the probe that `fpt train` trains with its
usual optimizer and schedule is checked.

    python benchmarks/probe_reference.py PANEL CACHES multigrade-small demo ...   # CACHES/<task>/linear
    python benchmarks/probe_reference.py PANEL CACHES binary-imbalanced-small --kv  # CACHES/<task>/fpt+

Prints, per task and feature scaling, validation / test AUC at each C and the test AUC at the best validation C.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from fpt.cache import FeatureCache
from fpt.quantization import dequantize

SPLITS = ("train", "val", "test")
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def pooled_keys_values(record: dict[str, torch.Tensor]) -> np.ndarray:
    """Keys and values [L, H, T, d_head] -> their mean and maximum over the T tokens, flattened [4 * L * H * d_head]."""
    pooled = [dequantize(record[name], record.get(f"{name}_scale")) for name in ("keys", "values")]
    return torch.cat([torch.cat([t.mean(dim=-2), t.amax(dim=-2)]) for t in pooled]).flatten().numpy()


def load_split_embeddings(
    labels_csv: Path, cache_dir: Path, kv: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split, the cached embeddings [N, D] (or pooled keys/values) and class indices [N] of the images
    ``labels_csv`` lists."""
    cache = FeatureCache.open(cache_dir)
    with labels_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    classes = sorted({row["label"] for row in rows})
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {split: ([], []) for split in SPLITS}
    for row in rows:
        embeddings, labels = splits[row["split"]]
        record = cache.get(row["path"])
        embeddings.append(pooled_keys_values(record) if kv else record["embedding"].float().numpy())
        labels.append(classes.index(row["label"]))
    return {split: (np.stack(x), np.array(y)) for split, (x, y) in splits.items()}


def auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("panel", type=Path, help="the panel folder (PANEL/<task>/labels.csv)")
    parser.add_argument("caches", type=Path, help="the ablation's cache folder (CACHES/<task>/linear or fpt+)")
    parser.add_argument("tasks", nargs="+")
    parser.add_argument("--kv", action="store_true", help="pooled keys/values of CACHES/<task>/fpt+ (or --method's)")
    parser.add_argument("--method", default="fpt+", help="with --kv: the cache's method, fpt+ or fpt (default: fpt+)")
    args = parser.parse_args()
    for task in args.tasks:
        cache_dir = args.caches / task / (args.method if args.kv else "linear")
        data = load_split_embeddings(args.panel / task / "labels.csv", cache_dir, kv=args.kv)
        for scaling in ("raw", "standardised"):
            scaler = StandardScaler().fit(data["train"][0]) if scaling == "standardised" else None
            x = {split: scaler.transform(data[split][0]) if scaler else data[split][0] for split in SPLITS}
            scores = []
            for c in C_GRID:
                model = LogisticRegression(C=c, max_iter=5000).fit(x["train"], data["train"][1])
                val, test = (auc(data[s][1], model.predict_proba(x[s])) for s in ("val", "test"))
                scores.append((val, test, c))
            _, best_test, best_c = max(scores)
            grid = " ".join(f"C={c:g} {val:.3f}/{test:.3f}" for val, test, c in scores)
            print(f"{task} {scaling}: {grid}; test at the best validation C ({best_c:g}): {best_test:.3f}", flush=True)


if __name__ == "__main__":
    main()
