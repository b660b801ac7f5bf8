"""The built-in demo and its shipped LPM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fpt.demo import DemoSettings, demo_backbone, run_demo
from fpt.models.backbone import load_backbone


def test_the_shipped_lpm_loads_through_the_backbone_spec_path() -> None:
    spec = demo_backbone()
    model = load_backbone(spec)
    assert (model.embed_dim, len(model.blocks), model.patch_embed.patch_size) == (192, 12, (16, 16))
    assert Path(spec.name, "config.json").is_file()
    metrics = json.loads(Path(spec.name, "metrics.json").read_text())
    assert metrics["held_out_512px"]["recall"] > 0.5  # the pretext task converged
    assert not torch.allclose(model.blocks[0].attn.qkv.weight, torch.zeros(1))


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_comparison(tmp_path: Path) -> None:
    settings = DemoSettings(epochs=1, splits={"train": 8, "val": 4, "test": 8}, examples=2)

    record = run_demo(tmp_path, settings)

    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved == json.loads(json.dumps(record))
    for method in ("fpt_plus", "side_only"):
        assert 0.0 <= saved[method]["auc"] <= 1.0
        assert saved[method]["learnable_params"] > 0
        assert saved[method]["training_peak_bytes"] > 0
        assert (tmp_path / "runs" / method / "report.html").is_file()
    assert saved["fpt_plus"]["learnable_params"] > saved["side_only"]["learnable_params"]
    assert set(saved["stages_seconds"]) == {"data", "preload", "train_fpt_plus", "train_side_only", "total"}
    report = (tmp_path / "report.html").read_text()
    assert report.count("_attention.png") == 2
    assert len(list((tmp_path / "examples").glob("*_attention.png"))) == 2
