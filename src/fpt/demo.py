"""The built-in demo: FPT+ against its own side network alone and against a linear probe on the same frozen
LPM, on synthetic high-resolution fundus images.

The lesions that decide the grade are a few pixels across at 512 px and vanish in the 128 px side view.
FPT+ reads them through the frozen, pre-trained LPM (the small ViT shipped with the package, trained by
``recipes/pretrain_demo_lpm.py`` on a lesion-detection pretext task, never on grades); the side-only
control, the same side network on the same 128 px views without prompts, cannot. The linear probe is the
practitioners' baseline: a linear classifier on the LPM's pooled embedding of the 512 px image.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fpt.bench.memory import measure_training_step
from fpt.config import (
    DEMO_BACKBONE,
    BackboneSpec,
    DemoSettings,
    FPTPlusConfig,
    LinearProbeConfig,
    SideOnlyConfig,
    TrainingConfig,
)
from fpt.data.datasets import load_dataset
from fpt.data.synthetic import GRADE_NAMES, write_dataset
from fpt.distributed import refuse_under_torchrun
from fpt.models.base import TransferModel
from fpt.models.build import build_model, load_model
from fpt.predict import predict_images
from fpt.preload import preload_together
from fpt.render import html_page, mib
from fpt.run import REPORT_FILE, Run, read_metrics
from fpt.runtime import select_device
from fpt.task import prepare
from fpt.train import train

DEMO_METHODS = ("fpt_plus", "linear_probe", "side_only")
PROBE_LRS = (1e-3, 1e-2, 1e-1)  # the cached probe trains in seconds, so it gets its own best learning rate


def demo_backbone() -> BackboneSpec:
    """The shipped demo LPM (``fpt:demo``), a timm checkpoint directory in the package loaded like any user's."""
    return BackboneSpec(DEMO_BACKBONE)


def run_demo(output: str | Path = "demo_output", settings: DemoSettings | None = None) -> dict[str, Any]:
    """Generate the data (if absent), preload, train FPT+, the linear probe and the side-only control, compare,
    report."""
    refuse_under_torchrun("`fpt demo`")
    settings = settings or DemoSettings()
    output = Path(output)
    data = output / "data"
    stages: dict[str, float] = {}
    started = time.perf_counter()
    if not (data / "labels.csv").is_file():
        print(f"[1/6] synthesising {sum(settings.splits.values())} fundus images at 512 px into {data}")
        write_dataset(data, settings.splits, first_seed=0)
    else:
        print(f"[1/6] using the synthetic images in {data}")
    stages["data"] = time.perf_counter() - started
    print(f"      {stages['data']:.0f} s")

    overrides = {name: value for name, value in (("epochs", settings.epochs), ("lr", settings.lr)) if value is not None}
    cache_dir = str((output / "cache").resolve())
    asked = TrainingConfig(seed=settings.seed, cache_dir=cache_dir, **overrides)
    training = asked.for_method(FPTPlusConfig)  # side-only's too: the same side network and defaults
    fpt_plus = FPTPlusConfig(backbone=demo_backbone(), num_classes=len(GRADE_NAMES))
    probe = LinearProbeConfig(backbone=demo_backbone(), num_classes=len(GRADE_NAMES))
    side_only = SideOnlyConfig(backbone=demo_backbone(), num_classes=len(GRADE_NAMES))
    probe_training = replace(asked, cache_dir=str((output / "cache_linear").resolve())).for_method(LinearProbeConfig)
    started = time.perf_counter()
    print("[2/6] preloading the frozen LPM's keys/values and pooled embeddings (one pass, computed once)")
    dataset, model, normalization = prepare(data, fpt_plus, training)
    probe_model = build_model(probe, load_lpm=False)  # it records its embeddings from the FPT+ model's LPM pass
    summary, _ = preload_together([(model, training), (probe_model, probe_training)], dataset, normalization)
    stages["preload"] = time.perf_counter() - started
    print(f"      {stages['preload']:.0f} s ({summary.computed} images computed, {summary.reused} reused)")
    del model

    runs = output / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    results = {}
    plan = [
        ("fpt_plus", fpt_plus, training, [training.lr]),
        ("linear_probe", probe, probe_training, list(PROBE_LRS)),
        ("side_only", side_only, training, [training.lr]),
    ]
    for step, (name, config, method_training, lrs) in enumerate(plan, start=3):
        grid = f"lr {', '.join(f'{lr:g}' for lr in lrs)}, the best on validation" if len(lrs) > 1 else f"lr {lrs[0]:g}"
        steps = f", at least {method_training.min_steps} steps" if method_training.min_steps else ""
        print(f"[{step}/6] training {name} ({method_training.epochs} epochs{steps}, {grid})")
        started = time.perf_counter()
        candidates = []
        for lr in lrs:
            run_dir = runs / name / f"lr{lr:g}" if len(lrs) > 1 else runs / name
            outcome = train(data, run_dir, config, replace(method_training, lr=lr))
            scores = [r["val_auc"] for r in read_metrics(run_dir) if r["val_auc"] is not None]
            candidates.append((max(scores, default=-1.0), -len(candidates), run_dir, outcome, lr))
        _, _, run_dir, outcome, lr = max(candidates)  # the best validation AUC; ties go to the earlier lr
        stages[f"train_{name}"] = time.perf_counter() - started
        print(f"      {stages[f'train_{name}']:.0f} s")
        run = Run.load(run_dir)
        results[name] = {
            "auc": outcome.best["auc"],
            "accuracy": outcome.best["accuracy"],
            "kappa": outcome.best["kappa"],
            "best_epoch": outcome.best_epoch,
            "lr": lr,
            "run": str(run_dir.relative_to(output)),
            "learnable_params": load_model(run.require_checkpoint("best"), load_lpm=False).num_learnable_params(),
            "training_peak_bytes": training_step_peak_bytes(run),
            "train_seconds": stages[f"train_{name}"],
        }
    print("[6/6] writing the comparison and the report")
    examples = _explain_examples(runs / "fpt_plus", data, settings.examples, output / "examples")
    record = {
        **results,
        "stages_seconds": {**stages, "total": sum(stages.values())},
        "data": {"splits": settings.splits, "first_seed": 0, "images_cached": summary.computed + summary.reused},
        "backbone": demo_backbone().name,
        "device": str(select_device(training.device)),
    }
    (output / "demo_results.json").write_text(json.dumps(record, indent=2) + "\n")
    report = _write_demo_report(output, record, examples)
    print(comparison_table(record))
    print(f"report: {report}")
    return record


