"""`single`: the LLaVA-1.5 baseline (docs/methods.md#baseline-and-external-direct).

One layer (default the penultimate), CLS dropped, MLP projector."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Fuser, FuserBuildError, FuserConfig, FuserOutput, LLMSpec, VisionSpec
from .projector import Projector
from .registry import register_fuser


@dataclass
class SingleConfig(FuserConfig):
    layers: str = "penultimate"


@register_fuser
class SingleFuser(Fuser):
    """tokens = P(hs[l][:, patches])   [B, k=1, T, D] -> [B, N, d]"""

    name = "single"
    config_class = SingleConfig

    def __init__(self, config: SingleConfig, vision: VisionSpec, llm: LLMSpec):
        super().__init__(config, vision, llm)
        if len(self.selection.terms) != 1 or len(self.selection.base) != 1:
            raise FuserBuildError(
                f"single reads exactly one layer; {self.selection.describe()}. "
                "Write one explicit layer as '12,' or '-2', or use concat for several"
            )
        self.projector = Projector(vision.hidden_size, llm.hidden_size, config.projector_depth)

    def fuse(self, layers: torch.Tensor, text: torch.Tensor | None) -> FuserOutput:
        return FuserOutput(self.projector(self.term(layers, 0)))
