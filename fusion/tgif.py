"""`tgif`: Text-Guided Inter-layer Fusion (TGIF, docs/methods.md#tgif).

Every term of the selection (default: every block hs[1..L]) is an "expert"; a router MLP turns an embedding of
the instruction into one softmax weight per term and sample, and

    F = LN(base + sum_k w_k term_k) ;  tokens = P(F)      [B, N, D] -> [B, N, d]

Two routers: `llm` (the paper's) reads the mean LLM token embedding of the prompt, which VisionLanguageModel
computes (answer tokens left out), so it needs an LLM; `sentence` reads the cached sentence embedding of the
instruction, like IGVA. The router's last layer starts at zero: uniform weights 1/K at init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from layerfuse.core.config import check_choice

from .base import Fuser, FuserBuildError, FuserConfig, FuserOutput, LLMSpec, VisionSpec
from .projector import Projector
from .registry import register_fuser

TGIFRouter = Literal["llm", "sentence"]  # llm: mean LLM token embedding of the prompt; sentence: cached sentence embedding


@dataclass
class TGIFConfig(FuserConfig):
    layers: str = "tgif"
    router: TGIFRouter = "llm"
    router_dim: int = 512  # hidden width of the router MLP
    norm_eps: float = 1e-5


class LayerRouter(nn.Module):
    """text [B, d_t] -> w [B, K]: Linear(d_t, H) -> ReLU -> Linear(H, K) -> softmax (fp32); the last Linear starts at 0."""

    def __init__(self, text_dim: int, hidden: int, experts: int):
        super().__init__()
        self.hidden = nn.Linear(text_dim, hidden)
        self.act = nn.ReLU()
        self.logits = nn.Linear(hidden, experts)
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.logits(self.act(self.hidden(text))).float().softmax(dim=-1)


@register_fuser
class TGIFFuser(Fuser):
    """[B, k, T, D], text [B, d | d_s] -> [B, N, d]; FuserOutput.weights = w [B, K], K = number of terms, in
    ascending order of their (first) hidden state (default: w[:, i] weighs hs[i+1])."""

    name = "tgif"
    config_class = TGIFConfig

    def __init__(self, config: TGIFConfig, vision: VisionSpec, llm: LLMSpec):
        super().__init__(config, vision, llm)
        check_choice(config.router, TGIFRouter, "tgif router", FuserBuildError)
        if len(self.selection.terms) < 2:
            raise FuserBuildError(f"tgif weighs at least 2 layers; {self.selection.describe()} has {len(self.selection.terms)}")
        if len(self.selection.base) != 1:
            raise FuserBuildError(f"tgif: the base term must be one layer, got a group in {self.selection.describe()}")
        if config.router == "sentence" and vision.text_dim < 1:
            raise FuserBuildError("tgif's sentence router needs instruction embeddings in the cache (VisionSpec.text_dim = 0); use router='llm'")
        if config.router == "llm" and llm.num_layers < 1:
            raise FuserBuildError(
                "tgif's llm router pools the LLM's own token embeddings of the prompt, and there is no LLM here "
                "(probe mode has none); use router='sentence' (the cached sentence embedding) or --mode lm"
            )
        if config.router_dim < 1:
            raise FuserBuildError(f"tgif router_dim must be >= 1, got {config.router_dim}")
        # weights in ascending hidden-state order (`tgif` lists the base last)
        self.experts = sorted(range(len(self.selection.terms)), key=lambda k: self.selection.terms[k])
        self.router = LayerRouter(self.text_dim, config.router_dim, len(self.experts))
        self.norm = nn.LayerNorm(vision.hidden_size, eps=config.norm_eps)
        self.projector = Projector(vision.hidden_size, llm.hidden_size, config.projector_depth)

    @property
    def needs_text(self) -> bool:  # type: ignore[override]
        return self.config.router == "sentence"

    @property
    def needs_prompt(self) -> bool:  # type: ignore[override]
        return self.config.router == "llm"

    def fused_features(self, layers: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> LN(base + sum_k w_k term_k) [B, N, D] (before the projector), w [B, K] fp32."""
        base = self.term(layers, len(self.selection.terms) - 1)  # [B, N, D]
        experts = torch.stack([self.term(layers, k) for k in self.experts], dim=1)  # [B, K, N, D]
        w = self.router(text.to(layers.dtype))  # [B, K]
        mixed = (w.to(experts.dtype)[:, :, None, None] * experts).sum(dim=1)  # [B, N, D]
        return self.norm(base + mixed), w

    def fuse(self, layers: torch.Tensor, text: torch.Tensor | None) -> FuserOutput:
        fused, w = self.fused_features(layers, text)  # type: ignore[arg-type]
        return FuserOutput(self.projector(fused), weights=w)
