"""Peak training-step memory and learnable parameters per method, both meters, as a Markdown table.

    python benchmarks/training_memory.py --backbone vit_base_patch16_384 --input-size 512 --batch-size 16

Each method's step is built by ``fpt.bench.steps.training_step`` (random weights; FPT and FPT+ from a
float16 feature cache) and metered by ``fpt.bench.memory``: simulated always, measured unless the
simulated peak exceeds ``--measured-limit-gib``.
"""

from __future__ import annotations

import argparse
import platform

import torch

from fpt.bench.memory import measure_training_step, simulate_training_step
from fpt.bench.steps import STEP_METHODS, training_step
from fpt.models.backbone import BackboneSpec

GiB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_base_patch16_384")
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", default=",".join(STEP_METHODS))
    parser.add_argument("--measured-limit-gib", type=float, default=16.0)
    args = parser.parse_args()

    rows = []
    for method in args.methods.split(","):
        step = training_step(method, BackboneSpec(args.backbone), args.input_size, args.batch_size)
        simulated = simulate_training_step(step.model, step.loss, step.inputs)
        measured = None
        if simulated.peak_bytes <= args.measured_limit_gib * GiB:
            measured = measure_training_step(step.model, step.loss, step.inputs)
        rows.append((method, step.learnable_params, simulated, measured))
        del step

    full = next((r for r in rows if r[0] == "full"), None)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU")
    print(f"{args.backbone}, {args.input_size} px, batch {args.batch_size}\n")
    print("| method | learnable params | simulated peak (MiB) | measured peak (MiB) | step (s) | % of full FT |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method, learnable, simulated, measured in rows:
        peak = (measured or simulated).peak_bytes
        share = f"{100 * peak / (full[3] or full[2]).peak_bytes:.2f}" if full else "n/a"
        measured_text = f"{measured.peak_bytes / 2**20:,.1f}" if measured else "skipped (too large)"
        seconds = f"{measured.step_seconds:.2f}" if measured else "n/a"
        simulated_text = f"{simulated.peak_bytes / 2**20:,.1f}"
        print(f"| {method} | {learnable:,} | {simulated_text} | {measured_text} | {seconds} | {share} |")


if __name__ == "__main__":
    main()
