"""The baselines (full, VPT-deep, LoRA, adapter): each equation against an explicit computation, what is
trained, parameter counts by hand, gradients, save/load, and config validation."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import Mlp
from torch import Tensor, nn

from fpt.config import (
    AdapterConfig,
    FPTPlusConfig,
    FullFineTuningConfig,
    LinearProbeConfig,
    LoRAConfig,
    MethodConfig,
    VPTDeepConfig,
    config_from_dict,
)
from fpt.errors import BackboneError, FPTError
from fpt.models.backbone import BackboneSpec, load_backbone
from fpt.models.baselines import BASELINE_METHODS, BaselineViT, LoRALinear, MLPWithAdapter
from fpt.models.build import build_model, load_model
from fpt.models.fpt import FPTModel
from fpt.models.frozen_encoder import LPMGeometry
from tests.conftest import randomize_

# the tiny ViT of ``tiny_spec``: 64 wide, 4 blocks, 4 heads, patch 8, MLP 256 wide; a new 3-class head
WIDTH, DEPTH, PATCH, MLP_WIDTH, CLASSES = 64, 4, 8, 256, 3
INPUT_SIZE = 48  # 6 x 6 patches: more than the 4 x 4 the tiny ViT was built for, so position embeddings resample
RANK, ALPHA, BOTTLENECK, PROMPTS = 2, 6.0, 8, 5
HEAD = WIDTH * CLASSES + CLASSES

OPTIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "vpt-deep": {"num_prompts": PROMPTS},
    "lora": {"rank": RANK, "alpha": ALPHA},
    "adapter": {"bottleneck_dim": BOTTLENECK},
}
CONFIG_CLASSES: dict[str, type[MethodConfig]] = {
    "full": FullFineTuningConfig,
    "vpt-deep": VPTDeepConfig,
    "lora": LoRAConfig,
    "adapter": AdapterConfig,
}


def baseline(method: str, spec: BackboneSpec, **overrides: Any) -> BaselineViT:
    """The ``method`` baseline on the tiny ViT, with its pre-trained weights, 3 classes, in eval mode."""
    config = CONFIG_CLASSES[method](
        backbone=spec, num_classes=CLASSES, lpm_input_size=INPUT_SIZE, **{**OPTIONS[method], **overrides}
    )
    model = build_model(config)
    assert isinstance(model, BaselineViT)
    return model.eval()


def images(batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(seed))


def perturb_trainable_(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Add noise to every trainable parameter (LoRA's B and the adapter's up-projection leave zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def expected_trainable_names(method: str, model: BaselineViT) -> set[str]:
    """What each method trains, by name: a new head, plus the method's own modules (everything for full)."""
    head = {"backbone.head.weight", "backbone.head.bias"}
    blocks = range(DEPTH)
    if method == "full":
        return {name for name, _ in model.named_parameters()}
    if method == "vpt-deep":
        return head | {"prompts"}
    if method == "lora":
        return head | {f"backbone.blocks.{i}.attn.qkv.lora_{ab}" for i in blocks for ab in "ab"}
    return head | {
        f"backbone.blocks.{i}.mlp.{layer}.{kind}"
        for i in blocks
        for layer in ("down", "up")
        for kind in ("weight", "bias")
    }


def explicit_gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


# --- LoRALinear -------------------------------------------------------------------------------------------------


def test_lora_linear_adds_the_scaled_low_rank_update_to_the_base_layer() -> None:
    base = randomize_(nn.Linear(6, 5), seed=1)
    layer = LoRALinear(base, rank=3, alpha=12.0).double()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.lora_a.copy_(torch.randn(3, 6, generator=generator, dtype=torch.float64))
        layer.lora_b.copy_(torch.randn(5, 3, generator=generator, dtype=torch.float64))
    x = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64)

    w, b, a, b_up = base.weight, base.bias, layer.lora_a, layer.lora_b
    expected = x @ w.T + b + (12.0 / 3) * x @ a.T @ b_up.T

    assert layer.lora_a.shape == (3, 6) and layer.lora_b.shape == (5, 3)
    assert layer.scale == 4.0
    torch.testing.assert_close(layer(x), expected)
    assert (layer(x) - base(x)).abs().max() > 0.1  # the update is not negligible


