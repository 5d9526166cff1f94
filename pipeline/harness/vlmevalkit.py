"""A VLMEvalKit-style model: a trained run behind VLMEvalKit's model interface, answering from raw images live.

VLMEvalKit (`vlmeval`, installed from its git repository, not from PyPI) calls `model.generate(message, dataset=None)`
with a message in one of its four forms: a string, a dict, a list of strings (image file paths and texts) or a list
of dicts `{"type": "image" | "text", "value": path-or-text}`. Like its non-interleaved models (`INTERLEAVE = False`,
`BaseModel.message_to_promptimg`), this one answers from the first image and the texts joined with newlines. An
image value may also be a PIL image (handy outside VLMEvalKit). Register it in VLMEvalKit's `vlmeval/config.py`:

    from functools import partial
    from layerfuse.pipeline.harness.vlmevalkit import LayerfuseVLM
    supported_VLM["layerfuse"] = partial(LayerfuseVLM, run="runs/default/stage2")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from layerfuse.core.errors import InputError
from layerfuse.pipeline.harness.live import LiveRun, Request, first_image

Message = str | dict[str, Any] | list[str] | list[dict[str, Any]]
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def message_items(message: Message) -> list[dict[str, Any]]:
    """Any of VLMEvalKit's four message forms -> [{"type": "image" | "text", "value": ...}] (its `preproc_content`:
    in a list of strings, an existing file with an image suffix is an image, anything else text)."""
    if isinstance(message, str):
        return [{"type": "text", "value": message}]
    if isinstance(message, dict):
        message = [message]
    if not isinstance(message, list) or not message:
        raise InputError(f"a VLMEvalKit message is a str, a dict or a non-empty list of either, not {type(message).__name__}")
    items = []
    for m in message:
        if isinstance(m, str):
            is_image = Path(m).suffix.lower() in _IMAGE_SUFFIXES and Path(m).is_file()
            items.append({"type": "image" if is_image else "text", "value": m})
        elif isinstance(m, dict) and m.get("type") in ("image", "text") and "value" in m:
            items.append(m)
        else:
            raise InputError(f"message item {m!r:.80}: expected a string or {{'type': 'image' | 'text', 'value': ...}}")
    return items


class LayerfuseVLM:
    """A layerfuse run folder as a VLMEvalKit model (the interface of `vlmeval.vlm.base.BaseModel`)."""

    INTERLEAVE = False  # one image per question: the first
    is_api = False
    allowed_types = ["text", "image"]

    def __init__(self, run: str | Path, *, device: str | torch.device = "auto", max_new_tokens: int = 128):
        self.run = LiveRun(run, device=device)
        self.max_new_tokens = max_new_tokens

    def use_custom_prompt(self, dataset: str | None) -> bool:
        """No prompt of our own: the dataset's prompt (VLMEvalKit's `build_prompt`) is asked as it is."""
        return False

    def request(self, message: Message) -> Request:
        items = message_items(message)
        images: list[str | Image.Image] = [m["value"] for m in items if m["type"] == "image"]
        text = "\n".join(str(m["value"]) for m in items if m["type"] == "text")
        return Request(first_image(images, where="VLMEvalKit message"), text)

    def generate_inner(self, message: Message, dataset: str | None = None) -> str:
        return self.run.answer([self.request(message)], max_new_tokens=self.max_new_tokens)[0]

    def generate(self, message: Message, dataset: str | None = None) -> str:
        """The greedy answer to one message (`dataset`, VLMEvalKit's dataset name, changes nothing here)."""
        return self.generate_inner(message, dataset)

    def batch_generate(self, messages: list[Message], dataset: str | None = None) -> list[str]:
        """Several messages answered as one batch (the same answers as one by one)."""
        return self.run.answer([self.request(m) for m in messages], max_new_tokens=self.max_new_tokens)
