"""Fusion modules: learnable fine-grained prompts that cross-attend to the LPM's keys and values.

Prompts are per tapped layer; the projections are shared across layers. There are no learned key or
value projections: the LPM's own keys and values are attended to as they are.

Shapes: L tapped layers, M prompts, d the LPM width, H its heads, d_side the side network's width.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from fpt.errors import FPTError
from fpt.quantization import dequantize
from fpt.runtime import without_autocast


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

    def cross_attention(
        self, keys: Tensor, values: Tensor, keys_scale: Tensor | None = None, values_scale: Tensor | None = None
    ) -> Tensor:
        """C [B, L, M, d] (float32) from keys/values [B, L, H, T, d_head] in any float dtype (e.g. a float16
        cache), or int8 with their scales [B, L, H, T] (an int8 cache)."""
        num_layers, num_prompts, head_dim = self.prompts.shape[0], self.prompts.shape[1], keys.shape[-1]
        queries = self.queries().view(num_layers, num_prompts, self.num_heads, head_dim).transpose(1, 2)
        return PromptCrossAttention.apply(queries, keys, values, keys_scale, values_scale)

    def attention_weights(self, keys: Tensor) -> Tensor:
        """softmax(Q_h K_hᵀ / sqrt(d_head)), [B, L, H, M, T]: where each prompt looks."""
        num_layers, num_prompts, _ = self.prompts.shape
        head_dim = keys.shape[-1]
        q = self.queries().view(num_layers, num_prompts, self.num_heads, head_dim).transpose(1, 2)
        return torch.softmax(q @ keys.to(q.dtype).transpose(-2, -1) * head_dim**-0.5, dim=-1)

    def forward(
        self, keys: Tensor, values: Tensor, keys_scale: Tensor | None = None, values_scale: Tensor | None = None
    ) -> Tensor:
        """keys/values [B, L, H, T, d_head] (with their int8 scales [B, L, H, T]) -> fused prompts [B, L, M, d_side]."""
        return self.output(self.cross_attention(keys, values, keys_scale, values_scale))

    @torch.no_grad()
    def prompt_similarity(self) -> Tensor:
        """Mean cosine similarity between the distinct prompts of each layer, [L]: 1 when they are all alike."""
        prompts = nn.functional.normalize(self.prompts.float(), dim=-1)  # [L, M, d]
        num_prompts = prompts.shape[1]
        if num_prompts < 2:
            return prompts.new_ones(prompts.shape[0])
        similarity = prompts @ prompts.transpose(1, 2)  # [L, M, M]
        off_diagonal = similarity.sum(dim=(1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(dim=-1)
        return off_diagonal / (num_prompts * (num_prompts - 1))

    @torch.no_grad()
    def attention_entropy(self, keys: Tensor) -> Tensor:
        """Entropy of each prompt's attention over the T tokens, averaged over images, heads and prompts and
        divided by log T, [L]: 1 when the attention is uniform, 0 when it rests on one token."""
        num_tokens = keys.shape[-2]
        if num_tokens < 2:
            return keys.new_zeros(keys.shape[1], dtype=torch.float32)
        weights = self.attention_weights(keys).float()  # [B, L, H, M, T]
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1)
        return entropy.mean(dim=(0, 2, 3)) / math.log(num_tokens)


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


class PromptCrossAttention(torch.autograd.Function):
    """Multi-head cross-attention from shared prompt queries to frozen keys/values, lean on memory.

    ``C[b, l] = concat_h softmax(Q[l, h] K[b, l, h]ᵀ / sqrt(d_head)) V[b, l, h]``, one layer at a time, in
    float32 (or the queries' dtype if wider). Keys/values stay in their own dtype: a float16 or int8 cache is
    never copied whole to float32 (int8 ones are dequantised with their scales one layer at a time), one layer's
    upcast lives only while that layer is computed, and they get no gradient. Backward keeps only the queries and
    each row's log-sum-exp and recomputes the attention per layer, so nothing of size [B, L, H, M, T] outlives the
    layer it belongs to.

    Shapes: queries [L, H, M, d_head]; keys, values [B, L, H, T, d_head]; their scales (int8 only, else None)
    [B, L, H, T]; output [B, L, M, H * d_head].
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        queries: Tensor,
        keys: Tensor,
        values: Tensor,
        keys_scale: Tensor | None,
        values_scale: Tensor | None,
    ) -> Tensor:
        if any(ctx.needs_input_grad[1:]):
            raise FPTError("the LPM's keys/values must not require gradients: the LPM is frozen")
        batch, num_layers, num_heads, _, head_dim = keys.shape
        num_prompts = queries.shape[2]
        dtype = torch.promote_types(queries.dtype, torch.float32)
        with without_autocast(keys.device.type):
            scaled = queries.to(dtype) * head_dim**-0.5
            output = keys.new_empty((batch, num_layers, num_prompts, num_heads, head_dim), dtype=dtype)
            log_sum_exp = keys.new_empty((batch, num_layers, num_heads, num_prompts), dtype=dtype)
            for layer in range(num_layers):
                scores = scaled[layer] @ _layer(keys, keys_scale, layer, dtype).mT  # [B, H, M, T]
                log_sum_exp[:, layer] = torch.logsumexp(scores, dim=-1)
                probabilities = torch.exp(scores - log_sum_exp[:, layer, ..., None])
                output[:, layer] = (probabilities @ _layer(values, values_scale, layer, dtype)).transpose(1, 2)
        ctx.save_for_backward(queries, keys, values, keys_scale, values_scale, log_sum_exp)
        return output.flatten(3)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor, None, None, None, None]:
        queries, keys, values, keys_scale, values_scale, log_sum_exp = ctx.saved_tensors
        batch, num_layers, num_heads, _, head_dim = keys.shape
        num_prompts = queries.shape[2]
        scale, dtype = head_dim**-0.5, log_sum_exp.dtype
        with without_autocast(keys.device.type):
            scaled = queries.to(dtype) * scale
            grad_output = grad_output.to(dtype).reshape(batch, num_layers, num_prompts, num_heads, head_dim)
            grad_queries = torch.empty(queries.shape, dtype=dtype, device=queries.device)
            for layer in range(num_layers):
                layer_keys = _layer(keys, keys_scale, layer, dtype)
                probabilities = torch.exp(scaled[layer] @ layer_keys.mT - log_sum_exp[:, layer, ..., None])
                grad_probabilities = (
                    grad_output[:, layer].transpose(1, 2) @ _layer(values, values_scale, layer, dtype).mT
                )
                grad_scores = probabilities * (
                    grad_probabilities - (grad_probabilities * probabilities).sum(dim=-1, keepdim=True)
                )
                grad_queries[layer] = (grad_scores @ layer_keys).sum(dim=0) * scale
        return grad_queries.to(queries.dtype), None, None, None, None


def _layer(tokens: Tensor, scales: Tensor | None, layer: int, dtype: torch.dtype) -> Tensor:
    """One layer of keys or values [B, L, H, T, d_head] in ``dtype``, [B, H, T, d_head]: int8 ones dequantised."""
    return dequantize(tokens[:, layer], None if scales is None else scales[:, layer], dtype)
