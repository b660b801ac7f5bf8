"""Screen initialisations against the plateau at the class prior: `fpt train` for a few epochs, one change at a time.

Each run is `fpt train ARGS...` in this process with one initialisation changed after the model is built (the
changes that are not command-line options), stopped after `--epochs-shown` epochs of the full schedule; it prints
one JSON line per epoch (training loss and each module's gradient norm). Used for the screening table of BENCHMARKS.md
(issue 10); the options that became defaults (`--side-attention-init`, `--prompt-dropout`) are ablated there
with `benchmarks/ablate.py` on full runs.

    python benchmarks/screen_start.py --change head-zero --epochs-shown 8 -- train DATA --backbone demo ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
from torch import nn

import fpt.cli
import fpt.train
from fpt.models.fpt import FPTModel


def _side_linear_xavier(model: FPTModel) -> None:
    for module in model.side.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)


def _out_proj_xavier(model: FPTModel) -> None:
    nn.init.xavier_uniform_(model.fusion.out_proj.weight)


def _attention_part_xavier(part: str) -> Callable[[FPTModel], None]:
    def change(model: FPTModel) -> None:
        for block in model.side.blocks:
            nn.init.xavier_uniform_(getattr(block.attn, part).weight)

    return change


CHANGES: dict[str, Callable[[FPTModel], None]] = {
    "none": lambda model: None,
    "head-zero": lambda model: nn.init.zeros_(model.side.head.weight),
    "side-linear-xavier": _side_linear_xavier,
    "out-proj-xavier": _out_proj_xavier,
    "side-and-out-proj-xavier": lambda model: (_side_linear_xavier(model), _out_proj_xavier(model)),
    "qkv-xavier": _attention_part_xavier("qkv"),
    "attention-proj-xavier": _attention_part_xavier("proj"),
}
DATA_CHANGES = ("prompts-from-keys", "prompt-directions-from-keys")  # FPT+ only: prompts of width d


def _prompts_from_keys(model: FPTModel, loader: torch.utils.data.DataLoader, scale: float) -> None:
    """Each prompt becomes one cached key token (all heads concatenated) of one training image, times ``scale``."""
    keys = next(iter(loader)).keys.float()  # [B, L, H, T, d_head]
    batch, layers, heads, tokens, head_dim = keys.shape
    prompts = model.fusion.prompts
    if prompts.shape[-1] != heads * head_dim:
        raise SystemExit("prompts from keys need prompts of the LPM's width (fpt+)")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(batch, prompts.shape[:2], generator=generator)
    positions = torch.randint(tokens, prompts.shape[:2], generator=generator)
    with torch.no_grad():
        for layer in range(layers):
            picked = keys[images[layer], layer, :, positions[layer], :]  # [M, H, d_head]
            prompts[layer] = picked.reshape(len(picked), heads * head_dim) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--change", choices=[*CHANGES, *DATA_CHANGES], default="none")
    parser.add_argument("--epochs-shown", type=int, default=8, help="stop after this many epochs")
    parser.add_argument("fpt_args", nargs=argparse.REMAINDER, help="-- then the `fpt` command line")
    args = parser.parse_args()
    fpt_args = args.fpt_args[1:] if args.fpt_args[:1] == ["--"] else args.fpt_args

    built = FPTModel.__init__

    def build_and_change(self: FPTModel, *positional: object, **named: object) -> None:
        built(self, *positional, **named)
        with torch.no_grad():
            CHANGES.get(args.change, CHANGES["none"])(self)

    train_epoch = fpt.train.Trainer.train_epoch

    def train_and_show(
        self: fpt.train.Trainer, loader: torch.utils.data.DataLoader, epoch: int, epochs: int, progress: bool
    ) -> fpt.train.EpochStats:
        if epoch >= args.epochs_shown:
            raise SystemExit(0)
        if epoch == 0 and args.change in DATA_CHANGES:
            _prompts_from_keys(self.model, loader, 1.0 if args.change == "prompts-from-keys" else 1e-6)
        stats = train_epoch(self, loader, epoch, epochs, progress)
        print(json.dumps({"epoch": epoch + 1, "train_loss": stats.loss, **stats.gradient_norms}), flush=True)
        return stats

    FPTModel.__init__ = build_and_change
    fpt.train.Trainer.train_epoch = train_and_show
    sys.exit(fpt.cli.main(fpt_args))


if __name__ == "__main__":
    main()
