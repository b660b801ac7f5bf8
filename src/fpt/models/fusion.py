"""Fusion modules: learnable fine-grained prompts that cross-attend to the LPM's keys and values.

Prompts are per tapped layer; the projections are shared across layers. There are no learned key or
value projections: the LPM's own keys and values are attended to as they are.

Shapes: L tapped layers, M prompts, d the LPM width, H its heads, d_side the side network's width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PromptFusion(nn.Module, ABC):
    """Cross-attention ``C = concat_h softmax(Q_h K_hᵀ / sqrt(d_head)) V_h`` from prompt queries to LPM tokens.

    Subclasses define the queries ``Q`` [L, M, d] from the prompts and the output ``O`` [B, L, M, d_side].
    """

    def __init__(
        self,
        num_layers: int,
        num_prompts: int,
        prompt_dim: int,
        lpm_dim: int,
        num_heads: int,
        side_dim: int,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.prompts = nn.Parameter(torch.empty(num_layers, num_prompts, prompt_dim))
        nn.init.normal_(self.prompts, std=1e-6)
        self.out_proj = nn.Linear(lpm_dim, side_dim)
        self.dropout = nn.Dropout(dropout)

    @abstractmethod
    def queries(self) -> Tensor:
        """Prompt queries Q, [L, M, d]."""

    @abstractmethod
    def output(self, context: Tensor) -> Tensor:
        """Fused prompts O [B, L, M, d_side] from the attended context C [B, L, M, d]."""

    def cross_attention(self, keys: Tensor, values: Tensor) -> Tensor:
        """C [B, L, M, d] from keys/values [B, L, H, T, d_head] (any float dtype, e.g. a float16 cache)."""
        batch, num_layers, num_heads, num_tokens, head_dim = keys.shape
        queries = self.queries()
        num_prompts = queries.shape[1]
        q = queries.view(num_layers, num_prompts, num_heads, head_dim).transpose(1, 2)
        q = q.expand(batch, -1, -1, -1, -1).reshape(batch * num_layers, num_heads, num_prompts, head_dim)
        k = keys.to(q.dtype).reshape(batch * num_layers, num_heads, num_tokens, head_dim)
        v = values.to(q.dtype).reshape(batch * num_layers, num_heads, num_tokens, head_dim)
        context = F.scaled_dot_product_attention(q, k, v)
        return context.view(batch, num_layers, num_heads, num_prompts, head_dim).transpose(2, 3).flatten(3)

    def attention_weights(self, keys: Tensor) -> Tensor:
        """softmax(Q_h K_hᵀ / sqrt(d_head)), [B, L, H, M, T]: where each prompt looks."""
        num_layers, num_prompts, _ = self.prompts.shape
        head_dim = keys.shape[-1]
        q = self.queries().view(num_layers, num_prompts, self.num_heads, head_dim).transpose(1, 2)
        return torch.softmax(q @ keys.to(q.dtype).transpose(-2, -1) * head_dim**-0.5, dim=-1)

    def forward(self, keys: Tensor, values: Tensor) -> Tensor:
        """keys/values [B, L, H, T, d_head] -> fused prompts [B, L, M, d_side]."""
        return self.output(self.cross_attention(keys, values))


class FPTFusion(PromptFusion):
    """FPT: prompts of width d/8, ``Q = P W_up + b_up`` (d/8 -> d), ``O = Dropout(C W_out + b_out + P)``."""

    def __init__(
        self,
        num_layers: int,
        num_prompts: int,
        lpm_dim: int,
        num_heads: int,
        side_dim: int,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(num_layers, num_prompts, side_dim, lpm_dim, num_heads, side_dim, dropout)
        self.up_proj = nn.Linear(side_dim, lpm_dim)

    def queries(self) -> Tensor:
        return self.up_proj(self.prompts)

    def output(self, context: Tensor) -> Tensor:
        return self.dropout(self.out_proj(context) + self.prompts)


class FPTPlusFusion(PromptFusion):
    """FPT+: prompts of width d, ``Q = LayerNorm(P)``, ``O = Dropout((C + P) W_out + b_out)``."""

    def __init__(
        self,
        num_layers: int,
        num_prompts: int,
        lpm_dim: int,
        num_heads: int,
        side_dim: int,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(num_layers, num_prompts, lpm_dim, lpm_dim, num_heads, side_dim, dropout)
        self.norm = nn.LayerNorm(lpm_dim, eps=1e-5)

    def queries(self) -> Tensor:
        return self.norm(self.prompts)

    def output(self, context: Tensor) -> Tensor:
        return self.dropout(self.out_proj(context + self.prompts))