def test_lora_linear_starts_as_its_base_layer_with_b_zero_and_a_non_zero() -> None:
    base = randomize_(nn.Linear(6, 5), seed=1)
    layer = LoRALinear(base, rank=3, alpha=8.0)
    x = torch.randn(2, 4, 6)

    assert torch.count_nonzero(layer.lora_b) == 0
    assert layer.lora_a.abs().min() > 0  # Kaiming-uniform, so gradients reach B from the first step
    assert layer.lora_a.abs().max() <= 1 / math.sqrt(6)  # bound of kaiming_uniform_(a=sqrt(5)) with fan-in 6
    assert torch.equal(layer(x), base(x))


def test_lora_dropout_acts_on_the_low_rank_path_only_and_only_in_training() -> None:
    base = randomize_(nn.Linear(6, 5), seed=1)
    layer = LoRALinear(base, rank=3, alpha=3.0, dropout=0.5)
    x = torch.randn(8, 6)

    layer.train()
    assert torch.equal(layer(x), base(x))  # B = 0: dropout on the update's input leaves the base output untouched
    with torch.no_grad():
        layer.lora_b.normal_()
    torch.manual_seed(0)
    noisy = layer(x)
    expected_eval = base(x) + x @ layer.lora_a.T @ layer.lora_b.T
    assert not torch.allclose(noisy, expected_eval)
    layer.eval()
    torch.testing.assert_close(layer(x), expected_eval)


# --- MLPWithAdapter ---------------------------------------------------------------------------------------------


def test_mlp_with_adapter_is_h_plus_up_gelu_down_h() -> None:
    mlp = randomize_(Mlp(WIDTH, MLP_WIDTH), seed=1)
    adapted = MLPWithAdapter(mlp, WIDTH, BOTTLENECK)
    randomize_(adapted.down, seed=2)
    randomize_(adapted.up, seed=3)
    x = torch.randn(2, 7, WIDTH)

    h = mlp(x)
    down = h @ adapted.down.weight.T + adapted.down.bias
    expected = h + explicit_gelu(down) @ adapted.up.weight.T + adapted.up.bias

    assert adapted.down.weight.shape == (BOTTLENECK, WIDTH) and adapted.up.weight.shape == (WIDTH, BOTTLENECK)
    torch.testing.assert_close(adapted(x), expected)
    assert (adapted(x) - h).abs().max() > 0.1


def test_mlp_with_adapter_starts_as_the_mlp() -> None:
    mlp = randomize_(Mlp(WIDTH, MLP_WIDTH), seed=1)
    adapted = MLPWithAdapter(mlp, WIDTH, BOTTLENECK)
    x = torch.randn(2, 7, WIDTH)

    assert torch.count_nonzero(adapted.up.weight) == 0 and torch.count_nonzero(adapted.up.bias) == 0
    assert adapted.down.weight.abs().max() > 0
    assert torch.equal(adapted(x), mlp(x))


# --- VPT-deep ---------------------------------------------------------------------------------------------------


def explicit_vpt_deep_logits(model: BaselineViT, pixels: Tensor) -> Tensor:
    """VPT-deep, image by image: block i reads [CLS, prompts_i, patches]; its prompt outputs are discarded (the next
    block gets its own prompts), after the last block the CLS token goes through the final norm and the head."""
    vit, prompts = model.backbone, model.prompts
    depth, num_prompts = prompts.shape[:2]
    logits = []
    for image in pixels:
        tokens = vit._pos_embed(vit.patch_embed(image[None]))  # [1, 1 + P, d] with the position embeddings
        cls, patches = tokens[:, :1], tokens[:, 1:]
        for i in range(depth):
            block_input = torch.cat([cls, prompts[i][None], patches], dim=1)
            assert block_input.shape[1] == 1 + num_prompts + (INPUT_SIZE // PATCH) ** 2
            output = vit.blocks[i](block_input)
            cls, patches = output[:, :1], output[:, 1 + num_prompts :]  # the prompt outputs are dropped
        logits.append(vit.head(vit.norm(cls[:, 0])))
    return torch.cat(logits)


def test_vpt_deep_forward_matches_an_explicit_loop_over_the_blocks(tiny_spec: BackboneSpec) -> None:
    model = baseline("vpt-deep", tiny_spec)
    randomize_(model, seed=1)  # unit-scale prompts, random LPM and head
    vit = model.backbone
    assert vit.global_pool == "token" and vit.num_prefix_tokens == 1  # the explicit loop reads the CLS token
    assert isinstance(vit.fc_norm, nn.Identity) and isinstance(vit.norm_pre, nn.Identity)
    pixels = images(3)

    with torch.no_grad():
        got = model(pixels)
        expected = explicit_vpt_deep_logits(model, pixels)
        without_prompts = vit.forward_head(vit.forward_features(pixels))

    assert got.shape == (3, CLASSES)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - without_prompts).abs().max() > 0.1  # the prompts matter


