"""The frozen large pre-trained model (LPM): keys and values of its most important tokens.

The LPM runs through its own timm modules. At each tapped block a hook (``fpt.models.lpm_attention``, one per
LPM family) reads the per-head queries, keys and values the block's attention uses, scores the tokens by the
attention they receive, and keeps the keys and values of the top ``T`` tokens per head. Register tokens are not
candidates unless asked for (they are global sinks, not image regions); the CLS token is, as in the papers.
Untapped blocks run the model's normal fused path. The encoder stops as soon as the last tapped block's queries,
keys and values are read: that block's attention and MLP, and the blocks after it, are not run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from fpt.config import IMPORTANCE_RULES, Importance
from fpt.errors import FPTError
from fpt.models.lpm_attention import LPM, has_class_token, register_positions, tap_attention
from fpt.runtime import without_autocast


@dataclass(frozen=True)
class LPMGeometry:
    """The shape facts of an LPM that the trainable modules are sized from."""

    embed_dim: int
    num_heads: int
    depth: int
    patch_size: int
    num_prefix_tokens: int
    num_register_tokens: int = 0  # of the prefix tokens, those that are registers (the others: the CLS token)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @classmethod
    def from_model(cls, model: LPM) -> LPMGeometry:
        return cls(
            embed_dim=model.embed_dim,
            num_heads=model.blocks[0].attn.num_heads,
            depth=len(model.blocks),
            patch_size=model.patch_embed.patch_size[0],
            num_prefix_tokens=model.num_prefix_tokens,
            num_register_tokens=len(register_positions(model)),
        )

    def num_tokens(self, input_size: int) -> int:
        """N: prefix tokens (CLS, registers) plus patches for a square input of ``input_size`` pixels."""
        return self.num_prefix_tokens + (input_size // self.patch_size) ** 2

    def feature_shape(
        self, num_layers: int, input_size: int, token_ratio: float, select_registers: bool = False
    ) -> tuple[int, int, int, int]:
        """[L, H, T, d_head]: the shape of one image's selected keys (and values) at ``input_size`` pixels; T counts
        the candidate tokens (the registers only with ``select_registers``)."""
        excluded = 0 if select_registers else self.num_register_tokens
        kept = num_important_tokens(self.num_tokens(input_size) - excluded, token_ratio)
        return (num_layers, self.num_heads, kept, self.head_dim)


def num_important_tokens(num_tokens: int, token_ratio: float) -> int:
    """T = int(N * token_ratio): how many tokens each head keeps."""
    kept = int(num_tokens * token_ratio)
    if kept < 1:
        raise FPTError(f"token ratio {token_ratio} keeps no token out of {num_tokens}; raise --token-ratio")
    return kept


@dataclass
class LPMFeatures:
    """Keys and values of the important tokens of the tapped LPM layers.

    keys, values: [B, L, H, T, d_head]; token_indices: [B, L, H, T], positions in the LPM's token
    sequence (prefix tokens first, then patches in raster order).
    """

    keys: Tensor
    values: Tensor
    token_indices: Tensor


def received_attention(q: Tensor, k: Tensor, scale: float, rule: Importance, block_bytes: int | None = None) -> Tensor:
    """Importance of each token, [B, H, N], from queries and keys [B, H, N, d_head].

    ``A = softmax(q kᵀ · scale)``; "global" is ``A.mean(dim=-2)`` (the attention each token receives,
    averaged over all queries) and "cls" is ``A[:, :, 0]`` (the attention the CLS query pays it). ``A`` is
    computed a block of at most ``block_bytes`` of scores at a time (whole images when they fit, else query rows
    of one image): memory stays bounded, not ``O(B · N²)``. The default, 4 MiB on the CPU, keeps a block in the
    processor's cache (2–3× faster than large blocks at 512 px); 256 MiB on GPUs, which want few large kernels.
    """
    with without_autocast(q.device.type):  # scores in float32 even under mixed precision
        k_t = k.float().transpose(-2, -1).contiguous()  # once, not once per block inside the matmul
        if rule == "cls":
            return torch.softmax((q[:, :, :1].float() @ k_t).mul_(scale), dim=-1)[:, :, 0]
        batch, heads, num_tokens = q.shape[:3]
        budget = block_bytes or (2**28 if q.is_cuda else 2**22)
        rows = max(1, budget // (heads * num_tokens * 4))  # query rows of float32 scores per block
        images = max(1, rows // num_tokens)
        received = torch.zeros(k.shape[:-1], dtype=torch.float32, device=k.device)
        for start in range(0, batch, images):
            block = slice(start, start + images)
            for q_chunk in q[block].split(min(rows, num_tokens), dim=2):
                received[block] += torch.softmax((q_chunk.float() @ k_t[block]).mul_(scale), dim=-1).sum(dim=-2)
        return received / num_tokens


def important_token_indices(importance: Tensor, num_kept: int) -> Tensor:
    """Indices [B, H, T] of the ``num_kept`` highest-scoring tokens of each head, from scores [B, H, N]."""
    return importance.topk(num_kept, dim=-1).indices


def gather_tokens(states: Tensor, indices: Tensor) -> Tensor:
    """Pick per-head tokens: states [B, H, N, d_head], indices [B, H, T] -> [B, H, T, d_head]."""
    return states.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, states.shape[-1]))


@dataclass(frozen=True)
class TokenSelection:
    """What a method keeps of a frozen LPM: the keys/values of the top ``token_ratio`` of the candidate tokens per
    head, by ``importance`` ("global": mean attention received; "cls": attention from the CLS token), at each
    tapped block (increasing indices). Register tokens are candidates only with ``select_registers``."""

    tapped_layers: tuple[int, ...]
    token_ratio: float
    importance: Importance
    select_registers: bool = False

    @contextmanager
    def recording(self, lpm: LPM, stop_after_last: bool = False) -> Iterator[Callable[[], LPMFeatures]]:
        """While open, every forward of ``lpm`` selects the important tokens of the tapped blocks; the yielded
        function returns those of the latest forward. With ``stop_after_last``, a forward ends by raising
        ``AllTapsRead`` as soon as the last tapped block's keys and values are read."""
        selected: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        excluded = range(0) if self.select_registers else register_positions(lpm)
        last = self.tapped_layers[-1] if stop_after_last else None
        hooks = [
            tap_attention(lpm.blocks[layer].attn, partial(self._select, layer, excluded, selected, layer == last))
            for layer in self.tapped_layers
        ]

        def features() -> LPMFeatures:
            keys, values, indices = zip(*(selected[layer] for layer in self.tapped_layers), strict=True)
            return LPMFeatures(torch.stack(keys, 1), torch.stack(values, 1), torch.stack(indices, 1))

        try:
            yield features
        finally:
            for hook in hooks:
                hook.remove()

    def _select(
        self,
        layer: int,
        excluded: range,
        selected: dict[int, tuple[Tensor, Tensor, Tensor]],
        stop: bool,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float,
    ) -> None:
        num_kept = num_important_tokens(q.shape[2] - len(excluded), self.token_ratio)
        importance = received_attention(q, k, scale, self.importance)
        importance[:, :, excluded.start : excluded.stop] = -torch.inf
        indices = important_token_indices(importance, num_kept)
        selected[layer] = (gather_tokens(k, indices), gather_tokens(v, indices), indices)
        if stop:
            raise AllTapsRead


