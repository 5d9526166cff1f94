"""`igva`: the instruction-guided vision aggregator (IGVA, docs/methods.md#igva).

The extra terms are K groups of consecutive layers (default 1-6, 7-12, 13-18, 19-24). Each group's hidden
states are averaged over its layers (all tokens) and split into a group CLS c_k [B, D] (the mean patch token
for encoders without CLS) and patches F_k [B, N, D]. A weight allocator turns the instruction embedding
s [B, d_s] and the c_k into one weight per group per sample, w [B, K] (softmax), and

    F = sum_k w_k F_k ;  tokens = P(cat[base patches, F])      [B, N, 2D] -> [B, N, d]

mode "uniform" (stage 1) uses w_k = 1/K and no allocator; mode "allocator" (stage 2) uses it. The optional
regulariser adds -lambda * mean_b H(w_b) to the loss (entropy of the softmaxed weights, applied once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from layerfuse.core.config import check_choice

from .base import Fuser, FuserBuildError, FuserConfig, FuserOutput, LLMSpec, VisionSpec
from .projector import Projector
from .registry import register_fuser

IGVAMode = Literal["uniform", "allocator"]  # uniform: the plain group average (stage 1); allocator: text-conditioned weights


@dataclass
class IGVAConfig(FuserConfig):
    layers: str = "igva"
    mode: IGVAMode = "allocator"  # "uniform" for stage 1
    allocator_dim: int = 1024  # A
    allocator_blocks: int = 4
    allocator_heads: int = 4
    entropy_lambda: float = 0.0  # e.g. 0.02; 0 disables the regulariser


class AllocatorBlock(nn.Module):
    """Post-norm: x = LN(MHA(x, kv, kv) + x); x = LN(FFN(x) + x).   x [B, 1, A], kv [B, K, A]"""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.norm_2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        x = self.norm_1(self.attn(x, kv, kv, need_weights=False)[0] + x)
        return self.norm_2(self.ffn(x) + x)


class WeightAllocator(nn.Module):
    """s [B, d_s], c [B, K, D] -> w [B, K] (softmax over groups)."""

    def __init__(self, text_dim: int, vision_dim: int, groups: int, dim: int, blocks: int, heads: int):
        super().__init__()
        if dim % heads:
            raise FuserBuildError(f"igva: allocator_dim {dim} is not divisible by {heads} heads")
        self.query = nn.Linear(text_dim, dim)
        self.key_value = nn.Linear(vision_dim, dim)
        self.blocks = nn.ModuleList(AllocatorBlock(dim, heads) for _ in range(blocks))
        self.head = nn.Linear(dim, groups)

    def forward(self, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.query(s).unsqueeze(1)  # [B, 1, A]
        kv = self.key_value(c)  # [B, K, A]
        for block in self.blocks:
            x = block(x, kv)
        return self.head(x.squeeze(1)).float().softmax(dim=-1)  # [B, K]


def entropy(w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """H(w) per row of already-softmaxed weights: [B, K] -> [B]."""
    return -(w * w.clamp_min(eps).log()).sum(dim=-1)


@register_fuser
class IGVAFuser(Fuser):
    """[B, k, T, D], s [B, d_s] -> [B, N, d]; FuserOutput.weights = w [B, K]"""

    name = "igva"
    config_class = IGVAConfig

    def __init__(self, config: IGVAConfig, vision: VisionSpec, llm: LLMSpec):
        super().__init__(config, vision, llm)
        check_choice(config.mode, IGVAMode, "igva mode", FuserBuildError)
        self.groups = len(self.selection.extra)
        if self.groups < 2:
            raise FuserBuildError(f"igva weighs at least 2 layer groups; {self.selection.describe()} has {self.groups}")
        if len(self.selection.base) != 1:
            raise FuserBuildError(f"igva: the base term must be one layer, got a group in {self.selection.describe()}")
        if config.mode == "allocator" and vision.text_dim < 1:
            raise FuserBuildError("igva's allocator needs instruction embeddings (VisionSpec.text_dim = 0); use mode='uniform'")
        self.allocator = WeightAllocator(
            max(vision.text_dim, 1), vision.hidden_size, self.groups,
            config.allocator_dim, config.allocator_blocks, config.allocator_heads,
        )
        self.projector = Projector(2 * vision.hidden_size, llm.hidden_size, config.projector_depth)
        self.set_mode(config.mode)

    def set_mode(self, mode: IGVAMode) -> None:
        """Switch uniform (stage 1, allocator frozen and unused) <-> allocator (stage 2)."""
        check_choice(mode, IGVAMode, "igva mode", FuserBuildError)
        self.config.mode = mode
        self.allocator.requires_grad_(mode == "allocator")

    @property
    def needs_text(self) -> bool:  # type: ignore[override]
        return self.config.mode == "allocator"

    def group_features(self, layers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> c [B, K, D] (group CLS, or mean patch), F [B, K, N, D] (group patch means)."""
        full = torch.stack([self.term(layers, k, patches=False) for k in range(self.groups)], dim=1)  # [B, K, T, D]
        if self.vision.has_cls:
            return full[:, :, 0], full[:, :, 1:]
        return full.mean(dim=2), full

    def fuse(self, layers: torch.Tensor, text: torch.Tensor | None) -> FuserOutput:
        base = self.term(layers, self.groups)  # [B, N, D]
        c, groups = self.group_features(layers)
        aux = None
        if self.config.mode == "allocator":
            w = self.allocator(text.to(c.dtype), c)  # [B, K] fp32
            if self.config.entropy_lambda > 0:
                aux = -self.config.entropy_lambda * entropy(w).mean()
        else:
            w = torch.full((layers.shape[0], self.groups), 1.0 / self.groups, device=layers.device)
        fused = (w.to(groups.dtype)[:, :, None, None] * groups).sum(dim=1)  # [B, N, D]
        tokens = self.projector(torch.cat([base, fused], dim=-1))
        return FuserOutput(tokens, weights=w, aux_loss=aux)
