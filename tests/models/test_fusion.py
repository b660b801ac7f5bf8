"""FPT and FPT+ fusion: prompts cross-attend to the LPM's keys/values, checked against explicit per-head loops."""

from __future__ import annotations

import math

import pytest
import torch

from fpt.bench.memory import measure_training_step, simulate_training_step
from fpt.errors import FPTError
from fpt.models.fusion import FPTFusion, FPTPlusFusion, PromptCrossAttention
from tests.conftest import explicit_layer_norm, randomize_

BATCH, LAYERS, PROMPTS, TOKENS = 2, 3, 5, 7
LPM_DIM, HEADS = 32, 4
HEAD_DIM = LPM_DIM // HEADS
SIDE_DIM = LPM_DIM // 8


def make_fusion(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    if kind == "fpt":
        fusion = FPTFusion(LAYERS, PROMPTS, lpm_dim=LPM_DIM, num_heads=HEADS, side_dim=SIDE_DIM)
    else:
        fusion = FPTPlusFusion(LAYERS, PROMPTS, lpm_dim=LPM_DIM, num_heads=HEADS, side_dim=SIDE_DIM)
    return randomize_(fusion.to(dtype), seed=seed).eval()


def lpm_keys_values(seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, LAYERS, HEADS, TOKENS, HEAD_DIM)
    keys = torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5
    values = torch.randn(shape, generator=generator, dtype=torch.float64) + 0.3
    return keys.to(dtype), values.to(dtype)


def explicit_queries(fusion) -> torch.Tensor:
    """Q [L, M, d]: FPT ``P W_up + b_up``; FPT+ ``LayerNorm(P)``."""
    prompts = fusion.prompts
    if isinstance(fusion, FPTFusion):
        return prompts @ fusion.up_proj.weight.T + fusion.up_proj.bias
    return explicit_layer_norm(prompts, fusion.norm.weight, fusion.norm.bias, 1e-5)


def explicit_attention_and_context(fusion, keys, values) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer, per-head ``A_h = softmax(Q_h K_hᵀ / sqrt(d_head))`` [B, L, H, M, T] and ``C = concat_h A_h V_h``."""
    queries = explicit_queries(fusion)
    weights = torch.empty(BATCH, LAYERS, HEADS, PROMPTS, TOKENS, dtype=queries.dtype)
    context = torch.empty(BATCH, LAYERS, PROMPTS, LPM_DIM, dtype=queries.dtype)
    for b in range(BATCH):
        for layer in range(LAYERS):
            for h in range(HEADS):
                head = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                q = queries[layer, :, head]  # [M, d_head]
                k, v = keys[b, layer, h].to(q.dtype), values[b, layer, h].to(q.dtype)  # [T, d_head]
                attention = torch.softmax(q @ k.T / math.sqrt(HEAD_DIM), dim=-1)
                weights[b, layer, h] = attention
                context[b, layer, :, head] = attention @ v
    return weights, context


def explicit_output(fusion, keys, values) -> torch.Tensor:
    """O [B, L, M, d_side] in eval mode: FPT ``C W_out + b_out + P``; FPT+ ``(C + P) W_out + b_out``."""
    _, context = explicit_attention_and_context(fusion, keys, values)
    out_weight, out_bias = fusion.out_proj.weight, fusion.out_proj.bias
    prompts = fusion.prompts
    result = torch.empty(BATCH, LAYERS, PROMPTS, SIDE_DIM, dtype=context.dtype)
    for b in range(BATCH):
        for layer in range(LAYERS):
            c, p = context[b, layer], prompts[layer]
            if isinstance(fusion, FPTFusion):
                result[b, layer] = c @ out_weight.T + out_bias + p
            else:
                result[b, layer] = (c + p) @ out_weight.T + out_bias
    return result


@pytest.mark.parametrize("kind", ["fpt", "fpt+"])
def test_fused_prompts_match_explicit_per_layer_per_head_computation(kind):
    fusion = make_fusion(kind)
    keys, values = lpm_keys_values()
    out = fusion(keys, values)
    assert out.shape == (BATCH, LAYERS, PROMPTS, SIDE_DIM)
    torch.testing.assert_close(out, explicit_output(fusion, keys, values), atol=1e-10, rtol=1e-10)


def test_fpt_prompts_have_side_width_and_are_up_projected_to_the_lpm_width():
    fusion = FPTFusion(LAYERS, PROMPTS, lpm_dim=LPM_DIM, num_heads=HEADS, side_dim=SIDE_DIM)
    assert fusion.prompts.shape == (LAYERS, PROMPTS, LPM_DIM // 8)
    assert fusion.up_proj.weight.shape == (LPM_DIM, SIDE_DIM)
    assert fusion.out_proj.weight.shape == (SIDE_DIM, LPM_DIM)
    # One shared projection per model, not one per layer.
    assert sum(isinstance(m, torch.nn.Linear) for m in fusion.modules()) == 2
    assert fusion.dropout.p == 0.5


def test_fpt_plus_prompts_have_lpm_width_and_an_affine_layer_norm():
    fusion = FPTPlusFusion(LAYERS, PROMPTS, lpm_dim=LPM_DIM, num_heads=HEADS, side_dim=SIDE_DIM)
    assert fusion.prompts.shape == (LAYERS, PROMPTS, LPM_DIM)
    assert fusion.norm.eps == 1e-5
    assert fusion.norm.elementwise_affine
    assert fusion.out_proj.weight.shape == (SIDE_DIM, LPM_DIM)
    assert sum(isinstance(m, torch.nn.Linear) for m in fusion.modules()) == 1
    assert not hasattr(fusion, "up_proj")
    assert fusion.dropout.p == 0.5


@pytest.mark.parametrize("fusion_class", [FPTFusion, FPTPlusFusion])
def test_fresh_prompts_are_initialised_normal_with_std_1e_6(fusion_class):
    torch.manual_seed(0)
    fusion = fusion_class(4, 16, lpm_dim=64, num_heads=4, side_dim=8)
    prompts = fusion.prompts.detach()
    assert 0.7e-6 < prompts.std().item() < 1.4e-6
    assert abs(prompts.mean().item()) < 3e-7
    assert prompts.abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", ["fpt", "fpt+"])
def test_float16_keys_values_are_accepted_and_close_to_float32(kind):
    fusion = make_fusion(kind, dtype=torch.float32)
    keys, values = lpm_keys_values(dtype=torch.float32)
    reference = fusion(keys, values)
    half = fusion(keys.half(), values.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, reference, atol=2e-2, rtol=2e-2)
    # Exactly what float32 gives on the half-rounded inputs: the cache is only upcast.
    torch.testing.assert_close(half, fusion(keys.half().float(), values.half().float()), atol=1e-5, rtol=1e-5)
    weights = fusion.attention_weights(keys.half())
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, fusion.attention_weights(keys), atol=2e-2, rtol=0)


@pytest.mark.parametrize("kind", ["fpt", "fpt+"])
def test_attention_weights_are_the_per_head_softmax_and_reproduce_the_context(kind):
    fusion = make_fusion(kind)
    keys, values = lpm_keys_values()
    weights = fusion.attention_weights(keys)
    assert weights.shape == (BATCH, LAYERS, HEADS, PROMPTS, TOKENS)
    torch.testing.assert_close(weights.sum(-1), torch.ones(BATCH, LAYERS, HEADS, PROMPTS, dtype=torch.float64))
    expected_weights, expected_context = explicit_attention_and_context(fusion, keys, values)
    torch.testing.assert_close(weights, expected_weights, atol=1e-12, rtol=1e-10)

    per_head = weights @ values  # [B, L, H, M, d_head]
    for h in range(HEADS):
        head = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        torch.testing.assert_close(per_head[:, :, h], expected_context[..., head], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fusion.cross_attention(keys, values), expected_context, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["fpt", "fpt+"])
def test_dropout_in_train_mode_zeroes_about_half_and_rescales_the_rest(kind):
    fusion = make_fusion(kind)
    keys, values = lpm_keys_values()
    expected = fusion(keys, values)  # eval: dropout off
    assert (expected != 0).all()
    fusion.train()
    torch.manual_seed(0)
    dropped = torch.cat([fusion(keys, values) for _ in range(20)])  # 20 * 120 outputs
    zero_fraction = (dropped == 0).double().mean().item()
    assert 0.45 < zero_fraction < 0.55
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * expected.repeat(20, 1, 1, 1)[kept])


@pytest.mark.parametrize("kind", ["fpt", "fpt+"])
def test_gradients_reach_prompts_and_projections(kind):
    fusion = make_fusion(kind)
    keys, values = lpm_keys_values()
    fusion(keys, values).pow(2).sum().backward()
    for name, param in fusion.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_cross_attention_gradients_pass_gradcheck_and_keys_get_none() -> None:
    generator = torch.Generator().manual_seed(3)
    queries = torch.randn(LAYERS, HEADS, PROMPTS, HEAD_DIM, generator=generator, dtype=torch.float64)
    keys, values = lpm_keys_values()
    queries.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: PromptCrossAttention.apply(q, keys, values, None, None), (queries,))
    with pytest.raises(FPTError, match="must not require gradients"):
        PromptCrossAttention.apply(queries, keys.requires_grad_(True), values, None, None)


@pytest.mark.parametrize("kind", ["fpt", "fpt+"])
def test_prompt_gradients_from_a_float16_cache_match_the_explicit_computation(kind: str) -> None:
    fusion = make_fusion(kind, dtype=torch.float32)
    keys, values = lpm_keys_values(dtype=torch.float16)
    torch.manual_seed(0)
    upstream = torch.randn(BATCH, LAYERS, PROMPTS, SIDE_DIM)
    got = torch.autograd.grad((fusion(keys, values) * upstream).sum(), fusion.prompts)[0]
    want = torch.autograd.grad((explicit_output(fusion, keys, values) * upstream).sum(), fusion.prompts)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_cross_attention_never_holds_a_whole_float32_copy_of_the_cache() -> None:
    """Peak bytes of a training step stay below one float32 copy of the float16 keys and values."""
    layers, heads, tokens, head_dim = 6, 4, 200, 16
    queries = torch.nn.ParameterList([torch.randn(layers, heads, PROMPTS, head_dim)])
    keys = torch.randn(8, layers, heads, tokens, head_dim).half()
    values = torch.randn_like(keys)

    def loss(module: torch.nn.ParameterList, inputs) -> torch.Tensor:
        return PromptCrossAttention.apply(module[0], *inputs, None, None).square().sum()

    for meter in (measure_training_step, simulate_training_step):
        memory = meter(queries, loss, [keys, values])
        cache_bytes = keys.nbytes + values.nbytes  # a float32 copy would be twice this
        assert memory.peak_bytes - memory.baseline_bytes < cache_bytes


def test_cross_attention_gives_no_silently_wrong_second_derivative() -> None:
    queries = torch.randn(LAYERS, HEADS, PROMPTS, HEAD_DIM, dtype=torch.float64, requires_grad=True)
    keys, values = lpm_keys_values()
    output = PromptCrossAttention.apply(queries, keys, values, None, None).square().sum()
    (gradient,) = torch.autograd.grad(output, queries, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        gradient.sum().backward()


@pytest.mark.parametrize("kind", ["fpt", "fpt+"])
def test_prompt_similarity_is_one_for_identical_prompts_and_zero_for_orthogonal_ones(kind: str) -> None:
    fusion = make_fusion(kind)
    layers, num_prompts, width = fusion.prompts.shape
    with torch.no_grad():
        fusion.prompts.copy_(torch.randn(layers, 1, width).expand(-1, num_prompts, -1))
        fusion.prompts[1] = torch.eye(num_prompts, width, dtype=fusion.prompts.dtype)
    similarity = fusion.prompt_similarity()
    assert similarity.shape == (layers,)
    torch.testing.assert_close(similarity[0], torch.tensor(1.0, dtype=torch.float32))
    torch.testing.assert_close(similarity[1], torch.tensor(0.0, dtype=torch.float32))


@pytest.mark.parametrize("kind", ["fpt", "fpt+"])
def test_attention_entropy_is_one_when_uniform_and_matches_the_explicit_entropy(kind: str) -> None:
    fusion = make_fusion(kind)
    keys, values = lpm_keys_values()
    assert torch.allclose(fusion.attention_entropy(torch.zeros_like(keys)), torch.ones(LAYERS))
    weights, _ = explicit_attention_and_context(fusion, keys, values)  # [B, L, H, M, T]
    explicit = torch.stack(
        [-(weights[:, layer] * weights[:, layer].log()).sum(-1).mean() / math.log(TOKENS) for layer in range(LAYERS)]
    )
    torch.testing.assert_close(fusion.attention_entropy(keys), explicit.float(), rtol=1e-5, atol=1e-6)
    assert (fusion.attention_entropy(keys) < 1).all()
