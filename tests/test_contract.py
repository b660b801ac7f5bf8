"""The method contract, for every method and variant: build -> logits of a batch -> save_pretrained -> load_model
-> the same logits. A method is a config class plus a model class; nothing else dispatches on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fpt
from fpt.config import METHOD_CONFIGS, METHOD_VARIANTS, BackboneSpec, LinearProbeConfig, method_variant
from fpt.data.loaders import Batch
from fpt.models.base import TransferModel
from fpt.models.build import MODEL_CLASSES, build_model, load_model
from fpt.models.frozen_encoder import num_important_tokens
from fpt.train import start_at_class_prior

LPM_SIZE, SIDE_SIZE, BATCH, CLASSES = 32, 16, 3, 3


def batch_for(model: TransferModel, cached: bool, seed: int = 0) -> Batch:
    """Random inputs of exactly the kinds the method reads (judged by its config's flags, as the loaders do)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    batch = Batch(label=torch.arange(BATCH) % CLASSES, index=torch.arange(BATCH))
    if config.side_network:
        batch.side = torch.randn(BATCH, 3, SIDE_SIZE, SIDE_SIZE, generator=generator)
    if config.uses_lpm and not cached:
        batch.lpm = torch.randn(BATCH, 3, LPM_SIZE, LPM_SIZE, generator=generator)
    if config.uses_lpm and cached:
        for name, shape in model.feature_layout().items():
            setattr(batch, name, torch.randn(BATCH, *shape, generator=generator).half())
    return batch


def perturb_trainable_(model: TransferModel, seed: int = 1) -> None:
    """Move every trainable parameter away from its initial value (LoRA's B and the adapters' up-projection
    start at zero, which would hide a weight that failed to load)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("variant", METHOD_VARIANTS)
def test_build_logits_save_load_gives_the_same_logits(tmp_path: Path, tiny_spec: BackboneSpec, variant: str) -> None:
    config_class, cached = method_variant(variant)
    options = {"side_input_size": SIDE_SIZE} if config_class.side_network else {}
    config = config_class(backbone=tiny_spec, num_classes=CLASSES, lpm_input_size=LPM_SIZE, **options)
    model = build_model(config, load_lpm=not cached)
    perturb_trainable_(model)
    model.eval()
    batch = batch_for(model, cached)

    with torch.no_grad():
        logits = model.logits(batch)
    model.save_pretrained(tmp_path / "model")
    restored = load_model(tmp_path / "model", load_lpm=not cached).eval()
    with torch.no_grad():
        again = restored.logits(batch)

    assert logits.shape == (BATCH, CLASSES)
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert type(restored) is type(model) is MODEL_CLASSES[config.method]
    assert restored.config == model.config
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_the_classifier_bias_starts_at_the_class_prior(tiny_spec: BackboneSpec, method: str) -> None:
    config_class = METHOD_CONFIGS[method]
    options = {"side_input_size": SIDE_SIZE} if config_class.side_network else {}
    model = build_model(config_class(backbone=tiny_spec, num_classes=CLASSES, lpm_input_size=LPM_SIZE, **options))
    perturb_trainable_(model)
    model.eval()
    batch = batch_for(model, cached=False)
    with torch.no_grad():
        before = model.logits(batch)
        shift = model.classifier().bias.clone()

    start_at_class_prior(model.classifier(), [6, 0, 2])  # a class without a sample counts as one

    with torch.no_grad():
        after = model.logits(batch)
    prior = torch.tensor([6.0, 1.0, 2.0]) / 9
    torch.testing.assert_close(model.classifier().bias, prior.log())
    assert model.classifier().bias.requires_grad  # the layer that is trained, and the one that gives the logits
    rounding = 1e-6 * max(1.0, before.abs().max().item())  # float32 rounding of the logits themselves
    torch.testing.assert_close(after - before, (prior.log() - shift).expand_as(after), rtol=0, atol=rounding)


def test_every_method_config_has_exactly_one_model_class() -> None:
    assert set(MODEL_CLASSES) == set(METHOD_CONFIGS)
    assert all(issubclass(model_class, TransferModel) for model_class in MODEL_CLASSES.values())


def test_the_package_exports_resolve_lazily_to_their_modules() -> None:
    exported = [name for name in fpt.__all__ if name != "__version__"]
    assert all(getattr(fpt, name) is not None for name in exported)
    assert fpt.build_model is build_model and fpt.BackboneSpec is BackboneSpec
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = fpt.nope


@pytest.mark.parametrize("method", ["fpt", "fpt+"])
def test_the_cached_record_of_fpt_is_the_kept_tokens_of_each_tapped_layer(tiny_spec: BackboneSpec, method: str) -> None:
    config = METHOD_CONFIGS[method](backbone=tiny_spec, num_classes=CLASSES, lpm_input_size=LPM_SIZE)
    model = build_model(config, load_lpm=False)
    geometry = model.geometry
    kept = num_important_tokens(geometry.num_tokens(LPM_SIZE), config.token_ratio)
    shape = (len(model.config.tapped_layers), geometry.num_heads, kept, geometry.head_dim)
    assert model.feature_layout() == {"keys": shape, "values": shape}


@pytest.mark.parametrize(("pooling", "width"), [("cls", 1), ("mean", 1), ("cls+mean", 2)])
def test_the_cached_record_of_the_linear_probe_is_one_pooled_embedding(
    tiny_spec: BackboneSpec, pooling: str, width: int
) -> None:
    config = LinearProbeConfig(backbone=tiny_spec, num_classes=CLASSES, lpm_input_size=LPM_SIZE, pooling=pooling)
    model = build_model(config, load_lpm=False)
    assert model.feature_layout() == {"embedding": (width * model.geometry.embed_dim,)}