@pytest.mark.parametrize("layer", range(DEPTH))
def test_vpt_deep_reads_every_blocks_own_prompts(tiny_spec: BackboneSpec, layer: int) -> None:
    model = baseline("vpt-deep", tiny_spec)
    pixels = images()
    # a random change (a constant shift would vanish in the blocks' LayerNorm)
    change = torch.randn(PROMPTS, WIDTH, generator=torch.Generator().manual_seed(layer))
    with torch.no_grad():
        before = model(pixels)
        model.prompts[layer].add_(change)
        after = model(pixels)
        model.prompts[layer].sub_(change)
        torch.testing.assert_close(model(pixels), before)

    assert (after - before).abs().max() > 1e-4


def test_vpt_deep_prompts_are_one_set_per_block_in_vpts_xavier_range(tiny_spec: BackboneSpec) -> None:
    model = baseline("vpt-deep", tiny_spec)
    bound = math.sqrt(6.0 / (3 * PATCH * PATCH + WIDTH))

    assert model.prompts.shape == (DEPTH, PROMPTS, WIDTH)
    assert model.prompts.abs().max() <= bound
    assert model.prompts.abs().max() > bound / 2  # spread over the range, not a constant
    assert model.prompts.std() > bound / 4


# --- every method: starting point, what is trained, counts, gradients ------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora", "adapter"])
def test_at_initialisation_the_baseline_is_the_pretrained_vit_with_its_new_head(
    tiny_spec: BackboneSpec, method: str
) -> None:
    model = baseline(method, tiny_spec)
    reference = load_backbone(tiny_spec).eval()  # the pre-trained tiny ViT with its 10-class head
    assert reference.head.out_features == 10
    reference.head = copy.deepcopy(model.backbone.head)
    pixels = images(3)

    with torch.no_grad():
        got, expected = model(pixels), reference(pixels)

    assert got.shape == (3, CLASSES)
    assert expected.abs().max() > 0.01  # the new head gives non-trivial logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_vpt_deep_at_initialisation_differs_from_the_pretrained_vit(tiny_spec: BackboneSpec) -> None:
    model = baseline("vpt-deep", tiny_spec)
    reference = load_backbone(tiny_spec).eval()
    reference.head = copy.deepcopy(model.backbone.head)
    with torch.no_grad():
        assert (model(images()) - reference(images())).abs().max() > 1e-4  # prompts start random, not at zero


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_each_method_trains_exactly_its_own_parameters(tiny_spec: BackboneSpec, method: str) -> None:
    model = baseline(method, tiny_spec)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}

    assert trainable == expected_trainable_names(method, model)
    assert set(model.trainable_state_dict()) == trainable
    # the pre-trained weights the method adapts are still those of the checkpoint
    reference = load_backbone(tiny_spec)
    for name, param in reference.named_parameters():
        if not name.startswith("head."):
            wrapped = name.replace("attn.qkv.", "attn.qkv.base.") if method == "lora" else name
            wrapped = wrapped.replace(".mlp.", ".mlp.mlp.") if method == "adapter" else wrapped
            assert torch.equal(model.backbone.get_parameter(wrapped), param), name


def test_lora_wraps_every_qkv_and_the_adapter_every_mlp(tiny_spec: BackboneSpec) -> None:
    lora, adapter = baseline("lora", tiny_spec), baseline("adapter", tiny_spec)

    for block in lora.backbone.blocks:
        assert isinstance(block.attn.qkv, LoRALinear)
        assert block.attn.qkv.lora_a.shape == (RANK, WIDTH) and block.attn.qkv.lora_b.shape == (3 * WIDTH, RANK)
        assert block.attn.qkv.scale == ALPHA / RANK
        assert not block.attn.qkv.base.weight.requires_grad
    for block in adapter.backbone.blocks:
        assert isinstance(block.mlp, MLPWithAdapter)
        assert block.mlp.down.weight.shape == (BOTTLENECK, WIDTH)
        assert not any(param.requires_grad for param in block.mlp.mlp.parameters())


