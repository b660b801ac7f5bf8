"""The frozen LPM: token importance, top-T selection per head, and the keys/values it returns.

Every expectation is computed independently in this file: the timm ViT is run step by step, the tapped
blocks' keys, values and attention maps are formed from explicit slices of ``attn.qkv`` and per-head loops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from fpt.errors import FPTError
from fpt.models.frozen_encoder import (
    FrozenEncoder,
    LPMGeometry,
    gather_tokens,
    important_token_indices,
    num_important_tokens,
    received_attention,
)
from tests.conftest import make_tiny_vit

PATCH = 8
EMBED_DIM = 48
NUM_HEADS = 4
HEAD_DIM = EMBED_DIM // NUM_HEADS
DEPTH = 4


def make_vit(seed: int = 0, **kwargs) -> VisionTransformer:
    """This file's float64 LPM (48 wide, 4 layers, 4 heads, patch 8), randomised, in eval mode."""
    vit = make_tiny_vit(
        seed, dtype=torch.float64, patch_size=PATCH, embed_dim=EMBED_DIM, depth=DEPTH, num_heads=NUM_HEADS, **kwargs
    )
    return vit.eval()


def images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)


def reference_features(
    model: VisionTransformer, pixels: torch.Tensor, tapped_layers: list[int], token_ratio: float, importance: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Keys, values [B, L, H, T, d_head] and indices [B, L, H, T] from a step-by-step run of the ViT.

    Also checks that the top-T+1 scores of every head are well separated, so that the float32 scores
    of the code under test cannot order them differently (a fixture sanity check).
    """
    batch, size = pixels.shape[0], pixels.shape[-1]
    grid = size // PATCH
    conv = model.patch_embed.proj
    x = F.conv2d(pixels, conv.weight, conv.bias, stride=PATCH).flatten(2).transpose(1, 2)
    prefix = [model.cls_token.expand(batch, -1, -1)]
    if model.reg_token is not None:
        prefix.append(model.reg_token.expand(batch, -1, -1))
    x = torch.cat([*prefix, x], dim=1)
    pos_embed = resample_abs_pos_embed(
        model.pos_embed, new_size=(grid, grid), num_prefix_tokens=model.num_prefix_tokens
    )
    x = model.norm_pre(x + pos_embed)
    num_tokens = x.shape[1]
    assert num_tokens == model.num_prefix_tokens + grid * grid
    kept = int(num_tokens * token_ratio)
    d = EMBED_DIM

    keys, values, indices = [], [], []
    for layer, block in enumerate(model.blocks[: tapped_layers[-1] + 1]):
        if layer in tapped_layers:
            norm = block.norm1
            x_hat = F.layer_norm(x, (d,), norm.weight, norm.bias, norm.eps)
            weight, bias = block.attn.qkv.weight, block.attn.qkv.bias
            q_all = x_hat @ weight[:d].T + bias[:d]
            k_all = x_hat @ weight[d : 2 * d].T + bias[d : 2 * d]
            v_all = x_hat @ weight[2 * d :].T + bias[2 * d :]
            layer_keys = torch.empty(batch, NUM_HEADS, kept, HEAD_DIM, dtype=x.dtype)
            layer_values = torch.empty_like(layer_keys)
            layer_indices = torch.empty(batch, NUM_HEADS, kept, dtype=torch.long)
            for b in range(batch):
                for h in range(NUM_HEADS):
                    head = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                    q, k, v = q_all[b, :, head], k_all[b, :, head], v_all[b, :, head]
                    attention = torch.softmax(q @ k.T / math.sqrt(HEAD_DIM), dim=-1)  # [N queries, N keys]
                    score = attention.mean(dim=0) if importance == "global" else attention[0]
                    order = torch.argsort(score, descending=True)
                    gaps = -torch.diff(score[order[: kept + 1]])
                    assert gaps.min() > 1e-6, "near-tie in the fixture's importance scores; change the seed"
                    layer_indices[b, h] = order[:kept]
                    layer_keys[b, h] = k[order[:kept]]
                    layer_values[b, h] = v[order[:kept]]
            keys.append(layer_keys)
            values.append(layer_values)
            indices.append(layer_indices)
        x = block(x)
    return torch.stack(keys, 1), torch.stack(values, 1), torch.stack(indices, 1), kept


# ---------------------------------------------------------------------------------------------------------
# Token importance and selection on hand-built inputs
# ---------------------------------------------------------------------------------------------------------


def test_important_token_indices_picks_top_scores_per_head_in_score_order():
    importance = torch.tensor(
        [
            [[0.10, 0.50, 0.20, 0.90, 0.00], [0.70, 0.10, 0.60, 0.00, 0.30]],
            [[0.00, 0.00, 0.30, 0.20, 0.40], [0.05, 0.80, 0.01, 0.02, 0.90]],
        ]
    )  # [B=2, H=2, N=5]
    indices = important_token_indices(importance, 2)
    assert indices.shape == (2, 2, 2)
    assert indices.tolist() == [[[3, 1], [0, 2]], [[4, 2], [4, 1]]]


def test_gather_tokens_takes_each_heads_own_tokens():
    states = torch.arange(2 * 2 * 5 * 3, dtype=torch.float64).reshape(2, 2, 5, 3)  # [B, H, N, d_head]
    indices = torch.tensor([[[3, 1], [0, 4]], [[2, 2], [4, 0]]])
    gathered = gather_tokens(states, indices)
    for b in range(2):
        for h in range(2):
            for t in range(2):
                assert torch.equal(gathered[b, h, t], states[b, h, indices[b, h, t]])


def one_hot_attention_qk(targets: list[list[int]], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, H, N, N] with k_j = 20 e_j and q_i = 20 e_target(i): query i attends (almost) only to target(i)."""
    eye = torch.eye(num_tokens, dtype=torch.float64)
    k = (20 * eye).expand(len(targets), -1, -1).unsqueeze(0)
    q = torch.stack([20 * eye[torch.tensor(head)] for head in targets]).unsqueeze(0)
    return q, k


def test_hand_built_attention_selects_the_designed_tokens_per_head_and_rule():
    # Head 0: the CLS query and most others look at token 3, two queries at token 5.
    # Head 1: the CLS query looks at token 2, most others at token 4.
    targets = [[3, 3, 3, 5, 5, 3], [2, 4, 4, 4, 2, 4]]
    q, k = one_hot_attention_qk(targets, num_tokens=6)
    scale = 6**-0.5

    received = received_attention(q, k, scale, "global", block_bytes=2 * 6 * 4 * 4)  # 4 of 6 query rows a block
    expected_received = torch.tensor([[0, 0, 0, 4, 0, 2], [0, 0, 2, 0, 4, 0]], dtype=torch.float32) / 6
    torch.testing.assert_close(received[0], expected_received, atol=1e-6, rtol=0)
    global_top2 = important_token_indices(received, 2)[0]
    assert global_top2.tolist() == [[3, 5], [4, 2]]

    cls_score = received_attention(q, k, scale, "cls")
    torch.testing.assert_close(cls_score[0, :, [3, 2]], torch.eye(2, dtype=torch.float32), atol=1e-6, rtol=0)
    cls_top1 = important_token_indices(cls_score, 1)[0, :, 0]
    global_top1 = global_top2[:, 0]
    assert cls_top1.tolist() == [3, 2]
    assert global_top1.tolist() == [3, 4]
    # The two heads keep different tokens, and on head 1 the two rules disagree.
    assert global_top1[0] != global_top1[1]
    assert cls_top1[1] != global_top1[1]


@pytest.mark.parametrize("block_bytes", [3 * 10 * 4 * 3, 2**20], ids=["3-query-rows", "whole-batch"])
@pytest.mark.parametrize("rule", ["global", "cls"])
def test_received_attention_matches_explicit_softmax_in_blocks(rule, block_bytes):
    generator = torch.Generator().manual_seed(3)
    batch, heads, num_tokens, head_dim = 2, 3, 10, 4
    q = torch.randn(batch, heads, num_tokens, head_dim, generator=generator, dtype=torch.float64) * 2
    k = torch.randn(batch, heads, num_tokens, head_dim, generator=generator, dtype=torch.float64) * 2
    scale = 0.37
    expected = torch.empty(batch, heads, num_tokens, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            attention = torch.softmax(q[b, h] @ k[b, h].T * scale, dim=-1)
            expected[b, h] = attention.mean(dim=0) if rule == "global" else attention[0]
    got = received_attention(q, k, scale, rule, block_bytes)  # 3 rows of 3 heads x 10 tokens: 10 = 3 + 3 + 3 + 1
    assert got.shape == (batch, heads, num_tokens)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    if rule == "global":  # each query row sums to 1, so the mean over queries sums to 1 too
        torch.testing.assert_close(got.sum(-1).double(), torch.ones(batch, heads, dtype=torch.float64))


def test_num_important_tokens_is_int_of_n_times_ratio_and_rejects_zero():
    assert num_important_tokens(17, 0.3) == 5
    assert num_important_tokens(37, 0.3) == 11
    assert num_important_tokens(21, 0.3) == 6
    with pytest.raises(FPTError):
        num_important_tokens(3, 0.2)


# ---------------------------------------------------------------------------------------------------------
# The encoder against a step-by-step run of the ViT
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    return make_vit(seed=0)


def assert_features_match(features, expected_keys, expected_values, expected_indices):
    assert torch.equal(features.token_indices, expected_indices)
    torch.testing.assert_close(features.keys, expected_keys, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(features.values, expected_values, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("importance", ["global", "cls"])
def test_keys_values_and_indices_match_explicit_per_layer_computation(vit, importance):
    tapped = [1, 3]
    encoder = FrozenEncoder(vit, tapped_layers=tapped, token_ratio=0.3, importance=importance)
    pixels = images(32)
    features = encoder(pixels)
    keys, values, indices, kept = reference_features(vit, pixels, tapped, 0.3, importance)
    assert kept == int(17 * 0.3) == 5
    assert features.keys.shape == (2, 2, NUM_HEADS, kept, HEAD_DIM)
    assert features.values.shape == (2, 2, NUM_HEADS, kept, HEAD_DIM)
    assert features.token_indices.shape == (2, 2, NUM_HEADS, kept)
    assert_features_match(features, keys, values, indices)
    # Heads are free to keep different tokens, and here they do.
    per_head_sets = {frozenset(features.token_indices[0, 0, h].tolist()) for h in range(NUM_HEADS)}
    assert len(per_head_sets) > 1


def test_global_and_cls_rules_select_different_tokens_on_the_same_model(vit):
    pixels = images(32)
    by_global = FrozenEncoder(vit, [1, 3], token_ratio=0.3, importance="global")(pixels)
    by_cls = FrozenEncoder(vit, [1, 3], token_ratio=0.3, importance="cls")(pixels)
    assert not torch.equal(by_global.token_indices, by_cls.token_indices)


def test_any_resolution_input_uses_bicubic_resampled_position_embeddings(vit):
    encoder = FrozenEncoder(vit, tapped_layers=[1, 3], token_ratio=0.3)
    small, large = encoder(images(32)), encoder(images(48))
    geometry = LPMGeometry.from_model(vit)
    assert geometry.num_tokens(32) == 1 + 16
    assert geometry.num_tokens(48) == 1 + 36
    assert small.keys.shape[3] == int(17 * 0.3)
    assert large.keys.shape == (2, 2, NUM_HEADS, int(37 * 0.3), HEAD_DIM)
    assert large.token_indices.max() < 37

    keys, values, indices, _ = reference_features(vit, images(48), [1, 3], 0.3, "global")
    assert_features_match(large, keys, values, indices)


@pytest.mark.parametrize("shape", [(36, 36), (32, 48), (30, 30)])
def test_input_that_is_not_a_square_multiple_of_the_patch_size_is_rejected(vit, shape):
    encoder = FrozenEncoder(vit, tapped_layers=[1, 3], token_ratio=0.3)
    with pytest.raises(FPTError):
        encoder(torch.zeros(1, 3, *shape, dtype=torch.float64))


def test_register_tokens_and_layer_scale_count_as_prefix_tokens():
    """With registers as candidates, the selection is the step-by-step reference's over all tokens (by default they
    are not candidates: tests/models/test_lpm_families.py)."""
    model = make_vit(seed=5, reg_tokens=4, init_values=0.1)
    assert model.num_prefix_tokens == 5
    encoder = FrozenEncoder(model, tapped_layers=[0, 2], token_ratio=0.3, importance="cls", select_registers=True)
    assert encoder.geometry.num_prefix_tokens == 5
    assert encoder.geometry.num_tokens(32) == 5 + 16
    pixels = images(32, seed=6)
    features = encoder(pixels)
    keys, values, indices, kept = reference_features(model, pixels, [0, 2], 0.3, "cls")
    assert kept == int(21 * 0.3)
    assert features.keys.shape == (2, 2, NUM_HEADS, kept, HEAD_DIM)
    assert_features_match(features, keys, values, indices)


def test_the_encoder_stops_once_the_last_tapped_keys_and_values_are_read(vit):
    """Neither the last tapped block's attention and MLP nor the blocks after it are run."""
    calls: list[str] = []
    hooks = [
        module.register_forward_hook(lambda module, inputs, output, name=name: calls.append(name))
        for index, block in enumerate(vit.blocks)
        for name, module in (
            (f"qkv{index}", block.attn.qkv),
            (f"proj{index}", block.attn.proj),
            (f"mlp{index}", block.mlp),
        )
    ]
    try:
        FrozenEncoder(vit, tapped_layers=[1], token_ratio=0.3)(images(32))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == ["qkv0", "proj0", "mlp0", "qkv1"]


def test_encoder_stays_in_eval_mode_and_returns_no_gradient():
    # Dropout, attention dropout and drop-path would all randomise the output if they were active.
    model = make_vit(
        seed=2, drop_rate=0.5, pos_drop_rate=0.5, proj_drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5
    )
    encoder = FrozenEncoder(model, tapped_layers=[1, 3], token_ratio=0.3)
    encoder.train()
    assert not encoder.training
    assert not any(module.training for module in encoder.modules())
    assert not any(param.requires_grad for param in encoder.parameters())

    pixels = images(32).requires_grad_(True)
    first, second = encoder(pixels), encoder(pixels)
    assert torch.equal(first.keys, second.keys)
    assert torch.equal(first.values, second.values)
    assert torch.equal(first.token_indices, second.token_indices)
    assert not first.keys.requires_grad
    assert not first.values.requires_grad
    assert first.keys.grad_fn is None

    # The same numbers as the explicit, dropout-free computation.
    with torch.no_grad():
        keys, values, indices, _ = reference_features(model, pixels.detach(), [1, 3], 0.3, "global")
    assert_features_match(first, keys, values, indices)


def test_a_fresh_encoder_reports_eval_mode_even_around_a_model_in_training_mode():
    model = make_vit(seed=3).train()
    assert model.training
    encoder = FrozenEncoder(model, tapped_layers=[1, 3], token_ratio=0.3)
    assert encoder.training is False
    assert not any(module.training for module in encoder.modules())


def test_an_lpm_built_without_dynamic_img_size_is_rejected():
    model = make_vit(dynamic_img_size=False)
    assert not model.dynamic_img_size
    with pytest.raises(FPTError, match="dynamic_img_size"):
        FrozenEncoder(model, tapped_layers=[1, 3], token_ratio=0.3)


@pytest.mark.parametrize("tapped", [[], [2, 1], [1, 1], [4], [-1]])
def test_invalid_tapped_layers_are_rejected(vit, tapped):
    with pytest.raises(FPTError):
        FrozenEncoder(vit, tapped_layers=tapped)


def test_unknown_importance_rule_is_rejected(vit):
    with pytest.raises(FPTError):
        FrozenEncoder(vit, tapped_layers=[1], importance="mean")  # type: ignore[arg-type]
