"""What every fuser is: the shapes it works on, its config, its inputs and outputs.

A fuser is the visual front end after the (frozen, cached) encoder: it reads the layers it declares,
fuses them and projects to the LLM width. Data at the boundary:

    layers  [B, k, T, D]  the k = len(fuser.required_inputs) cached hidden states (or stored group means, see
                          use_views), in that order, all T tokens
    text    [B, d_s]      instruction embedding (only when fuser.needs_text: the cached sentence embedding; or, when
                          fuser.needs_prompt, [B, d] the mean LLM token embedding of the prompt, which
                          VisionLanguageModel computes from the input ids)
    -> FuserOutput.tokens   [B, N_v, d]   visual tokens placed at the image span of the LLM input
       FuserOutput.internal {k: [B, N, d]}  features the internal fusers feed into LLM layer llm_layer_of[k]
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import nn

from layerfuse.core.errors import ConfigError

from .layers import LayerSelection, parse_layers

ProjectorDepth = Literal[1, 2]  # 1: one Linear (LLaVA-1); 2: mlp2x_gelu (LLaVA-1.5)


@dataclass(frozen=True)
class VisionSpec:
    """The cached encoder features a fuser is built for."""

    num_layers: int  # L blocks; L+1 hidden states
    hidden_size: int  # D
    grid: tuple[int, int]  # (h, w) patch grid
    has_cls: bool
    text_dim: int = 0  # d_s of the cached instruction embeddings (0 = none)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_patches + int(self.has_cls)

    @classmethod
    def from_cache(cls, cache: Any) -> "VisionSpec":
        """From a `layerfuse.pipeline.cache.reader.FeatureCache`."""
        grid = tuple(cache.meta["encoder"]["grid"])
        return cls(cache.num_layers - 1, cache.hidden_size, (int(grid[0]), int(grid[1])), bool(cache.has_cls), cache.text_dim)


@dataclass(frozen=True)
class LLMSpec:
    """What a fuser needs to know about the language model."""

    hidden_size: int  # d
    num_layers: int = 0  # decoder layers (internal fusers map vision layers onto them)
    num_heads: int = 0

    @classmethod
    def from_config(cls, config: Any) -> "LLMSpec":
        """From a Hugging Face causal-LM config (nested text_config handled)."""
        config = getattr(config, "text_config", None) or config
        return cls(int(config.hidden_size), int(config.num_hidden_layers), int(config.num_attention_heads))


@dataclass
class FuserConfig:
    """Options common to every fuser; each fuser extends it with its own."""

    layers: str = "penultimate"  # a layer spec, see layerfuse.fusion.layers
    projector_depth: ProjectorDepth = 2  # LLaVA-1.5 mlp2x_gelu: Linear(in, d) -> GELU -> Linear(d, d); 1 = one Linear

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class FuserOutput:
    tokens: torch.Tensor  # [B, N_v, d]
    internal: dict[int, torch.Tensor] = field(default_factory=dict)  # fused term k -> [B, N, d], enters LLM layer llm_layer_of[k]
    weights: torch.Tensor | None = None  # [B, K] per-sample group weights (igva)
    aux_loss: torch.Tensor | None = None  # scalar added to the LM loss (igva entropy regulariser)


class FuserBuildError(ConfigError):
    """A fuser/layer-spec combination that does not make sense (reported, not crashed on, by sweeps)."""


class Fuser(nn.Module):
    """Base class. Subclasses set `name`, `config_class`, build their modules in __init__ and implement
    `fuse`. `required_layers` are hidden-state indices for the cache reader, `needs_text` says whether
    the cached instruction embeddings are needed, `needs_prompt` whether `text` is instead the mean LLM token
    embedding of the prompt (VisionLanguageModel computes it; there is none without an LLM)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[FuserConfig]] = FuserConfig
    needs_text: ClassVar[bool] = False
    needs_prompt: ClassVar[bool] = False
    internal: ClassVar[bool] = False  # acts inside the LLM (inject / xattn)

    def __init__(self, config: FuserConfig, vision: VisionSpec, llm: LLMSpec):
        super().__init__()
        self.config = config
        self.vision = vision
        self.llm = llm
        self.selection: LayerSelection = parse_layers(config.layers, vision.num_layers)
        self._inputs: list[int | tuple[int, ...]] = list(self.selection.layers)
        self._positions = self.selection.positions()

    # -- what the loader reads -------------------------------------------------------------------------
    @property
    def required_layers(self) -> list[int]:
        """The hidden states the selection is made of (what a live encoder must return)."""
        return self.selection.layers

    @property
    def required_inputs(self) -> list[int | tuple[int, ...]]:
        """What `forward` takes along its second axis: `required_layers`, except that group terms served by a cache's
        stored group means (`use_views`) are one input each, named by their tuple of hidden states."""
        return list(self._inputs)

    def use_views(self, views: Sequence[tuple[int, ...]]) -> None:
        """Read group terms from stored group means where the cache has them (same values up to rounding: the
        extractor averaged the full-precision hidden states); `required_inputs` changes accordingly."""
        self._inputs = self.selection.inputs(views)
        self._positions = self.selection.positions(self._inputs)

    @property
    def num_visual_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def text_dim(self) -> int:
        """Width of the `text` input: d (the LLM's) for a prompt embedding, d_s for the cached sentence embedding."""
        return self.llm.hidden_size if self.needs_prompt else self.vision.text_dim

    # -- helpers for subclasses ------------------------------------------------------------------------
    def term(self, layers: torch.Tensor, k: int, *, patches: bool = True) -> torch.Tensor:
        """Term k of the selection (group terms averaged): [B, k_layers, T, D] -> [B, T or N, D]."""
        pos = self._positions[k]
        x = layers[:, pos[0]] if len(pos) == 1 else layers[:, list(pos)].mean(dim=1)
        return self.patches(x) if patches else x

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Drop CLS where the encoder has one (never for SigLIP): [B, T, D] -> [B, N, D]."""
        return x[:, 1:] if self.vision.has_cls else x

    def check_input(self, layers: torch.Tensor, text: torch.Tensor | None) -> None:
        if layers.dim() != 4 or layers.shape[1] != len(self._inputs) or layers.shape[2] != self.vision.num_tokens:
            raise ValueError(
                f"{self.name}: expected layers [B, {len(self._inputs)}, {self.vision.num_tokens}, "
                f"{self.vision.hidden_size}] (inputs {self._inputs}), got {list(layers.shape)}"
            )
        if self.needs_text and text is None:
            raise ValueError(f"{self.name} needs the instruction embedding `text` [B, {self.vision.text_dim}]")
        if self.needs_prompt and text is None:
            raise ValueError(
                f"{self.name} needs the mean LLM token embedding of the prompt `text` [B, {self.llm.hidden_size}]; "
                "VisionLanguageModel computes it from the input ids"
            )

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split for separate learning rates: 'projector' (any module named
        *projector*) and 'fuser' (the rest)."""
        groups: dict[str, list[nn.Parameter]] = {"fuser": [], "projector": []}
        for n, p in self.named_parameters():
            if p.requires_grad:
                groups["projector" if "projector" in n else "fuser"].append(p)
        return groups

    # -- the computation -------------------------------------------------------------------------------
    def forward(self, layers: torch.Tensor, text: torch.Tensor | None = None) -> FuserOutput:
        """layers [B, k, T, D], text [B, d_s] | None -> FuserOutput (tokens [B, N_v, d])."""
        self.check_input(layers, text)
        return self.fuse(layers, text)

    def fuse(self, layers: torch.Tensor, text: torch.Tensor | None) -> FuserOutput:
        raise NotImplementedError

    # -- LLM-internal fusers override these ------------------------------------------------------------
    def attach(self, llm: nn.Module) -> None:
        """Hook into the LLM (internal fusers). External fusers need nothing."""

    def detach(self) -> None:
        """Remove every hook `attach` installed."""

    def extra_repr(self) -> str:
        return self.selection.describe()
