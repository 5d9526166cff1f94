"""`concat`: External Direct fusion, MLVF E_D / Dense Connector SCI, DCI (docs/methods.md#baseline-and-external-direct).

The selected layers (group terms averaged first: DCI) are concatenated on channels and projected by an MLP
with a wider first layer. `3-18-23` -> P(cat[h3, h18, h23]) with in-dim 3D; the token count stays N.
Transformers' LlavaForConditionalGeneration with `vision_feature_layer=[...]` computes exactly this for
single-layer terms (layerfuse.export.hf writes it out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Fuser, FuserConfig, FuserOutput, LLMSpec, VisionSpec
from .projector import Projector
from .registry import register_fuser


@dataclass
class ConcatConfig(FuserConfig):
    layers: str = "3-18-23"


@register_fuser
class ConcatFuser(Fuser):
    """tokens = P(cat_k term_k)   [B, k, T, D] -> [B, N, K*D] -> [B, N, d]"""

    name = "concat"
    config_class = ConcatConfig

    def __init__(self, config: ConcatConfig, vision: VisionSpec, llm: LLMSpec):
        super().__init__(config, vision, llm)
        self.in_dim = len(self.selection.terms) * vision.hidden_size
        self.projector = Projector(self.in_dim, llm.hidden_size, config.projector_depth)

    def fuse(self, layers: torch.Tensor, text: torch.Tensor | None) -> FuserOutput:
        x = torch.cat([self.term(layers, k) for k in range(len(self.selection.terms))], dim=-1)
        return FuserOutput(self.projector(x))
