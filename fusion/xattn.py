"""`xattn`: MLVF Internal Modular fusion (I_M, docs/methods.md#internal-fusion), Flamingo-style gated cross-attention.

Before decoder layer m(k) a block is run on the residual stream (the pretrained layer itself is untouched):

    y = x + tanh(a1) * XAttn(RMSNorm(x), P_k(h_k))
    y = y + tanh(a2) * MLP(RMSNorm(y))

a1 = a2 = 0 at init, so the LLM's outputs are unchanged until the gates open. Token t may attend to the
image features only if the image span starts before t; the whole block (attention and MLP) acts on those
tokens only, so tokens up to the image start and samples without an image pass through unchanged (the LLM
stays exactly the pretrained one on text). It runs at every step, decoding included (cross-attention needs no
KV cache; a decoding step's sequence position comes from the KV cache, see internal.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import FuserBuildError, LLMSpec, VisionSpec
from .internal import InternalConfig, InternalFuser
from .registry import register_fuser


@dataclass
class XAttnConfig(InternalConfig):
    heads: int = 0  # 0 = the LLM's number of attention heads
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6


class GatedCrossAttentionBlock(nn.Module):
    """x [B, S, d], image [B, N, d], allowed [B, S] bool -> [B, S, d] (x itself where not allowed)."""

    def __init__(self, d: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        if d % heads:
            raise FuserBuildError(f"xattn: width {d} is not divisible by {heads} heads")
        self.heads = heads
        self.norm_x = nn.RMSNorm(d, eps=eps)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.norm_mlp = nn.RMSNorm(d, eps=eps)
        hidden = int(round(d * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(d, hidden, bias=False), nn.GELU(), nn.Linear(hidden, d, bias=False))
        self.gate_mlp = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, image: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.heads
        q = self.q(self.norm_x(x)).view(b, s, h, d // h).transpose(1, 2)  # [B, h, S, dh]
        k, v = self.kv(image.to(x.dtype)).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # [B, h, N, dh] each
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)  # every token sees the image ...
        keep = allowed.unsqueeze(-1)  # ... the update is kept only where allowed (where, not a product: no NaN leaks)
        y = x + torch.where(keep, torch.tanh(self.gate_attn) * self.out(attn), 0.0)
        y = y + torch.where(keep, torch.tanh(self.gate_mlp) * self.mlp(self.norm_mlp(y)), 0.0)
        return y.to(x.dtype)  # the residual stream keeps its dtype (fp32 gates would promote a bf16 stream)


@register_fuser
class XAttnFuser(InternalFuser):
    """One gated cross-attention block per fused term, run before decoder layer m(k) (group presets `former` / `latter`
    / `all`: one block per vision layer of the group, each at its own LLM layer, as in the MLVF authors' I_M)."""

    name = "xattn"
    config_class = XAttnConfig

    def __init__(self, config: XAttnConfig, vision: VisionSpec, llm: LLMSpec):
        super().__init__(config, vision, llm)
        heads = config.heads or llm.num_heads
        if heads < 1:
            raise FuserBuildError("xattn needs a head count (config.heads or LLMSpec.num_heads)")
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(llm.hidden_size, heads, config.mlp_ratio, config.norm_eps) for _ in self.fused_terms
        )

    def apply(self, k: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        internal, span = self._context  # type: ignore[misc]
        start = span.start.to(hidden.device).view(-1, 1)
        allowed = (start >= 0) & (positions.view(1, -1) > start)  # [B, s]: the image starts before the token
        return self.blocks[k](hidden, internal[k], allowed)
