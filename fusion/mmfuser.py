"""`mmfuser`: External Modular fusion (MMFuser, docs/methods.md#mmfuser).

The base layer's patches are the query; the extra terms (default hs 3, 8, 13, 18) are the levels of a
deformable cross-attention, each an h x w map of the same grid. A deformable self-attention over the single
map of the cross-attention output follows. Per-channel LayerScale vectors start at 0, so the untrained block
returns the base layer exactly (the `single` feature):

    CA  = MSDA_L(LN_q(Q), LN_v(V))         Q [B, N, D], V [B, L*N, D]
    SA  = MSDA_1(LN_1(CA), LN_1(CA))
    out = Q + g1 * (CA + g2 * SA)          [B, N, D]  -> projector -> [B, N, d]

Reference points are the pixel centres of the grid, shared by every level; no positional embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Fuser, FuserBuildError, FuserConfig, FuserOutput, LLMSpec, VisionSpec
from .msda import MSDeformAttn, reference_grid
from .projector import Projector
from .registry import register_fuser


@dataclass
class MMFuserConfig(FuserConfig):
    layers: str = "mmfuser"
    heads: int = 16
    points: int = 4
    norm_eps: float = 1e-6
    impl: str = "auto"  # ms_deform_attn implementation: auto | grid_sample | gather | kernel


class MMFuserBlock(nn.Module):
    """query [B, N, D], value [B, L*N, D] on an h x w grid -> [B, N, D]."""

    def __init__(self, dim: int, grid: tuple[int, int], levels: int, heads: int, points: int, eps: float, impl: str):
        super().__init__()
        if dim % heads:
            raise FuserBuildError(f"mmfuser: hidden size {dim} is not divisible by {heads} heads")
        self.grid = grid
        self.levels = levels
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_v = nn.LayerNorm(dim, eps=eps)
        self.cross = MSDeformAttn(dim, levels, heads, points, impl=impl)
        self.norm_1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = MSDeformAttn(dim, 1, heads, points, impl=impl)
        self.gamma_1 = nn.Parameter(torch.zeros(dim))
        self.gamma_2 = nn.Parameter(torch.zeros(dim))

    def forward(self, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        n = h * w
        dev = query.device
        ref = reference_grid(h, w, dev, torch.float32).unsqueeze(0).expand(query.shape[0], -1, -1)  # [B, N, 2]
        shapes = torch.tensor([[h, w]] * self.levels, dtype=torch.long, device=dev)
        starts = torch.arange(self.levels, device=dev, dtype=torch.long) * n
        ca = self.cross(self.norm_q(query), ref, self.norm_v(value), shapes, starts)
        x = self.norm_1(ca)
        sa = self.self_attn(x, ref, x, shapes[:1], starts[:1])
        return query + self.gamma_1 * (ca + self.gamma_2 * sa)


@register_fuser
class MMFuser(Fuser):
    """[B, k, T, D] -> [B, N, d]"""

    name = "mmfuser"
    config_class = MMFuserConfig

    def __init__(self, config: MMFuserConfig, vision: VisionSpec, llm: LLMSpec):
        super().__init__(config, vision, llm)
        if not self.selection.extra:
            raise FuserBuildError(f"mmfuser needs K/V layers besides the query; {self.selection.describe()} has none")
        if len(self.selection.base) != 1:
            raise FuserBuildError(f"mmfuser: the query (base term) must be one layer, got a group in {self.selection.describe()}")
        self.block = MMFuserBlock(
            vision.hidden_size, vision.grid, len(self.selection.extra), config.heads, config.points, config.norm_eps, config.impl
        )
        self.projector = Projector(vision.hidden_size, llm.hidden_size, config.projector_depth)

    def fused_features(self, layers: torch.Tensor) -> torch.Tensor:
        """The block's output before the projector, [B, N, D] (equals the base patches at init)."""
        n_terms = len(self.selection.terms)
        query = self.term(layers, n_terms - 1)
        value = torch.cat([self.term(layers, k) for k in range(n_terms - 1)], dim=1)  # [B, L*N, D]
        return self.block(query, value)

    def fuse(self, layers: torch.Tensor, text: torch.Tensor | None) -> FuserOutput:
        return FuserOutput(self.projector(self.fused_features(layers)))
