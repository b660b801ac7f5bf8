"""Ablations on the panel (issue 10): methods and training variants, each on every task with several seeds.

Every run is ``fpt train DATA --backbone demo --input-size <task's>`` plus the variant's options; each task
and method has its own feature cache under OUT/cache, and finished runs are reused, so an interrupted
ablation continues where it stopped. Settings are chosen on validation; ``--test`` adds the test AUC of each
run's best-validation checkpoint, for the final report only.

    python benchmarks/panel.py PANEL                      # the tasks, once (and `fpt synth PANEL/demo` for the demo's)
    python benchmarks/ablate.py PANEL OUT --methods fpt+ --seeds 0,1,2 \\
        --variant paper= --variant "lr1e-3=--lr 1e-3"     # NAME=OPTIONS; an empty OPTIONS is the defaults
    python benchmarks/ablate.py PANEL OUT ... --test       # the same runs, with their test AUC

Writes OUT/ablation.json (every run's numbers) and OUT/ablation.md (per task, method and variant: mean ± sd
over seeds of the best validation AUC, the training loss at epoch 3 against the class prior's entropy, and
the number of runs whose loss is below the prior by then).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from panel import PANEL, PanelTask

from fpt.config import DEMO_SPLITS, SynthTask

# the demo's data (`fpt synth PANEL/demo`) as one more task, never part of "all"
DEMO_TASK = PanelTask("demo", SynthTask(), dict(DEMO_SPLITS), 512, "folders", 0)


@dataclass
class RunOutcome:
    task: str
    method: str
    variant: str
    seed: int
    prior_entropy: float
    train_loss_epoch3: float | None
    best_val_auc: float | None
    test_auc: float | None
    epochs: int
    seconds: float


def prior_entropy(run_dir: Path) -> float:
    """Entropy (nats) of the training split's class frequencies: the loss of a model that predicts the prior."""
    splits = json.loads((run_dir / "splits.json").read_text())
    counts = Counter(label for _, label in splits["splits"]["train"])
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values())


