"""The LPM families fpt runs, and how each one's attention is read at a tapped block.

Every LPM is a timm model of one of two families:

- ``VisionTransformer``: plain ViTs, DINOv2 (with or without register tokens), UNI/Virchow/H-optimus/RETFound
  class models (LayerScale, SwiGLU MLPs, ``no_embed_class``), SigLIP-class models without a CLS token, and the
  Hugging Face ViT, DINOv2 and SigLIP checkpoints, which ``fpt.models.backbone`` converts to it at load time;
- ``Eva``: DINOv3-class models, whose attention rotates queries and keys with RoPE.

``tap_attention`` is the only place that knows the difference: it calls back with the per-head queries, keys and
values exactly as the block's attention uses them (after q/k norm, after RoPE).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fpt.errors import BackboneError

LPM = VisionTransformer | Eva
LPM_FAMILIES = (VisionTransformer, Eva)

# q, k, v: [B, H, N, d_head], as the attention uses them; scale: the attention's 1/sqrt(d_head)
QKVCallback = Callable[[Tensor, Tensor, Tensor, float], None]


def check_supported(model: nn.Module, name: str) -> None:
    """Raise, naming the block, unless ``model`` is a family fpt can read the attention of."""
    if not isinstance(model, LPM_FAMILIES):
        raise BackboneError(
            f"backbone '{name}' is a {type(model).__name__}; fpt runs timm VisionTransformer models (ViT, DeiT, "
            "DINOv2, UNI, RETFound, SigLIP) and timm Eva models (DINOv3)"
        )
    for index, block in enumerate(model.blocks):
        if not isinstance(getattr(block, "attn", None), (Attention, EvaAttention)):
            raise BackboneError(
                f"backbone '{name}': block {index} has a {type(getattr(block, 'attn', None)).__name__} attention, "
                "which fpt cannot read the keys and values of; it reads timm's Attention and EvaAttention"
            )


def has_class_token(model: LPM) -> bool:
    """True when the LPM prepends a CLS token (position 0 of its token sequence)."""
    return getattr(model, "cls_token", None) is not None


def register_positions(model: LPM) -> range:
    """Positions of the register tokens in the LPM's token sequence: right after the CLS token (other prefix
    tokens, such as a distilled DeiT's distillation token, are not registers)."""
    registers = getattr(model, "reg_token", None)
    start = int(has_class_token(model))
    return range(start, start + (registers.shape[1] if registers is not None else 0))


def tap_attention(attn: nn.Module, callback: QKVCallback) -> RemovableHandle:
    """Call ``callback(q, k, v, scale)`` on every forward of the attention module ``attn``; remove the returned
    handle to stop."""
    if isinstance(attn, Attention):
        # the fused projection's output is exactly what the attention splits into q, k, v: nothing is recomputed
        def on_qkv(module: nn.Module, inputs: tuple[Tensor], qkv: Tensor) -> None:
            batch, num_tokens, _ = qkv.shape
            q, k, v = qkv.reshape(batch, num_tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            callback(attn.q_norm(q), attn.k_norm(k), v, attn.scale)

        return attn.qkv.register_forward_hook(on_qkv)
    if isinstance(attn, EvaAttention):
        # Eva's projection may bypass its qkv module (F.linear with a concatenated bias), and RoPE is applied inside
        # the forward: q, k, v are recomputed from the block's input with the module's own weights (one extra
        # projection per tapped block)
        def on_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["x"]
            rope = kwargs.get("rope", args[1] if len(args) > 1 else None)
            callback(*eva_qkv(attn, x, rope), attn.scale)

        return attn.register_forward_pre_hook(on_input, with_kwargs=True)
    raise BackboneError(f"fpt cannot read the keys and values of a {type(attn).__name__}")


def eva_qkv(attn: EvaAttention, x: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The queries, keys and values ``attn`` computes from its input x [B, N, d]: each [B, H, N, d_head], q and k
    normalised and rotated (every token after the prefix tokens) as the attention itself does."""
    batch, num_tokens, _ = x.shape
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        elif attn.qkv_bias_separate:
            qkv = attn.qkv(x) + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        else:
            qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(batch, num_tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (
            projection(x).reshape(batch, num_tokens, attn.num_heads, -1).transpose(1, 2)
            for projection in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        prefix, half = attn.num_prefix_tokens, attn.rotate_half
        q, k = (
            torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=half)], 2).type_as(v)
            for t in (q, k)
        )
    return q, k, v