class AllTapsRead(Exception):
    """Raised by a recording's last tap to end the LPM's forward: nothing after that block's q, k, v is needed."""


class FrozenEncoder(nn.Module):
    """A frozen LPM that returns the keys/values of its important tokens for the tapped layers.

    Args:
        model: a timm ``VisionTransformer`` or ``Eva`` (built with ``dynamic_img_size=True`` for any input size).
        tapped_layers: indices of the blocks whose keys/values are returned, in increasing order.
        token_ratio: fraction of the N tokens each head keeps.
        importance: "global" (mean attention received) or "cls" (attention from the CLS token).
        select_registers: register tokens are candidates too (by default they are never kept).
    """

    def __init__(
        self,
        model: LPM,
        tapped_layers: list[int],
        token_ratio: float = 0.2,
        importance: Importance = "global",
        select_registers: bool = False,
    ) -> None:
        super().__init__()
        if not model.dynamic_img_size:
            raise FPTError("the LPM must be built with dynamic_img_size=True (load_backbone does so)")
        self.model = model.requires_grad_(False)
        self.geometry = LPMGeometry.from_model(model)
        validate_tapped_layers(tapped_layers, self.geometry.depth)
        if importance not in IMPORTANCE_RULES:
            raise FPTError(f"unknown importance rule '{importance}'; choose one of {IMPORTANCE_RULES}")
        if importance == "cls" and not has_class_token(model):
            raise FPTError("importance 'cls' needs a backbone with a CLS token, and this one has none; use 'global'")
        self.selection = TokenSelection(tuple(tapped_layers), token_ratio, importance, select_registers)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """The LPM always stays in eval mode (no dropout, no drop-path)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> LPMFeatures:
        """images [B, C, S, S] (S a multiple of the patch size) -> keys/values [B, L, H, T, d_head]."""
        size = images.shape[-1]
        if images.shape[-2] != size or size % self.geometry.patch_size:
            raise FPTError(
                f"LPM input must be square with a side that is a multiple of the patch size "
                f"{self.geometry.patch_size}; got {tuple(images.shape[-2:])}"
            )
        with self.selection.recording(self.model, stop_after_last=True) as selected, suppress(AllTapsRead):
            self.model.forward_features(images)
        return selected()


def validate_tapped_layers(tapped_layers: list[int], depth: int) -> None:
    """Raise unless the layers are distinct, increasing block indices of a ``depth``-block LPM."""
    if not tapped_layers:
        raise FPTError("no tapped layers: give at least one LPM layer")
    if sorted(set(tapped_layers)) != list(tapped_layers) or not 0 <= tapped_layers[0] <= tapped_layers[-1] < depth:
        raise FPTError(f"tapped layers {list(tapped_layers)} must be distinct increasing indices in 0..{depth - 1}")
