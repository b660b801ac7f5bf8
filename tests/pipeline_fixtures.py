"""Shared pieces of the pipeline tests (cache, training, prediction, CLI): a tiny LPM, a tiny image dataset.

The LPM is a randomised timm ViT (64 wide, 4 layers, 4 heads, patch 16) saved with ``timm.models.save_for_hf``,
so it loads as ``--backbone DIR`` / ``BackboneSpec(DIR)`` like a real local checkpoint. The dataset has three
classes in ``ROOT/{train,val,test}/<class>/imgNNN.png``; the same file names repeat in every class folder, so
cache keys must be paths relative to the data root to stay distinct.

Test modules load the fixtures with ``pytest_plugins = ("tests.pipeline_fixtures",)``, so that each session
fixture is built once however many modules use it, and import the helpers by name. As they import this module
before pytest registers it as a plugin, it opts out of assertion rewriting (PYTEST_DONT_REWRITE), which would
otherwise warn; its assertions carry their own messages.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor

import fpt.train
from fpt.config import FPTPlusConfig, TrainingConfig
from fpt.data.datasets import ImageDataset
from fpt.data.images import load_image
from fpt.data.transforms import Normalization, lpm_view
from fpt.models.backbone import BackboneSpec
from fpt.models.base import TransferModel
from fpt.models.fpt import FPTModel
from fpt.preload import PreloadSummary, preload
from fpt.train import train
from tests.conftest import randomize_

LPM_ARCH = "vit_tiny_patch16_224"
LPM_ARGS = {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 4, "num_heads": 4, "num_classes": 0}
LPM_INPUT_SIZE = 64
SIDE_INPUT_SIZE = 32
TOKEN_RATIO = 0.3
NUM_PROMPTS = 4
CLASSES = ("a", "b", "c")
SPLIT_SIZES = {"train": 4, "val": 2, "test": 2}
NUM_IMAGES = len(CLASSES) * sum(SPLIT_SIZES.values())
COLOURS = {"a": (200, 50, 50), "b": (50, 200, 50), "c": (50, 50, 200)}
TIMING_FIELDS = ("seconds", "seconds_per_step")


def save_tiny_lpm(directory: Path, seed: int = 0) -> Path:
    """A randomised tiny ViT saved as a timm checkpoint directory (config.json + model.safetensors)."""
    model = randomize_(timm.create_model(LPM_ARCH, pretrained=False, **LPM_ARGS), seed=seed)
    timm.models.save_for_hf(model, str(directory), model_args=dict(LPM_ARGS), safe_serialization=True)
    return directory


def write_image_folder(root: Path, split_sizes: dict[str, int] = SPLIT_SIZES, seed: int = 0) -> Path:
    """``root/{split}/{class}/imgNNN.png``: noisy class colours, 56x48 (non-square, smaller than the LPM input)."""
    rng = np.random.default_rng(seed)
    for split, count in split_sizes.items():
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                noise = rng.normal(0.0, 45.0, size=(48, 56, 3))
                pixels = np.clip(np.array(COLOURS[name])[None, None] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{index:03d}.png")
    return root


def tiny_config(lpm_dir: Path, **overrides: Any) -> FPTPlusConfig:
    """FPT+ on the tiny LPM: layers 2 and 3 tapped, 17 tokens of which 5 kept per head, 4 prompts."""
    options = {
        "num_classes": 1,
        "lpm_input_size": LPM_INPUT_SIZE,
        "side_input_size": SIDE_INPUT_SIZE,
        "num_prompts": NUM_PROMPTS,
        "token_ratio": TOKEN_RATIO,
        **overrides,
    }
    return FPTPlusConfig(backbone=BackboneSpec(str(lpm_dir)), **options)


def fast_training(cache_dir: Path | None, **overrides: Any) -> TrainingConfig:
    """Two quick epochs on the CPU in the main process (no DataLoader workers)."""
    options = {
        "epochs": 2,
        "batch_size": 4,
        "lr": 3e-3,
        "seed": 0,
        "device": "cpu",
        "num_workers": 0,
        "cache_dir": None if cache_dir is None else str(cache_dir),
        **overrides,
    }
    return TrainingConfig(**options)


def preload_into(
    model: FPTModel,
    dataset: ImageDataset,
    cache_dir: Path,
    normalization: Normalization,
    dtype: str = "float16",
    overwrite: bool = False,
    progress: bool = False,
    **options: Any,
) -> PreloadSummary:
    """``fpt.preload.preload`` into ``cache_dir`` with ``fast_training``'s settings, overridden by ``options``
    (batch_size, num_workers, device, precision) and the cache ``dtype``."""
    training = fast_training(cache_dir, cache_dtype=dtype, **options)
    return preload(model, dataset, normalization, training, overwrite=overwrite, progress=progress)


def cli_model_args(lpm_dir: Path) -> list[str]:
    """The CLI options of ``tiny_config``."""
    return [
        "--backbone",
        str(lpm_dir),
        "--method",
        "fpt+",
        "--input-size",
        str(LPM_INPUT_SIZE),
        "--side-input-size",
        str(SIDE_INPUT_SIZE),
        "--num-prompts",
        str(NUM_PROMPTS),
        "--token-ratio",
        str(TOKEN_RATIO),
    ]


def cli_run_args(cache_dir: Path) -> list[str]:
    """CPU, no workers, batch 4, seed 0 and the given cache: the CLI form of ``fast_training``'s data options."""
    return ["--cache", str(cache_dir), "--batch-size", "4", "--workers", "0", "--device", "cpu", "--seed", "0"]


