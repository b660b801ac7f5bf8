"""The built-in demo and its shipped LPM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fpt.config import BackboneSpec
from fpt.demo import DemoSettings, demo_backbone, run_demo
from fpt.errors import FPTError
from fpt.models.backbone import demo_lpm_directory, load_backbone


def test_the_shipped_lpm_loads_through_the_backbone_spec_path() -> None:
    spec = demo_backbone()
    model = load_backbone(spec)
    assert (model.embed_dim, len(model.blocks), model.patch_embed.patch_size) == (192, 12, (16, 16))
    assert spec.name == "fpt:demo" and spec.with_absolute_paths() == spec  # by name, not by install path
    assert (demo_lpm_directory() / "config.json").is_file()
    metrics = json.loads((demo_lpm_directory() / "metrics.json").read_text())
    assert metrics["held_out_512px"]["recall"] > 0.5  # the pretext task converged
    assert not torch.allclose(model.blocks[0].attn.qkv.weight, torch.zeros(1))


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_comparison(tmp_path: Path) -> None:
    settings = DemoSettings(epochs=1, splits={"train": 8, "val": 4, "test": 8}, examples=2)

    record = run_demo(tmp_path, settings)

    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved == json.loads(json.dumps(record))
    for method in ("fpt_plus", "linear_probe", "side_only"):
        assert 0.0 <= saved[method]["auc"] <= 1.0
        assert saved[method]["learnable_params"] > 0
        assert saved[method]["training_peak_bytes"] > 0
        assert (tmp_path / saved[method]["run"] / "report.html").is_file()
    assert saved["fpt_plus"]["learnable_params"] > saved["side_only"]["learnable_params"]
    # the probe trains once per learning rate of its grid, from its own cache of pooled embeddings
    probe_runs = sorted(path.name for path in (tmp_path / "runs" / "linear_probe").iterdir())
    assert probe_runs == ["lr0.001", "lr0.01", "lr0.1"]
    assert saved["linear_probe"]["lr"] in (1e-3, 1e-2, 1e-1)
    assert saved["linear_probe"]["learnable_params"] == 2 * 192 * 4 + 4  # CLS + mean token of the ViT-Tiny, 4 grades
    stages = {"data", "preload", "train_fpt_plus", "train_linear_probe", "train_side_only", "total"}
    assert set(saved["stages_seconds"]) == stages
    report = (tmp_path / "report.html").read_text()
    assert report.count("_attention.png") == 2
    assert len(list((tmp_path / "examples").glob("*_attention.png"))) == 2


def test_the_shipped_lpm_takes_no_other_weights() -> None:
    with pytest.raises(FPTError, match="fpt:demo comes with its own weights"):
        load_backbone(BackboneSpec("fpt:demo", weights="other.safetensors"))
