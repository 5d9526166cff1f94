"""`inject`: MLVF Internal Direct fusion (I_D).

Before decoder layer m(k), P_k(h_k) is added to the residual stream at the image-token positions, during
the prefill only: decoding steps with a KV cache (whose hidden states no longer span the prompt) add nothing,
their keys/values already carry the injected image positions.
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

    def apply(self, k: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        internal, span = self._context  # type: ignore[misc]
        if hidden.shape[1] != span.mask.shape[1]:
            return hidden  # a decoding step, not the prefill
        feats = internal[k][span.has_image].to(hidden.dtype)  # [B_img, N, d]
        if feats.numel() == 0:
            return hidden
        delta = torch.zeros_like(hidden).masked_scatter(span.mask.unsqueeze(-1), feats)
        return hidden + delta