@pytest.mark.parametrize(
    ("method", "learnable"),
    [
        ("lora", HEAD + DEPTH * RANK * (WIDTH + 3 * WIDTH)),  # A [r, 64] and B [192, r] per qkv
        ("adapter", HEAD + DEPTH * (WIDTH * BOTTLENECK + BOTTLENECK + BOTTLENECK * WIDTH + WIDTH)),
        ("vpt-deep", HEAD + DEPTH * PROMPTS * WIDTH),
    ],
)
def test_learnable_parameter_counts_by_hand(tiny_spec: BackboneSpec, method: str, learnable: int) -> None:
    model = baseline(method, tiny_spec)
    # the pre-trained ViT with the new head: patch embedding, CLS, 1 + 16 position embeddings, 4 blocks, norm
    block = 2 * WIDTH + (WIDTH * 3 * WIDTH + 3 * WIDTH) + (WIDTH * WIDTH + WIDTH) + 2 * WIDTH
    block += (WIDTH * MLP_WIDTH + MLP_WIDTH) + (MLP_WIDTH * WIDTH + WIDTH)
    vit = (3 * PATCH * PATCH * WIDTH + WIDTH) + WIDTH + 17 * WIDTH + DEPTH * block + 2 * WIDTH + HEAD

    assert model.num_learnable_params() == learnable
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == vit - HEAD
    assert sum(p.numel() for p in model.parameters()) == vit - HEAD + learnable


def test_full_fine_tuning_learns_every_parameter_of_the_vit_with_its_new_head(tiny_spec: BackboneSpec) -> None:
    model = baseline("full", tiny_spec)
    block = 2 * WIDTH + (WIDTH * 3 * WIDTH + 3 * WIDTH) + (WIDTH * WIDTH + WIDTH) + 2 * WIDTH
    block += (WIDTH * MLP_WIDTH + MLP_WIDTH) + (MLP_WIDTH * WIDTH + WIDTH)
    vit = (3 * PATCH * PATCH * WIDTH + WIDTH) + WIDTH + 17 * WIDTH + DEPTH * block + 2 * WIDTH + HEAD

    assert vit == 213_763
    assert model.num_learnable_params() == vit
    assert all(param.requires_grad for param in model.parameters())


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_gradients_reach_exactly_the_trainable_parameters(tiny_spec: BackboneSpec, method: str) -> None:
    model = baseline(method, tiny_spec)
    perturb_trainable_(model)  # LoRA's B and the adapter's up start at zero, which would block A's and down's grads
    labels = torch.tensor([0, 2])

    nn.functional.cross_entropy(model(images()), labels).backward()

    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    assert with_grad == expected_trainable_names(method, model)
    for name in with_grad:
        assert model.get_parameter(name).grad.abs().sum() > 0, name


# --- save / load ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_save_and_load_round_trip_gives_the_same_logits_from_trainable_weights_only(
    tmp_path: Path, tiny_spec: BackboneSpec, method: str
) -> None:
    model = baseline(method, tiny_spec)
    perturb_trainable_(model, seed=4)
    model.save_pretrained(tmp_path)

    restored = load_model(tmp_path).eval()

    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    weights = load_file(tmp_path / "model.safetensors")
    assert set(weights) == expected_trainable_names(method, model)
    assert sum(t.numel() for t in weights.values()) == model.num_learnable_params()
    assert json.loads((tmp_path / "config.json").read_text())["method"] == method
    assert type(restored) is BaselineViT and type(restored.config) is CONFIG_CLASSES[method]
    assert restored.config == model.config
    with torch.no_grad():
        expected = model(images())
        torch.testing.assert_close(restored(images()), expected, rtol=0, atol=0)
        initial = baseline(method, tiny_spec)(images())
    assert (expected - initial).abs().max() > 1e-3  # the perturbed weights were what got restored


def test_full_fine_tuning_restores_without_the_pretrained_weights_and_the_others_need_them(
    tmp_path: Path, tiny_spec: BackboneSpec
) -> None:
    for method in ("full", "lora"):
        model = baseline(method, tiny_spec)
        perturb_trainable_(model, seed=5)
        model.save_pretrained(tmp_path / method)
        config = json.loads((tmp_path / method / "config.json").read_text())
        config["backbone"]["weights"] = str(tmp_path / "gone.safetensors")
        (tmp_path / method / "config.json").write_text(json.dumps(config))
        if method == "full":  # every weight is in its checkpoint
            with torch.no_grad():
                torch.testing.assert_close(load_model(tmp_path / method).eval()(images()), model(images()))
        else:
            with pytest.raises(BackboneError, match="weights file not found"):
                load_model(tmp_path / method)


