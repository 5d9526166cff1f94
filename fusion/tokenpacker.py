"""`tokenpacker`: TokenPacker's coarse-to-fine projector (docs/methods.md#tokenpacker).

Fewer visual tokens: the base layer's h x w patch grid, bilinearly downsampled by `downsample` s, gives the
(h/s)(w/s) point queries; every term (the base included; default hs 12, 16, 22, 23) is concatenated on channels
into the multi-level keys/values, and each query attends only to the s x s region of fine tokens it covers:

    q  = LN_q(W_q interp_s(base))                     [B, n, E]        n = (h/s)(w/s)
    kv = LN_k(MLP_k(cat_k term_k)), LN_v(MLP_v(...))  [B, N, E] each   MLP = Linear(K·D, E) -> GELU -> Linear(E, E)
    x  = MHA(q_r, k_region(r), v_region(r))           [B, n, E]        one s² region per query, no residual
    tokens = P(x)                                     [B, n, d]        (576 -> 144 tokens at s = 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Fuser, FuserBuildError, FuserConfig, FuserOutput, LLMSpec, VisionSpec
from .projector import Projector
from .registry import register_fuser


@dataclass
class TokenPackerConfig(FuserConfig):
    layers: str = "tokenpacker"
    downsample: int = 2  # s: (h/s)(w/s) visual tokens, each packing an s x s region
    dim: int = 0  # E, the attention width; 0 = the encoder's D (TokenPacker: 1024 = D of ViT-L)
    heads: int = 8  # TokenPacker: 1024 // 128
    norm_eps: float = 1e-6


class RegionAttention(nn.Module):
    """Point-to-region cross-attention: query [B, n, E] on an (h/s, w/s) grid, keys/values [B, N, E] on (h, w);
    query r attends to the s² keys of its region only -> [B, n, E]."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], s: int):
        super().__init__()
        self.grid, self.s = grid, s
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, E] row-major h x w -> [B·n, s², E], regions row-major, tokens row-major inside a region."""
        b, _, e = x.shape
        h, w = self.grid
        s = self.s
        x = x.reshape(b, h // s, s, w // s, s, e).permute(0, 1, 3, 2, 4, 5)  # [B, h/s, w/s, s, s, E]
        return x.reshape(b * (h // s) * (w // s), s * s, e)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        b, n, e = query.shape
        out = self.attn(query.reshape(b * n, 1, e), self.regions(key), self.regions(value), need_weights=False)[0]  # [B·n, 1, E]
        return out.reshape(b, n, e)


@register_fuser
class TokenPackerFuser(Fuser):
    """[B, k, T, D] -> [B, (h/s)(w/s), d]"""

    name = "tokenpacker"
    config_class = TokenPackerConfig

    def __init__(self, config: TokenPackerConfig, vision: VisionSpec, llm: LLMSpec):
        super().__init__(config, vision, llm)
        s = config.downsample
        h, w = vision.grid
        if s < 1 or h % s or w % s:
            raise FuserBuildError(f"tokenpacker: downsample {s} must be >= 1 and divide the {h}x{w} patch grid")
        if len(self.selection.base) != 1:
            raise FuserBuildError(f"tokenpacker: the query (base term) must be one layer, got a group in {self.selection.describe()}")
        d_in = vision.hidden_size
        e = config.dim or d_in
        if e % config.heads:
            raise FuserBuildError(f"tokenpacker: dim {e} is not divisible by {config.heads} heads")
        self.query_grid = (h // s, w // s)
        kv_in = len(self.selection.terms) * d_in
        self.q_proj = nn.Linear(d_in, e, bias=False)
        self.k_proj = nn.Sequential(nn.Linear(kv_in, e), nn.GELU(), nn.Linear(e, e))
        self.v_proj = nn.Sequential(nn.Linear(kv_in, e), nn.GELU(), nn.Linear(e, e))
        self.norm_q = nn.LayerNorm(e, eps=config.norm_eps)
        self.norm_k = nn.LayerNorm(e, eps=config.norm_eps)
        self.norm_v = nn.LayerNorm(e, eps=config.norm_eps)
        self.region_attn = RegionAttention(e, config.heads, vision.grid, s)
        for m in (self.q_proj, self.k_proj, self.v_proj, self.region_attn):  # TokenPacker's init; the projector keeps torch's
            for lin in m.modules():
                if isinstance(lin, nn.Linear):
                    nn.init.trunc_normal_(lin.weight, std=0.02)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)
        self.projector = Projector(e, llm.hidden_size, config.projector_depth)

    @property
    def num_visual_tokens(self) -> int:
        return self.query_grid[0] * self.query_grid[1]

    def point_queries(self, base: torch.Tensor) -> torch.Tensor:
        """Base patches [B, N, D] on h x w -> bilinear interpolation to (h/s, w/s) -> [B, n, D] (fp32 math, like
        TokenPacker; at s = 2 this is the mean of each 2 x 2 region)."""
        b, _, d = base.shape
        h, w = self.vision.grid
        grid = base.transpose(1, 2).reshape(b, d, h, w).float()
        small = F.interpolate(grid, size=self.query_grid, mode="bilinear", align_corners=False)  # [B, D, h/s, w/s]
        return small.flatten(2).transpose(1, 2).to(base.dtype)

    def packed_features(self, layers: torch.Tensor) -> torch.Tensor:
        """The packed tokens before the projector, [B, n, E]."""
        n_terms = len(self.selection.terms)
        multi = torch.cat([self.term(layers, k) for k in range(n_terms)], dim=-1)  # [B, N, K·D]
        q = self.norm_q(self.q_proj(self.point_queries(self.term(layers, n_terms - 1))))  # [B, n, E]
        k = self.norm_k(self.k_proj(multi))  # [B, N, E]
        v = self.norm_v(self.v_proj(multi))
        return self.region_attn(q, k, v)

    def fuse(self, layers: torch.Tensor, text: torch.Tensor | None) -> FuserOutput:
        return FuserOutput(self.projector(self.packed_features(layers)))
