"""`deepstack`: DeepStack / Qwen3-VL-style injection into the first LLM layers (docs/methods.md#deepstack).

The input sequence carries P(base) as usual. Every extra term k (default hs 8, 15, 22: Qwen3-VL-8B's deepstack
blocks on a 24-block tower) goes through its own merger M_k = P_k(LN_k(.)) and is added to the residual stream
at the image-token positions just before decoder layer m_k, prefill only (inject's mechanism):

    hidden[b, image positions] += M_k(h_k)[b]      before layer m_k;  default m_k = k + 1 (k = 0, 1, ...)

Qwen3-VL adds deepstack feature k to the output of decoder layer k, which is the input of layer k + 1: the default.
`llm_layers` ("1,2,3" or [1, 2, 3]) sets m_k per extra term. The base is never stacked, even when the spec lists
it. `zero_init`: each merger's last Linear starts at zero, so the untrained model is the base-only one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import FuserBuildError
from .inject import InjectFuser
from .internal import InternalConfig
from .projector import Projector
from .registry import register_fuser


@dataclass
class DeepStackConfig(InternalConfig):
    layers: str = "deepstack"
    llm_layers: str = ""  # decoder layer per extra term, e.g. "1,2,3" (a list works too); "" = 1, 2, ..., K
    merger_norm: bool = True  # LayerNorm before each merger's projector (Qwen3-VL's mergers have one)
    zero_init: bool = True  # each merger's last Linear starts at 0: the untrained model is the base-only one


class Merger(nn.Module):
    """One deepstack layer's merger: [B, N, D] -> LN (optional) -> projector -> [B, N, d]."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, norm: bool, zero_init: bool):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-6) if norm else nn.Identity()
        self.projector = Projector(in_dim, out_dim, depth)  # type: ignore[arg-type]
        if zero_init:
            last = self.projector.linear_2 if depth == 2 else self.projector.linear_1
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.norm(x))


def parse_llm_layers(value: str | list[int] | tuple[int, ...]) -> list[int]:
    """ "1,2,3" / [1, 2, 3] -> [1, 2, 3]; "" -> []."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    text = str(value).strip().strip("[]").replace(" ", "")
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise FuserBuildError(f"deepstack llm_layers must be decoder-layer indices like '1,2,3', got {value!r}") from None


@register_fuser
class DeepStackFuser(InjectFuser):
    """hidden[b, image positions] += M_k(h_k)[b] before layer m_k (default k + 1); [B, S, d] -> [B, S, d]"""

    name = "deepstack"
    config_class = DeepStackConfig
    fuses_listed_base = False

    def layer_projector(self) -> nn.Module:
        cfg = self.config
        return Merger(self.vision.hidden_size, self.llm.hidden_size, cfg.projector_depth, cfg.merger_norm, cfg.zero_init)

    def injection_layers(self) -> list[int]:
        k = len(self.fused_terms)
        given = parse_llm_layers(self.config.llm_layers)
        layers = given or list(range(1, k + 1))
        if len(layers) != k:
            raise FuserBuildError(f"deepstack: llm_layers {given} names {len(given)} decoder layers for {k} stacked terms "
                                  f"({self.selection.describe()})")
        bad = [m for m in layers if not 0 <= m < self.llm.num_layers]
        if bad:
            raise FuserBuildError(
                f"deepstack: decoder layers {bad} do not exist in a {self.llm.num_layers}-layer LLM (stacking {k} terms into "
                f"layers {layers}); set llm_layers, e.g. '{','.join(str(min(i, self.llm.num_layers - 1)) for i in range(k))}'"
            )
        return layers