def test_weights_of_another_rank_are_refused(tmp_path: Path, tiny_spec: BackboneSpec) -> None:
    baseline("lora", tiny_spec).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rank"] = RANK + 2
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(FPTError, match=r"does not match its config\.json"):
        load_model(tmp_path)


# --- configs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_class", "options", "message"),
    [
        (LoRAConfig, {"rank": 0}, "rank must be a positive integer"),
        (LoRAConfig, {"rank": -2}, "rank must be a positive integer"),
        (LoRAConfig, {"dropout": 1.0}, r"LoRA dropout must be in \[0, 1\)"),
        (LoRAConfig, {"dropout": -0.1}, r"LoRA dropout must be in \[0, 1\)"),
        (AdapterConfig, {"bottleneck_dim": 0}, "bottleneck_dim must be a positive integer"),
        (VPTDeepConfig, {"num_prompts": 0}, "num_prompts must be a positive integer"),
        (VPTDeepConfig, {"prompt_dropout": 1.0}, r"prompt_dropout must be in \[0, 1\)"),
        (LinearProbeConfig, {"lpm_input_size": 0}, "lpm_input_size must be a positive integer"),
        (FullFineTuningConfig, {"num_classes": 0}, "num_classes must be a positive integer"),
    ],
)
def test_impossible_baseline_settings_are_refused(
    config_class: type[MethodConfig], options: dict[str, Any], message: str
) -> None:
    arguments = {"backbone": "vit_tiny_patch16_224", "num_classes": 3, **options}
    with pytest.raises(FPTError, match=message):
        config_class(**arguments)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_baseline_configs_round_trip_through_their_dict(tiny_spec: BackboneSpec, method: str) -> None:
    config = CONFIG_CLASSES[method](backbone=tiny_spec, num_classes=CLASSES, **OPTIONS[method])
    data = json.loads(json.dumps(config.to_dict()))

    assert data["method"] == method
    assert config_from_dict(data) == config
    assert type(config_from_dict(data)) is CONFIG_CLASSES[method]
    assert config_from_dict(data).uses_lpm and not config_from_dict(data).cacheable


def test_a_config_field_of_another_method_is_refused() -> None:
    with pytest.raises(FPTError, match="unknown linear config fields: rank"):
        config_from_dict({"method": "linear", "backbone": "vit_tiny_patch16_224", "num_classes": 2, "rank": 4})


def test_baseline_vit_refuses_a_non_baseline_config_and_build_model_picks_the_right_class(
    tiny_spec: BackboneSpec,
) -> None:
    config = FPTPlusConfig(backbone=tiny_spec, num_classes=3, lpm_input_size=32, side_input_size=16)
    with pytest.raises(FPTError, match="'fpt\\+' is not a baseline"):
        BaselineViT(config, load_backbone(tiny_spec))
    assert isinstance(build_model(config), FPTModel)
    lora = build_model(LoRAConfig(backbone=tiny_spec, num_classes=3))
    assert isinstance(lora, BaselineViT)
    assert LPMGeometry.from_model(lora.backbone).embed_dim == WIDTH


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_an_input_size_off_the_patch_grid_is_a_clear_error(tiny_spec: BackboneSpec, method: str) -> None:
    config = CONFIG_CLASSES[method](backbone=tiny_spec, num_classes=CLASSES, lpm_input_size=36)
    with pytest.raises(FPTError, match=r"lpm_input_size \(--input-size\) 36 is not a multiple .* use 32 or 40"):
        build_model(config)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_added_modules_take_the_dtype_of_the_layer_they_wrap(dtype: torch.dtype) -> None:
    lora = LoRALinear(nn.Linear(6, 5).to(dtype), rank=2, alpha=2.0)
    adapted = MLPWithAdapter(Mlp(6, 12).to(dtype), dim=6, bottleneck_dim=3)
    x = torch.randn(2, 6, dtype=dtype)
    assert lora(x).dtype == dtype and adapted(x).dtype == dtype
    assert {p.dtype for p in [*lora.parameters(), *adapted.parameters()]} == {dtype}
