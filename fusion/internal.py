"""Shared machinery of the LLM-internal fusers (MLVF I_D `inject`, I_M `xattn`; docs/methods.md#internal-fusion).

The input sequence carries the base layer as usual, `P(hs[base])`. Each extra term k (and the base too when the
spec lists it: `3-18-23` fuses 3, 18 and 23, `3-18` only 3 and 18) gets its own projector P_k and enters the LLM
just before decoder layer m(k) = int(p * L_llm / 24 - 1), p = k's position in the 24-block preset space (explicit
specs: int(k * L_llm / L_vit - 1)). Group presets `former` / `latter` / `all` are fused layer by layer by default
(`group_mode`): each of the first / last 12 blocks with its own projector into consecutive LLM layers (the first /
last 12); `group_mode="mean"` fuses each group's mean once instead. The plan is `layers.internal_plan`. The LLM is never forked or rewritten: `attach`
registers forward pre-hooks on the decoder layers of any Hugging Face decoder-only model with a standard `layers`
stack (Llama, Qwen2, Mistral, ...). Before each LLM call the model sets the batch's features and image span with
`set_context`; the hooks read it. The context stays set until the next call (or `clear_context`), so
recomputation under gradient checkpointing and the decoding steps after a cached prefill see the same features.

Positions: the hooks work in sequence indices (0..S-1 of the prefill, the image span's coordinates; left padding
included), not in `position_ids`. transformers 4.x passes `cache_position` to the decoder layers; 5.x does not, so
the offset of a decoding step is the length of the layer's own KV cache (not yet updated for this step), found
under whichever name the layer gets it (`cache` from transformers 5.24, `past_key_values` before; see kv_cache.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Fuser, FuserBuildError, FuserConfig, FuserOutput, LLMSpec, VisionSpec
from .kv_cache import cached_tokens, layer_cache
from .layers import LayerSpecError, internal_plan
from .projector import Projector


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder-layer stack of a Hugging Face causal LM (`model.layers` of Llama/Qwen2/Mistral...)."""
    candidates = []
    get_decoder = getattr(llm, "get_decoder", None)
    if callable(get_decoder):
        candidates.append(get_decoder())
    candidates += [getattr(llm, "model", None), llm]
    for c in candidates:
        layers = getattr(c, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise TypeError(
        f"{type(llm).__name__} has no decoder-layer stack `model.layers`; the internal fusers support decoder-only "
        "Hugging Face LMs with a standard `layers` ModuleList (Llama, Qwen2, Mistral, ...)"
    )


def sequence_positions(hidden: torch.Tensor, kwargs: dict, layer_idx: int) -> torch.Tensor:
    """Sequence indices [s] of the hidden states [B, s, d] entering decoder layer `layer_idx`.

    `cache_position` where the model passes it (transformers 4.x); otherwise the tokens already in this layer's
    KV cache (5.x: a layer's cache is updated inside the layer, so its pre-hook sees the length before this step;
    sliding-window caches count every token seen); without a cache the hidden states are the whole sequence.
    """
    s = hidden.shape[1]
    pos = kwargs.get("cache_position")
    if pos is not None and pos.numel() == s:
        return pos.to(hidden.device, torch.long).reshape(s)
    offset = cached_tokens(layer_cache(kwargs), layer_idx)
    return torch.arange(offset, offset + s, device=hidden.device)


@dataclass
class ImageSpan:
    """Where the image sits in the LLM input of the current batch.

    mask  [B, S] bool  the N image-token positions of each sample with an image (rows of samples without one are all False)
    start [B] long     first image position, -1 when the sample has no image
    """

    mask: torch.Tensor
    start: torch.Tensor

    @property
    def has_image(self) -> torch.Tensor:
        return self.start >= 0

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "ImageSpan":
        idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        start = torch.where(mask, idx, mask.shape[1]).min(dim=1).values
        return cls(mask, torch.where(start < mask.shape[1], start, -1))


@dataclass
class InternalConfig(FuserConfig):
    layers: str = "3-18-23"
    # how group terms are fused inside the LLM (docs/methods.md#internal-fusion): "per_layer" = each layer of the group
    # with its own projector (MLVF's former / latter / all: the first / last 12 blocks into consecutive LLM layers),
    # "mean" = the group's mean with one projector, where its last layer would enter; "auto" = per_layer for
    # former / latter / all (inject, xattn), mean for any other group
    group_mode: str = "auto"


class InternalFuser(Fuser):
    """Base of `inject` and `xattn`: tokens = P(base); per fused term k (`fused_terms[k]` indexes
    `selection.terms`), features P_k(term) [B, N, d] delivered to decoder layer `llm_layer_of[k]`.
    Subclasses implement `apply(k, hidden, positions)`."""

    internal = True
    fuses_listed_base: ClassVar[bool] = True  # a base written in the spec (3-18-23) is fused inside the LLM too

    # fusers whose group_mode "auto" fuses MLVF's group presets layer by layer (the authors' I_D and I_M); a subclass
    # under another name (deepstack) keeps group means unless told group_mode="per_layer"
    per_layer_fusers: ClassVar[tuple[str, ...]] = ("inject", "xattn")

    def __init__(self, config: InternalConfig, vision: VisionSpec, llm: LLMSpec):
        super().__init__(config, vision, llm)
        if llm.num_layers < 1:
            raise FuserBuildError(f"{self.name} needs the LLM's number of decoder layers (LLMSpec.num_layers)")
        if len(self.selection.base) != 1:
            raise FuserBuildError(f"{self.name}: the base term must be one layer, got a group in {self.selection.describe()}")
        try:
            plan = internal_plan(self.selection, llm.num_layers, config.group_mode,
                                 per_layer_default=self.name in self.per_layer_fusers, fuse_listed_base=self.fuses_listed_base)
        except LayerSpecError as e:
            raise FuserBuildError(f"{self.name}: {e}") from e
        # per_layer: the selection with each group split into its layers (what the fuser reads; no group means)
        self.selection = plan.selection
        self._inputs = list(self.selection.layers)
        self._positions = self.selection.positions()
        self.group_mode = plan.group_mode
        # the resolved mode goes into the config, so a saved run's options say what it was built with ("auto" is
        # not stored: a later default cannot change how its weights are read back)
        self.config = dataclasses.replace(config, group_mode=plan.group_mode)
        self._plan_layers = list(plan.llm_layers)
        # the fused terms: the extra terms, and the base when the spec lists it (3-18-23 -> three LLM layers)
        self.fused_terms = list(plan.fused_terms)
        if not self.fused_terms:
            raise FuserBuildError(f"{self.name} fuses extra layers inside the LLM; {self.selection.describe()} has none")
        d = llm.hidden_size
        self.projector = Projector(vision.hidden_size, d, config.projector_depth)
        self.layer_projectors = nn.ModuleList(self.layer_projector() for _ in self.fused_terms)
        self.llm_layer_of = self.injection_layers()
        self._handles: list[Any] = []
        self._context: tuple[dict[int, torch.Tensor], ImageSpan] | None = None

    def layer_projector(self) -> nn.Module:
        """P_k of one fused term: [B, N, D] -> [B, N, d]."""
        return Projector(self.vision.hidden_size, self.llm.hidden_size, self.config.projector_depth)

    def injection_layers(self) -> list[int]:
        """The decoder layer each fused term enters before (fusion/layers.py internal_plan): MLVF's m(k) from the
        term's 24-block preset position (int(k * L_llm / L - 1) for explicit specs); a group mean where its last layer
        would; per-layer former / latter / all into consecutive LLM layers."""
        return list(self._plan_layers)

    def fuse(self, layers: torch.Tensor, text: torch.Tensor | None) -> FuserOutput:
        n = len(self.selection.terms)
        tokens = self.projector(self.term(layers, n - 1))
        internal = {k: p(self.term(layers, t)) for k, (t, p) in enumerate(zip(self.fused_terms, self.layer_projectors))}
        return FuserOutput(tokens, internal=internal)

    # -- context and hooks -----------------------------------------------------------------------------
    def set_context(self, internal: dict[int, torch.Tensor], span: ImageSpan) -> None:
        self._context = (internal, span)

    def clear_context(self) -> None:
        self._context = None

    @property
    def context(self) -> tuple[dict[int, torch.Tensor], ImageSpan] | None:
        """(features by fused term, image span) of the last `set_context`, or None."""
        return self._context

    def attach(self, llm: nn.Module) -> None:
        self.detach()
        stack = decoder_layers(llm)
        if len(stack) != self.llm.num_layers:
            raise FuserBuildError(f"{self.name} was built for {self.llm.num_layers} decoder layers, the LLM has {len(stack)}")
        for m in sorted(set(self.llm_layer_of)):
            terms = [k for k, mk in enumerate(self.llm_layer_of) if mk == m]
            self._handles.append(stack[m].register_forward_pre_hook(self._hook(m, terms), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, m: int, terms: list[int]):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._context is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            span = self._context[1]
            if hidden.shape[0] != span.mask.shape[0]:
                raise RuntimeError(
                    f"{self.name}: the fuser's context is for a batch of {span.mask.shape[0]} samples, decoder layer {m} "
                    f"got {hidden.shape[0]}; run the batch through VisionLanguageModel (which sets the context) or call "
                    "fuser.clear_context() to use the LLM without the image"
                )
            layer_idx = getattr(getattr(module, "self_attn", None), "layer_idx", m)
            positions = sequence_positions(hidden, kwargs, layer_idx)
            for k in terms:
                hidden = self.apply(k, hidden, positions)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return pre_hook

    def apply(self, k: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Fuse term k into the residual stream `hidden` [B, s, d] entering its decoder layer; `positions` [s]
        are the sequence indices of those s tokens (0..S-1 in a prefill, S.. in decoding steps)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        where = ", ".join(f"{self.selection.terms[t][-1]}->{m}" for t, m in zip(self.fused_terms, self.llm_layer_of))
        return f"{super().extra_repr()}; vision layer -> LLM layer: {where}"
