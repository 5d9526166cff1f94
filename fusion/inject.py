"""`inject`: MLVF Internal Direct fusion (I_D, docs/methods.md#internal-fusion).

Before decoder layer m(k), P_k(h_k) is added to the residual stream at the image-token positions, during
the prefill only: decoding steps with a KV cache (whose tokens lie after the prompt) add nothing, the cached
keys/values of the image positions already carry the injection. Samples without an image get nothing.
Group presets `former` / `latter` / `all`: each layer of the group with its own P_k, into consecutive LLM layers
(`group_mode`, internal.py / layers.internal_plan).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .internal import InternalConfig, InternalFuser
from .registry import register_fuser


@dataclass
class InjectConfig(InternalConfig):
    pass


@register_fuser
class InjectFuser(InternalFuser):
    """hidden[b, image positions] += P_k(h_k)[b]   before layer m(k); [B, S, d] -> [B, S, d]"""

    name = "inject"
    config_class = InjectConfig

    def apply(self, k: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        internal, span = self._context  # type: ignore[misc]
        mask = span.mask.to(hidden.device)
        length = mask.shape[1]
        inside = positions < length  # [s]
        if not bool(inside.any()):
            return hidden  # a decoding step: the prompt's keys/values already carry the injection
        at = positions.clamp(max=length - 1)
        add = mask[:, at] & inside  # [B, s] image positions among these tokens
        slot = (mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, at]  # [B, s] which of the N features goes there
        feats = internal[k].to(hidden.dtype)  # [B, N, d]
        delta = feats.gather(1, slot.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))  # [B, s, d]
        # always in the graph (zero where nothing is added), so text-only batches still reach every parameter
        return hidden + torch.where(add.unsqueeze(-1), delta, 0.0)
