"""The lightweight side network: a small pre-norm ViT, trained from scratch on a down-sampled view.

At side layer i the fused prompts O_i [B, M, d_side] are appended after the CLS and patch tokens (with no
position embedding), the block runs on the concatenation, and the prompt outputs are dropped.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fpt.config import ATTENTION_INITS, AttentionInit
from fpt.errors import FPTError

SIDE_LAYER_NORM_EPS = 1e-12


class RecomputedActivationMlp(Mlp):
    """timm's Mlp whose activation output [B, N, hidden] is recomputed in backward instead of kept.

    It is the largest activation of a side block. The price is one more GELU and ``fc2`` forward per block
    in backward, small for the side network; weights and results are those of ``Mlp``.
    """

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.fc1(x)
        if torch.is_grad_enabled():
            return checkpoint(self._after_fc1, hidden, use_reentrant=False)
        return self._after_fc1(hidden)

    def _after_fc1(self, hidden: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(hidden)))))


class SideViT(nn.Module):
    """Pre-norm ViT with a CLS token, learned position embeddings, exact-GELU MLPs and a linear head.

    Args:
        img_size: side input size in pixels (square).
        patch_size: patch size (the LPM's).
        embed_dim: width d_side.
        depth: number of blocks (the number of tapped LPM layers).
        num_heads: attention heads (the LPM's).
        num_classes: classifier outputs.
        mlp_ratio: MLP hidden width / embed_dim.
        in_chans: image channels.
        attention_init: initialisation of the blocks' attention projections (qkv and output): "xavier"
            (Xavier-uniform) or "trunc_normal" (std 0.02, like every other weight; the official code's).

    ``grad_checkpointing`` (off at construction) recomputes each block in backward instead of keeping its
    activations: the same results for about half of FPT's training-step memory and a slower step.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        num_classes: int,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        attention_init: AttentionInit = "xavier",
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise FPTError(f"side width {embed_dim} is not divisible by {num_heads} heads")
        if attention_init not in ATTENTION_INITS:
            raise FPTError(f"attention init must be one of {', '.join(ATTENTION_INITS)}, got '{attention_init}'")
        norm_layer = partial(nn.LayerNorm, eps=SIDE_LAYER_NORM_EPS)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=True,
                act_layer=nn.GELU,
                norm_layer=norm_layer,
                mlp_layer=RecomputedActivationMlp,
            )
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.grad_checkpointing = False
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if attention_init == "xavier":
            # at std 0.02 the path from the fused prompts to the CLS token is a product of tiny weights, and the
            # loss sits at the class prior for epochs before the prompts are used (BENCHMARKS.md, issue 10)
            for block in self.blocks:
                nn.init.xavier_uniform_(block.attn.qkv.weight)
                nn.init.xavier_uniform_(block.attn.proj.weight)

    def forward(self, images: Tensor, prompts: Tensor | None = None) -> Tensor:
        """images [B, C, S, S], fused prompts [B, depth, M, d_side] or None (no prompts) -> logits [B, K]."""
        if prompts is not None and prompts.shape[1] != len(self.blocks):
            raise FPTError(f"got prompts for {prompts.shape[1]} layers but the side network has {len(self.blocks)}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            layer_prompts = None if prompts is None else prompts[:, index]
            if recompute:
                x = checkpoint(_run_block, block, x, layer_prompts, use_reentrant=False)
            else:
                x = _run_block(block, x, layer_prompts)
        return self.head(self.norm(x[:, 0]))


def _run_block(block: Block, x: Tensor, prompts: Tensor | None) -> Tensor:
    """One side block on tokens x [B, N, d_side], with the layer's fused prompts [B, M, d_side] appended for the
    block and dropped after it -> [B, N, d_side]."""
    if prompts is None:
        return block(x)
    return block(torch.cat([x, prompts], dim=1))[:, : x.shape[1]]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