def run_once(panel: Path, out: Path, task: PanelTask, method: str, variant: str, options: str, seed: int) -> Path:
    """Train one run (unless it finished before) and return its directory."""
    run_dir = out / "runs" / task.name / method / variant / f"seed{seed}"
    if (run_dir / "results.json").is_file():
        return run_dir
    if (run_dir / "run.json").is_file():  # interrupted: continue it with its recorded settings
        command = [sys.executable, "-m", "fpt", "train", "--resume", str(run_dir)]
    else:
        command = [sys.executable, "-m", "fpt", "train", str(task.data(panel)), "--backbone", "demo"]
        command += ["--input-size", str(task.size), "--method", method, "--seed", str(seed)]
        command += ["--cache", str(out / "cache" / task.name / method), *shlex.split(options), "--run", str(run_dir)]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (run_dir.parent / f"seed{seed}.log").open("w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return run_dir


def preload_shared(panel: Path, out: Path, task: PanelTask, methods: list[str]) -> None:
    """Fill the caches of ``methods`` on ``task`` from one LPM pass, exactly as each method's `fpt train` (the
    command line's own defaults, parsed by its own parser) would fill its own."""
    from fpt.cli import build_parser, config_from_args, training_config_from_args
    from fpt.models.build import build_model
    from fpt.preload import preload_together
    from fpt.task import prepare

    setups = []
    for method in methods:
        command = ["train", str(task.data(panel)), "--backbone", "demo", "--input-size", str(task.size)]
        command += ["--method", method, "--cache", str(out / "cache" / task.name / method)]
        args = build_parser().parse_args(command)
        setups.append((config_from_args(args), training_config_from_args(args)))
    (config, training), *others = setups
    dataset, model, normalization = prepare(task.data(panel), config, training)
    targets = [(model, training), *((build_model(c, load_lpm=False), t) for c, t in others)]
    for summary in preload_together(targets, dataset, normalization):
        print(f"{summary.cache_dir}: {summary.computed} computed, {summary.reused} cached", flush=True)


def outcome(run_dir: Path, task: str, method: str, variant: str, seed: int, with_test: bool) -> RunOutcome:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scores = [record["val_auc"] for record in records if record["val_auc"] is not None]
    results = json.loads((run_dir / "results.json").read_text())
    return RunOutcome(
        task=task,
        method=method,
        variant=variant,
        seed=seed,
        prior_entropy=prior_entropy(run_dir),
        train_loss_epoch3=records[2]["train_loss"] if len(records) >= 3 else None,
        best_val_auc=max(scores) if scores else None,
        test_auc=results["best"]["auc"] if with_test else None,
        epochs=len(records),
        seconds=sum(record["seconds"] for record in records),
    )


def _mean_sd(values: list[float | None]) -> str:
    present = [value for value in values if value is not None]
    if not present:
        return "n/a"
    if len(present) == 1:
        return f"{present[0]:.3f}"
    return f"{statistics.mean(present):.3f} ± {statistics.stdev(present):.3f}"


def best_of_variants(outcomes: list[RunOutcome]) -> list[RunOutcome]:
    """Per task, method and seed, the run of the variant with the best validation AUC (as variant "best on val"):
    a learning-rate search on validation, as `fpt bench accuracy --lr-grid` does."""
    best: dict[tuple[str, str, int], RunOutcome] = {}
    for item in outcomes:
        key = (item.task, item.method, item.seed)
        if key not in best or (item.best_val_auc or -1.0) > (best[key].best_val_auc or -1.0):
            best[key] = item
    return [RunOutcome(**{**asdict(item), "variant": f"best on val ({item.variant})"}) for item in best.values()]


def table(outcomes: list[RunOutcome], with_test: bool) -> str:
    header = "| task | method | variant | seeds | best val AUC | train loss, epoch 3 (prior) | below prior by epoch 3 |"
    header += " test AUC |" if with_test else ""
    lines = [header, "| " + " | ".join(["---"] * (header.count("|") - 1)) + " |"]
    groups: dict[tuple[str, str, str], list[RunOutcome]] = {}
    for item in outcomes:
        variant = "best on val" if item.variant.startswith("best on val") else item.variant
        groups.setdefault((item.task, item.method, variant), []).append(item)
    for (task, method, variant), items in groups.items():
        if variant.startswith("best on val"):
            variant = "best on val (" + ", ".join(i.variant[len("best on val (") : -1] for i in items) + ")"
        below = sum(1 for i in items if i.train_loss_epoch3 is not None and i.train_loss_epoch3 < i.prior_entropy)
        row = f"| {task} | {method} | {variant} | {len(items)} | {_mean_sd([i.best_val_auc for i in items])} | "
        row += f"{_mean_sd([i.train_loss_epoch3 for i in items])} ({items[0].prior_entropy:.3f}) | "
        row += f"{below}/{len(items)} |"
        row += f" {_mean_sd([i.test_auc for i in items])} |" if with_test else ""
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("panel", type=Path, help="the folder of `benchmarks/panel.py PANEL`")
    parser.add_argument("out", type=Path, help="folder for the runs, caches and tables")
    parser.add_argument("--methods", default="fpt+", help="comma-separated methods (default: fpt+)")
    parser.add_argument(
        "--tasks", default="all", help="comma-separated panel task names, or demo (`fpt synth PANEL/demo`) (all)"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument(
        "--variant", action="append", required=True, metavar="NAME=OPTIONS", help="a variant's `fpt train` options"
    )
    parser.add_argument("--test", action="store_true", help="also report test AUC (the final report only)")
    parser.add_argument(
        "--shared-preload",
        action="store_true",
        help="fill each task's caches of all the methods from one LPM pass before training (they must be cached)",
    )
    parser.add_argument(
        "--best-of-variants",
        action="store_true",
        help="add a row per task and method: each seed at its variant of best validation AUC (an lr search)",
    )
    args = parser.parse_args()

    tasks = [t for t in (*PANEL, DEMO_TASK) if t.name in args.tasks.split(",") or (args.tasks == "all" and t in PANEL)]
    variants = dict(item.split("=", 1) for item in args.variant)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    methods = args.methods.split(",")
    outcomes = []
    total = len(tasks) * len(methods) * len(variants) * len(seeds)
    started = time.perf_counter()
    for task in tasks:
        if args.shared_preload:
            preload_shared(args.panel, args.out, task, methods)
        for method in methods:
            for variant, options in variants.items():
                for seed in seeds:
                    run_dir = run_once(args.panel, args.out, task, method, variant, options, seed)
                    outcomes.append(outcome(run_dir, task.name, method, variant, seed, args.test))
                    done = len(outcomes)
                    eta = (time.perf_counter() - started) / done * (total - done)
                    print(
                        f"[{done}/{total}] {task.name} {method} {variant} seed {seed}: "
                        f"best val AUC {outcomes[-1].best_val_auc}, ETA {eta / 60:.0f} min",
                        flush=True,
                    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps([asdict(item) for item in outcomes], indent=1) + "\n")
    markdown = table(outcomes + (best_of_variants(outcomes) if args.best_of_variants else []), args.test)
    (args.out / "ablation.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
