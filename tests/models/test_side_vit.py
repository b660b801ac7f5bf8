"""The side ViT: a pre-norm ViT whose blocks also see the fused prompts, checked against an explicit forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp

from fpt.bench.memory import simulate_training_step
from fpt.errors import FPTError
from fpt.models.side_vit import RecomputedActivationMlp, SideViT
from tests.conftest import explicit_layer_norm, randomize_

BATCH, IMG, PATCH, WIDTH, HEADS, DEPTH, CLASSES, PROMPTS = 2, 16, 8, 12, 3, 2, 5, 4
HEAD_DIM = WIDTH // HEADS
SIDE_EPS = 1e-12  # the side ViT's LayerNorm epsilon, stated independently of the code under test


def make_side(seed: int = 0) -> SideViT:
    side = SideViT(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES)
    return randomize_(side.double(), seed=seed).eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(BATCH, 3, IMG, IMG, generator=generator, dtype=torch.float64)
    prompts = torch.randn(BATCH, DEPTH, PROMPTS, WIDTH, generator=generator, dtype=torch.float64) * 2
    return pixels, prompts


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention(x, attn):
    d = WIDTH
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q_all = x @ weight[:d].T + bias[:d]
    k_all = x @ weight[d : 2 * d].T + bias[d : 2 * d]
    v_all = x @ weight[2 * d :].T + bias[2 * d :]
    context = torch.empty_like(x)
    for b in range(x.shape[0]):
        for h in range(HEADS):
            head = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            scores = q_all[b, :, head] @ k_all[b, :, head].T / math.sqrt(HEAD_DIM)
            context[b, :, head] = torch.softmax(scores, dim=-1) @ v_all[b, :, head]
    return context @ attn.proj.weight.T + attn.proj.bias


def block_forward(x, block):
    x = x + attention(explicit_layer_norm(x, block.norm1.weight, block.norm1.bias, SIDE_EPS), block.attn)
    x_hat = explicit_layer_norm(x, block.norm2.weight, block.norm2.bias, SIDE_EPS)
    hidden = gelu(x_hat @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    return x + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def explicit_forward(side: SideViT, pixels: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
    batch = pixels.shape[0]
    patches = F.unfold(pixels, kernel_size=PATCH, stride=PATCH).transpose(1, 2)  # [B, n, C*p*p], (C, kh, kw) order
    conv = side.patch_embed.proj
    tokens = patches @ conv.weight.reshape(WIDTH, -1).T + conv.bias
    x = torch.cat([side.cls_token.expand(batch, 1, WIDTH), tokens], dim=1) + side.pos_embed
    num_tokens = x.shape[1]
    for index, block in enumerate(side.blocks):
        if prompts is not None:
            x = torch.cat([x, prompts[:, index]], dim=1)  # appended after CLS and patches, no position embedding
        x = block_forward(x, block)[:, :num_tokens]  # prompt outputs dropped
    cls = explicit_layer_norm(x, side.norm.weight, side.norm.bias, SIDE_EPS)[:, 0]
    return cls @ side.head.weight.T + side.head.bias


def test_forward_with_prompts_matches_explicit_computation():
    side = make_side()
    pixels, prompts = inputs()
    logits = side(pixels, prompts)
    assert logits.shape == (BATCH, CLASSES)
    torch.testing.assert_close(logits, explicit_forward(side, pixels, prompts), atol=1e-10, rtol=1e-10)


def test_forward_without_prompts_is_the_plain_side_vit():
    side = make_side()
    pixels, _ = inputs()
    logits = side(pixels, None)
    torch.testing.assert_close(logits, explicit_forward(side, pixels, None), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(side(pixels), logits, atol=0, rtol=0)


def test_prompts_change_the_output_and_each_layer_uses_its_own_prompts():
    side = make_side()
    pixels, prompts = inputs()
    with_prompts = side(pixels, prompts)
    assert not torch.allclose(with_prompts, side(pixels, None), atol=1e-6)
    other = inputs(seed=2)[1]
    assert not torch.allclose(with_prompts, side(pixels, other), atol=1e-6)
    # The prompts enter only through the blocks' LayerNorm, so a positive rescaling is invisible.
    torch.testing.assert_close(side(pixels, 1.5 * prompts), with_prompts, atol=1e-9, rtol=1e-9)
    swapped = prompts.flip(1)  # layer 0 gets layer 1's prompts and vice versa
    assert not torch.allclose(with_prompts, side(pixels, swapped), atol=1e-6)
    torch.testing.assert_close(side(pixels, swapped), explicit_forward(side, pixels, swapped), atol=1e-10, rtol=1e-10)


def test_prompt_count_does_not_change_the_token_count_and_one_prompt_works():
    side = make_side()
    pixels, prompts = inputs()
    one = prompts[:, :, :1]
    torch.testing.assert_close(side(pixels, one), explicit_forward(side, pixels, one), atol=1e-10, rtol=1e-10)


def test_prompts_for_the_wrong_number_of_layers_are_rejected():
    side = make_side()
    pixels, prompts = inputs()
    with pytest.raises(FPTError):
        side(pixels, prompts[:, :1])


def test_width_not_divisible_by_heads_is_rejected():
    with pytest.raises(FPTError):
        SideViT(img_size=IMG, patch_size=PATCH, embed_dim=10, depth=1, num_heads=3, num_classes=2)
    with pytest.raises(FPTError, match="attention init must be one of xavier, trunc_normal, got 'kaiming'"):
        SideViT(IMG, PATCH, embed_dim=12, depth=1, num_heads=3, num_classes=2, attention_init="kaiming")


def test_architecture_is_pre_norm_exact_gelu_no_dropout_with_depth_and_heads_as_given():
    side = SideViT(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=4, num_classes=7)
    assert len(side.blocks) == 3
    assert side.pos_embed.shape == (1, 1 + 16, 24)
    assert side.cls_token.shape == (1, 1, 24)
    assert side.head.weight.shape == (7, 24)
    norms = [m for m in side.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 3 + 1
    assert all(norm.eps == 1e-12 and norm.elementwise_affine for norm in norms)
    for block in side.blocks:
        assert block.attn.num_heads == 4
        assert block.mlp.fc1.weight.shape == (4 * 24, 24)
        assert isinstance(block.mlp.act, torch.nn.GELU)
        assert block.mlp.act.approximate == "none"
        assert isinstance(block.ls1, torch.nn.Identity)
        assert isinstance(block.drop_path1, torch.nn.Identity)
    dropouts = [m for m in side.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(d.p == 0 for d in dropouts)
    # No dropout: train and eval modes agree.
    pixels = torch.randn(2, 3, 32, 32)
    side.train()
    train_out = side(pixels)
    side.eval()
    torch.testing.assert_close(train_out, side(pixels))


@pytest.mark.parametrize("attention_init", ["trunc_normal", "xavier"])
def test_fresh_init_is_trunc_normal_002_with_zero_biases_and_the_attention_as_asked(attention_init: str):
    torch.manual_seed(0)
    side = SideViT(
        img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=4, num_classes=10, attention_init=attention_init
    )
    attention = {f"blocks.{i}.attn.{name}" for i in range(2) for name in ("qkv", "proj")}
    for name, module in side.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            weight = module.weight.detach()
            if name in attention and attention_init == "xavier":  # uniform on ±sqrt(6 / (fan_in + fan_out))
                expected = (6 / sum(weight.shape)) ** 0.5 / 3**0.5
                assert 0.95 * expected < weight.std().item() < 1.05 * expected, name
                assert weight.abs().max().item() <= (6 / sum(weight.shape)) ** 0.5, name
            else:
                assert 0.017 < weight.std().item() < 0.023, name
            assert torch.count_nonzero(module.bias) == 0, name
        elif isinstance(module, torch.nn.LayerNorm):
            assert module.eps == 1e-12, name
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.count_nonzero(module.bias) == 0, name
    for embedding in (side.cls_token, side.pos_embed):
        assert 0.012 < embedding.detach().std().item() < 0.028


def test_recomputed_activation_mlp_matches_timms_mlp_and_keeps_less() -> None:
    torch.manual_seed(0)
    recomputed = RecomputedActivationMlp(32, 128)
    reference = Mlp(32, 128)
    reference.load_state_dict(recomputed.state_dict())
    x = torch.randn(4, 10, 32)
    outputs, gradients = [], []
    for mlp in (recomputed, reference):
        output = mlp(x)
        output.square().sum().backward()
        outputs.append(output.detach())
        gradients.append([p.grad for p in mlp.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1])
    for got, want in zip(*gradients, strict=True):
        torch.testing.assert_close(got, want)

    def peak(mlp_class: type[Mlp]) -> int:
        stack = torch.nn.Sequential(*(mlp_class(32, 128) for _ in range(4)))  # activations pile up across layers
        tokens = torch.randn(64, 10, 32)
        return simulate_training_step(stack, lambda m, inputs: m(*inputs).square().sum(), [tokens]).peak_bytes

    activation_bytes = 64 * 10 * 128 * 4  # one GELU output, float32
    assert peak(RecomputedActivationMlp) <= peak(Mlp) - 2 * activation_bytes


def test_grad_checkpointing_gives_the_same_outputs_and_gradients_and_keeps_less() -> None:
    pixels, prompts = inputs()
    results = []
    for recompute in (False, True):
        side = make_side().train()
        side.grad_checkpointing = recompute
        leaf = prompts.clone().requires_grad_()
        output = side(pixels, leaf)
        output.square().sum().backward()
        results.append((output.detach(), leaf.grad, [p.grad for p in side.parameters()]))
    (plain_output, plain_prompt_grad, plain_grads), (output, prompt_grad, grads) = results
    torch.testing.assert_close(output, plain_output, rtol=0, atol=1e-12)
    torch.testing.assert_close(prompt_grad, plain_prompt_grad, rtol=0, atol=1e-12)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    def peak(recompute: bool) -> int:
        side = SideViT(img_size=64, patch_size=8, embed_dim=24, depth=4, num_heads=3, num_classes=CLASSES)
        side.grad_checkpointing = recompute
        images = torch.randn(8, 3, 64, 64)
        block_prompts = torch.randn(8, 4, PROMPTS, 24)
        step_inputs = [images, block_prompts]
        return simulate_training_step(side, lambda m, batch: m(*batch).square().sum(), step_inputs).peak_bytes

    tokens_bytes = 8 * (65 + PROMPTS) * 24 * 4  # one block's input, float32
    assert peak(True) <= peak(False) - 4 * tokens_bytes