def all_keys(dataset: ImageDataset) -> list[str]:
    return [sample.path for samples in dataset.splits.values() for sample in samples]


def reference_features(model: TransferModel, dataset: ImageDataset, normalization: Normalization) -> dict[str, Any]:
    """``model.preload_features(lpm_view(image))`` of every image, one image at a time, keyed like the cache."""
    to_lpm = lpm_view(model.config.lpm_input_size, normalization)
    references = {}
    with torch.no_grad():
        for key in all_keys(dataset):
            features = model.preload_features(to_lpm(load_image(dataset.root / key))[None])
            references[key] = {name: part[0] for name, part in features.items()}
    return references


def assert_features_equal(cached: dict[str, Tensor], expected: dict[str, Tensor], dtype: torch.dtype) -> None:
    """Cached parts against the encoder's float32 output: exact for float32, else within ``dtype`` rounding."""
    rtol, atol = {torch.float32: (0.0, 0.0), torch.float16: (2**-10, 1e-4), torch.bfloat16: (2**-7, 1e-3)}[dtype]
    assert sorted(cached) == sorted(expected)
    for name, want in expected.items():
        got = cached[name]
        assert got.dtype == dtype, f"cached {name} dtype {got.dtype}, expected {dtype}"
        assert got.shape == want.shape, f"cached {name} shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol)


def interrupt_at_epoch(monkeypatch: pytest.MonkeyPatch, epoch_index: int) -> None:
    """Make training raise KeyboardInterrupt (as Ctrl-C would) when epoch ``epoch_index`` (0-based) starts."""
    train_epoch = fpt.train.Trainer.train_epoch
    signature = inspect.signature(train_epoch)

    def interrupted(*args: Any, **kwargs: Any) -> float:
        if signature.bind(*args, **kwargs).arguments["epoch"] == epoch_index:
            raise KeyboardInterrupt
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(fpt.train.Trainer, "train_epoch", interrupted)


def metric_lines(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl of a run without its timing fields."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def tiny_lpm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LPM as a timm checkpoint directory (read only)."""
    return save_tiny_lpm(tmp_path_factory.mktemp("tiny_lpm"))


@pytest.fixture(scope="session")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny three-class dataset (read only)."""
    return write_image_folder(tmp_path_factory.mktemp("image_data"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_lpm_dir: Path, image_data: Path) -> Path:
    """A finished two-epoch run of ``fast_training`` from a float16 cache (read only)."""
    directory = tmp_path_factory.mktemp("trained_run")
    train(image_data, directory / "run", tiny_config(tiny_lpm_dir), fast_training(directory / "cache"), progress=False)
    return directory / "run"


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The single `fpt: error: ...` line on stderr (and nothing that looks like a traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fpt: error: ")
    return lines[0]


def assert_same_run(got: Path, want: Path) -> None:
    """Two run directories hold the same metrics, test results and best/last checkpoint weights."""
    assert metric_lines(got) == metric_lines(want)
    assert read_json(got / "results.json") == read_json(want / "results.json")
    for name in ("best", "last"):
        got_weights = load_file(got / "checkpoints" / name / "model.safetensors")
        want_weights = load_file(want / "checkpoints" / name / "model.safetensors")
        assert set(got_weights) == set(want_weights)
        assert all(torch.equal(got_weights[key], want_weights[key]) for key in want_weights)


def train_until_interrupted(
    monkeypatch: pytest.MonkeyPatch, data: Path, run_dir: Path, config: Any, training: Any, epoch_index: int = 2
) -> None:
    """Train until Ctrl-C at the start of epoch ``epoch_index`` (0-based): the epochs before it are recorded,
    no test results yet."""
    interrupt_at_epoch(monkeypatch, epoch_index)
    with pytest.raises(KeyboardInterrupt):
        fpt.train.train(data, run_dir, config, training, progress=False)
    monkeypatch.undo()
    assert [line["epoch"] for line in metric_lines(run_dir)] == list(range(1, epoch_index + 1))
    assert not (run_dir / "results.json").exists()
