"""The frozen vision tower: loading (hub id or local directory), preprocessing, and all-layer forward.

A ViT with L blocks yields L+1 hidden states (docs/methods.md#layer-indexing-and-presets): hs[0] is the embedding
output (after CLIP's `pre_layrnorm`), hs[i] the output of block i; none passes through `post_layernorm`.
`VisionEncoder.forward` returns them stacked, every token kept (CLS included where the model has one).

The embedded default (`--vision default`) is a small CLIP built and pretrained in code (pipeline/models/default_vision.py),
saved to a directory and loaded back through exactly the same code path as a real checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn

from layerfuse.core.fingerprint import fingerprint
from layerfuse.core.hub import CheckpointError, load_pretrained
from layerfuse.pipeline.data.images import expand_to_square

DEFAULT_VISION = "default"

# model_type -> vision-tower class name in transformers. Full CLIP/SigLIP checkpoints (with a text tower)
# load their vision half through the vision class; anything else goes through AutoModel.
VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "siglip2_vision_model": "Siglip2VisionModel",
}
HAS_CLS = {"clip": True, "clip_vision_model": True, "siglip": False, "siglip_vision_model": False}


@dataclass(frozen=True)
class EncoderInfo:
    """What the cache records about the encoder; also what fusers need to know about the features."""

    name: str
    revision: str | None
    model_type: str
    config_hash: str
    num_layers: int  # L (blocks); the cache stores L+1 hidden states
    num_tokens: int  # T, CLS included where present
    hidden_size: int  # D
    has_cls: bool
    grid: tuple[int, int]  # (h, w) of the patch grid
    processor: dict[str, Any] = field(default_factory=dict)


def _size_value(size: Any, key: str) -> int | None:
    """One entry of an image processor's `size` (a dict, or transformers' SizeDict), None when absent."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def resized_pixels(size: Any, width: int, height: int) -> int:
    """Pixels of a width x height image after an HF image processor's resize to `size`, by the forms transformers
    uses: {"height", "width"} (fixed), {"shortest_edge"} (aspect kept, optionally capped by "longest_edge"),
    {"longest_edge"}, {"max_height", "max_width"}, {"max_pixels"}; an int is taken as a shortest edge. Unknown
    forms: the input's pixels. Integer arithmetic, so extreme aspect ratios stay exact."""
    if isinstance(size, int):
        size = {"shortest_edge": size}
    short, long = min(width, height), max(width, height)
    fixed_h, fixed_w = _size_value(size, "height"), _size_value(size, "width")
    if fixed_h and fixed_w:
        return fixed_h * fixed_w
    shortest, longest = _size_value(size, "shortest_edge"), _size_value(size, "longest_edge")
    if shortest:
        new_short, new_long = shortest, -(-shortest * long // short)
        if longest and new_long > longest:
            new_short, new_long = -(-longest * new_short // new_long), longest
        return new_short * new_long
    if longest:
        return longest * -(-longest * short // long)
    max_h, max_w = _size_value(size, "max_height"), _size_value(size, "max_width")
    if max_h and max_w:
        return max_h * max_w
    return _size_value(size, "max_pixels") or width * height


class ImagePreprocessor:
    """Picklable image -> pixel_values transform, run in DataLoader workers.

    pad_to_square reproduces LLaVA's `expand2square`: pad to a square with the processor's mean colour,
    then the processor's own resize/crop/normalise. `working_pixels(w, h)` is the most pixels that makes a
    w x h image occupy on the way; extraction refuses images above --max-pixels by it before decoding them.
    """

    def __init__(self, processor: Any, pad_to_square: bool):
        self.processor = processor
        self.pad_to_square = pad_to_square
        mean = getattr(processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self.fill = tuple(int(round(m * 255)) for m in mean)

    def working_pixels(self, width: int, height: int) -> int:
        """The largest image (in pixels) preprocessing a width x height image creates: the decoded image itself,
        the padded square (pad_to_square: side*side), the processor's resize (e.g. a shortest edge of 224 turns a
        20000x1 image into 224 x 4480000)."""
        most = width * height
        if self.pad_to_square:
            width = height = max(width, height)
            most = width * height
        if getattr(self.processor, "do_resize", True):
            most = max(most, resized_pixels(getattr(self.processor, "size", None), width, height))
        return most

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 [3, H, W]."""
        if self.pad_to_square:
            image = expand_to_square(image, self.fill)
        return np.asarray(self.processor(images=image, return_tensors="np")["pixel_values"][0], dtype=np.float32)


def _output_shape(model: nn.Module, size: int) -> tuple[int, ...]:
    """[1, L+1, T, D] of one size x size image: traced on the meta device (no arithmetic: a real ViT-L/14-336 forward
    is 1.3 s on a CPU), or by a real forward where the tower's code does not run on meta tensors."""
    try:
        with torch.device("meta"):
            shadow = type(model)(model.config)
        return tuple(VisionEncoder(shadow, None, None)(torch.zeros(1, 3, size, size, device="meta")).shape)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - any failure on meta: measure for real
        return tuple(VisionEncoder(model, None, None)(torch.zeros(1, 3, size, size)).shape)  # type: ignore[arg-type]


def _model_class(model_type: str) -> type:
    return getattr(transformers, VISION_CLASSES.get(model_type, "AutoModel"))


# keys of a transformers config that name where or how it was saved or loaded, not the architecture
SAVE_RECORD_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype", "architectures")


def config_hash(config: Any) -> str:
    """The fingerprint of a vision tower's architecture: its transformers config without SAVE_RECORD_KEYS."""
    return fingerprint({k: v for k, v in config.to_dict().items() if k not in SAVE_RECORD_KEYS})


class VisionEncoder(nn.Module):
    """A frozen HF vision tower that returns every hidden state.

    forward: pixel_values [B, 3, H, W] -> hidden states [B, L+1, T, D]
    """

    def __init__(self, model: nn.Module, processor: Any, info: EncoderInfo):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.info = info

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        out = self.model(pixel_values=pixel_values.to(param.device, param.dtype), output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=1)

    def preprocessor(self, pad_to_square: bool) -> ImagePreprocessor:
        return ImagePreprocessor(self.processor, pad_to_square)


def load_vision_encoder(
    name_or_path: str,
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VisionEncoder:
    """Load a vision tower and its image processor from a hub id or a local directory."""
    config = load_pretrained("vision config", name_or_path, transformers.AutoConfig.from_pretrained, revision=revision)
    model_type = config.model_type
    model = load_pretrained(
        "vision tower", name_or_path, _model_class(model_type).from_pretrained, revision=revision, dtype=dtype
    )
    processor = load_pretrained(
        "image processor", name_or_path, transformers.AutoImageProcessor.from_pretrained, revision=revision
    )
    model = model.to(device)
    vcfg = getattr(config, "vision_config", config)
    size = int(getattr(vcfg, "image_size", 224))
    _, n_hidden, n_tokens, hidden = _output_shape(model, size)
    patch = int(getattr(vcfg, "patch_size", 0) or 0)
    side = size // patch if patch else int(round((n_tokens) ** 0.5))
    has_cls = HAS_CLS.get(model_type, n_tokens == side * side + 1)
    if n_tokens - int(has_cls) != side * side:
        raise CheckpointError(
            f"vision tower '{name_or_path}' returned {n_tokens} tokens, which is not a {side}x{side} patch grid"
            f"{' plus CLS' if has_cls else ''}; layerfuse needs a square ViT patch grid"
        )
    proc = {k: v for k, v in processor.to_dict().items() if not k.startswith("_")}
    info = EncoderInfo(
        name=str(name_or_path),
        revision=revision,
        model_type=model_type,
        config_hash=config_hash(config),
        num_layers=n_hidden - 1,
        num_tokens=n_tokens,
        hidden_size=hidden,
        has_cls=has_cls,
        grid=(side, side),
        processor=json.loads(json.dumps(proc, default=str)),
    )
    return VisionEncoder(model, processor, info)
