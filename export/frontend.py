"""The exported visual front end as one module: fuser + projector (optionally the vision encoder in front).

`FrontEnd` is what `layerfuse.export.onnx` exports, what `layerfuse.export.verify` and `layerfuse.export.engine` run in
eager PyTorch to compare with, and `FrontEndSignature` the graph's input/output names and example shapes:

    inputs   layers [B, k, T, D] (or pixel_values [B, 3, H, W] with an encoder), text [B, d_s] (igva, tgif router=sentence)
             or [B, d] (tgif router=llm: the mean LLM token embedding of the prompt, computed outside the graph)
    outputs  tokens [B, N_v, d], weights [B, K] (igva, tgif), internal_<k>_llm_layer_<m> [B, N, d] (internal fusers)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from layerfuse.core.errors import ConfigError
from layerfuse.fusion.base import Fuser


class OnnxExportError(ConfigError):
    """The fuser (or fuser + encoder) cannot be exported as asked."""


@dataclass(frozen=True)
class FrontEndSignature:
    """Names and example shapes of the exported graph's inputs and outputs."""

    inputs: tuple[str, ...]  # "layers" | "pixel_values", then "text" when the fuser needs it
    outputs: tuple[str, ...]  # "tokens", then "weights" and/or "internal_<k>_llm_layer_<m>"
    input_shapes: tuple[tuple[int, ...], ...]  # for batch 1; dim 0 is the dynamic batch


class FrontEnd(nn.Module):
    """fuser (+ encoder) as one module with tensor outputs in `signature.outputs` order.

    forward(x [B, k, T, D] or pixel_values [B, 3, H, W], text [B, d_s] | None) -> tuple of [B, ...] tensors
    """

    def __init__(self, fuser: Fuser, encoder: Any | None = None):
        super().__init__()
        self.fuser = fuser
        self.encoder = encoder.model if encoder is not None else None
        if encoder is not None:
            check_encoder_matches(fuser, encoder)
        self.signature = self._signature()

    def hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> the fuser's layers [B, k, T, D]."""
        hs = self.encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states  # L+1 x [B, T, D]
        return torch.stack([hs[i] for i in self.fuser.required_layers], dim=1)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        layers = self.hidden_states(x) if self.encoder is not None else x
        out = self.fuser(layers, text)
        extra = [] if out.weights is None else [out.weights]
        return (out.tokens, *extra, *(out.internal[k] for k in sorted(out.internal)))

    @property
    def device(self) -> torch.device:
        return next(self.fuser.parameters()).device

    def example_inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random CPU inputs of this signature (normal noise) for `batch` samples."""
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(batch, *shape[1:], generator=g) for shape in self.signature.input_shapes)

    def _signature(self) -> FrontEndSignature:
        f, v = self.fuser, self.fuser.vision
        if self.encoder is not None:
            size = _encoder_image_size(self.encoder)
            names, shapes = ["pixel_values"], [(1, 3, size, size)]
        else:
            names, shapes = ["layers"], [(1, len(f.required_layers), v.num_tokens, v.hidden_size)]
        takes_text = f.needs_text or f.needs_prompt  # the cached sentence embedding, or the prompt's mean LLM token embedding
        if takes_text:
            names.append("text")
            shapes.append((1, f.text_dim))
        device = self.device
        layers = torch.zeros(1, len(f.required_layers), v.num_tokens, v.hidden_size, device=device)
        text = torch.zeros(1, f.text_dim, device=device) if takes_text else None
        with torch.no_grad(), eval_mode(f):
            out = f(layers, text)
        outputs = ["tokens"] + (["weights"] if out.weights is not None else [])
        llm_layer_of = getattr(f, "llm_layer_of", None)
        for k in sorted(out.internal):
            outputs.append(f"internal_{k}_llm_layer_{llm_layer_of[k]}" if llm_layer_of else f"internal_{k}")
        return FrontEndSignature(tuple(names), tuple(outputs), tuple(shapes))


def check_encoder_matches(fuser: Fuser, encoder: Any) -> None:
    """The encoder (a `VisionEncoder`) must produce the features the fuser was built for."""
    info, v = encoder.info, fuser.vision
    got = (info.num_layers, info.hidden_size, tuple(info.grid), info.has_cls)
    want = (v.num_layers, v.hidden_size, tuple(v.grid), v.has_cls)
    if got != want:
        raise OnnxExportError(
            f"encoder '{info.name}' gives (layers, hidden, grid, CLS) = {got} but the {fuser.name} fuser was built "
            f"for {want}; export with the encoder the features were extracted with"
        )


def _encoder_image_size(model: nn.Module) -> int:
    cfg = getattr(model.config, "vision_config", model.config)
    return int(cfg.image_size)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode inside the block, its previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
