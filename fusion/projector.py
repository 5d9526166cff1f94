"""The LLaVA projector: visual features -> LLM width.

`mlp2x_gelu` (LLaVA-1.5): Linear(in, d) -> GELU -> Linear(d, d); depth 1 is a single Linear (LLaVA-1).
Parameter names `linear_1` / `linear_2` match transformers' `LlavaMultiModalProjector`, so a trained
projector loads there unchanged (see layerfuse.export.hf).
"""

from __future__ import annotations

import torch
from torch import nn

from layerfuse.core.config import check_choice

from .base import FuserBuildError, ProjectorDepth


class Projector(nn.Module):
    """[..., in_dim] -> [..., out_dim]."""

    def __init__(self, in_dim: int, out_dim: int, depth: ProjectorDepth = 2):
        super().__init__()
        check_choice(depth, ProjectorDepth, "projector_depth (1: linear, 2: mlp2x_gelu)", FuserBuildError)
        self.in_dim, self.out_dim, self.depth = in_dim, out_dim, depth
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU() if depth == 2 else nn.Identity()
        self.linear_2 = nn.Linear(out_dim, out_dim) if depth == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