def training_step_peak_bytes(run: Run) -> int:
    """Peak memory of one training step (batch of the run's size, after warm-up) for a trained run's method."""
    model = build_model(run.model_config, load_lpm=False).train()
    batch = next(iter(run.loader("train", run.open_cache(), shuffle=True)))

    def loss(model: TransferModel, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        *inputs, labels = tensors
        return torch.nn.functional.cross_entropy(model.logits(batch.with_inputs(inputs)), labels)

    def optimizer(parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        training = run.training
        return torch.optim.AdamW(parameters, lr=training.lr, betas=training.betas, weight_decay=training.weight_decay)

    return measure_training_step(model, loss, [*batch.inputs(), batch.label], optimizer).peak_bytes


def comparison_table(record: dict[str, Any]) -> str:
    rows = [("method", "test AUC", "accuracy", "kappa", "learnable", "train peak", "train time")]
    for name in DEMO_METHODS:
        r = record[name]
        rows.append(
            (
                name,
                f"{r['auc']:.3f}",
                f"{r['accuracy']:.3f}",
                f"{r['kappa']:.3f}",
                f"{r['learnable_params']:,}",
                mib(r["training_peak_bytes"]),
                f"{r['train_seconds']:.0f} s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in record["stages_seconds"].items())
    return "\n".join([*lines, f"stages: {stages}"])


def _explain_examples(run_dir: Path, data: Path, count: int, output: Path) -> list[tuple[str, str, str]]:
    """(image, overlay, caption) for one test image per grade (up to ``count``)."""
    dataset = load_dataset(data)
    chosen = []
    for label in range(len(dataset.classes)):
        chosen += [s for s in dataset.splits["test"] if s.label == label][:1]
    chosen = chosen[:count]
    paths = [dataset.root / s.path for s in chosen]
    predictions = predict_images(run_dir, paths, explain_dir=output, progress=False)
    examples = []
    for sample, path, prediction in zip(chosen, paths, predictions, strict=True):
        caption = f"true {dataset.classes[sample.label]}, FPT+ predicts {prediction.predicted}"
        examples.append((str(path), prediction.overlay, caption))
    return examples


def _write_demo_report(output: Path, record: dict[str, Any], examples: list[tuple[str, str, str]]) -> Path:
    def relative(path: str) -> str:
        return Path(path).resolve().relative_to(output.resolve()).as_posix()

    rows = "".join(
        f"<tr><th>{name}</th><td>{r['auc']:.3f}</td><td>{r['accuracy']:.3f}</td><td>{r['kappa']:.3f}</td>"
        f"<td>{r['learnable_params']:,}</td><td>{mib(r['training_peak_bytes'])}</td>"
        f"<td>{r['train_seconds']:.0f} s</td></tr>"
        for name, r in ((n, record[n]) for n in DEMO_METHODS)
    )
    figures = "".join(
        f"<figure><img src='{relative(image)}' width='256'><img src='{relative(overlay)}' width='256'>"
        f"<figcaption>{caption}</figcaption></figure>"
        for image, overlay, caption in examples
    )
    body = f"""<h1>fpt demo: FPT+ vs. its side network alone</h1>
<p>Synthetic 512 px fundus images graded by lesions a few pixels wide. Both methods train the same side
network on the same 128 px views; FPT+ adds fine-grained prompts that read the frozen LPM at 512 px.
Test split: {record["data"]["splits"]["test"]} images from seeds never used for training or for the LPM's
pre-training.</p>
<table><tr><th>method</th><th>test AUC</th><th>accuracy</th><th>kappa</th><th>learnable</th>
<th>training peak</th><th>training time</th></tr>{rows}</table>
<p>The linear probe (a linear classifier on the frozen LPM's pooled embedding, the practitioners' baseline) is
reported at the learning rate of its best validation AUC. Full run reports:
<a href="{record["fpt_plus"]["run"]}/{REPORT_FILE}">FPT+</a>,
<a href="{record["linear_probe"]["run"]}/{REPORT_FILE}">linear probe</a>,
<a href="{record["side_only"]["run"]}/{REPORT_FILE}">side-only</a>.</p>
<h2>Where FPT+'s prompts looked (test images)</h2>{figures}
"""
    page = html_page("fpt demo", body, extra_style="figure{display:inline-block;margin:8px}")
    path = output / REPORT_FILE
    path.write_text(page)
    return path
