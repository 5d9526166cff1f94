"""`sti`: Dense Connector's Sparse Token Integration (docs/methods.md#sparse-token-integration).

The base layer's N patch tokens, followed by each extra term's patch grid average-pooled with stride s
(N / s^2 tokens each), all through one projector with in-dim D. Visual tokens: N + K_extra * N / s^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Fuser, FuserBuildError, FuserConfig, FuserOutput, LLMSpec, VisionSpec
from .projector import Projector
from .registry import register_fuser


@dataclass
class STIConfig(FuserConfig):
    layers: str = "8-16"
    pool: int = 2  # stride of the average pooling of the extra layers' patch grids


@register_fuser
class STIFuser(Fuser):
    """tokens = P(cat_tokens[base, pool(extra_1), ...])   [B, k, T, D] -> [B, N + K*N/s^2, d]"""

    name = "sti"
    config_class = STIConfig

    def __init__(self, config: STIConfig, vision: VisionSpec, llm: LLMSpec):
        super().__init__(config, vision, llm)
        if not self.selection.extra:
            raise FuserBuildError(f"sti appends extra layers to the base; {self.selection.describe()} has none")
        if config.pool < 1:
            raise FuserBuildError(f"sti pool must be >= 1, got {config.pool}")
        h, w = vision.grid
        self.pooled_grid = (h // config.pool, w // config.pool)
        if min(self.pooled_grid) < 1:
            raise FuserBuildError(f"sti pool {config.pool} is larger than the {h}x{w} patch grid")
        self.projector = Projector(vision.hidden_size, llm.hidden_size, config.projector_depth)

    @property
    def num_visual_tokens(self) -> int:
        ph, pw = self.pooled_grid
        return self.vision.num_patches + len(self.selection.extra) * ph * pw

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, N/s^2, D] (average pooling on the h x w grid, floor at the edges)."""
        b, _, d = x.shape
        h, w = self.vision.grid
        grid = x.transpose(1, 2).reshape(b, d, h, w)
        return F.avg_pool2d(grid, self.config.pool).flatten(2).transpose(1, 2)

    def fuse(self, layers: torch.Tensor, text: torch.Tensor | None) -> FuserOutput:
        n_terms = len(self.selection.terms)
        base = self.term(layers, n_terms - 1)
        extra = [self._pool(self.term(layers, k)) for k in range(n_terms - 1)]
        return FuserOutput(self.projector(torch.cat([base, *extra], dim=1)))
