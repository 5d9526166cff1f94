"""`layerfuse infer`: a trained run on a raw image, live: no cache.

    image file -> decode (pipeline/images) -> the encoder's preprocessing -> vision tower, every hidden state
      -> the fuser's layers, rounded to the dtype the cache stored (so the model sees what it was trained on)
      -> + the question's sentence embedding (fusers that need it) -> prompt in the run's template -> greedy answer

The encoder, its preprocessing and the sentence model are the ones recorded in the run (from the cache it
was trained on), loaded from their folders or hub ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from layerfuse.core.dtypes import StorageDtype
from layerfuse.fusion import VisionLanguageModel
from layerfuse.pipeline.data.conversation import TokenizedSample, prompt_for_generation
from layerfuse.pipeline.models.generate import greedy_generate
from layerfuse.pipeline.data.images import decode_image
from layerfuse.pipeline.models.llm import LLMBundle
from layerfuse.pipeline.models.run import RunModel, load_run, load_run_encoder
from layerfuse.pipeline.models.text import InstructionEmbedder


@dataclass
class LiveInputs:
    """What the model consumes for a batch of (image, question) pairs."""

    layers: torch.Tensor  # [B, k, T, D] float32, rounded through the cache dtype
    text: torch.Tensor | None  # [B, d_s]
    prompts: list[TokenizedSample]


class LivePipeline:
    """Vision encoder + (sentence model) + the run's model, ready to answer questions about images."""

    def __init__(self, run: str | Path, *, device: str | torch.device = "cpu"):
        self.vlm, self.bundle, self.model = load_run(run, device=device)
        self.vlm: VisionLanguageModel
        self.bundle: LLMBundle
        self.model: RunModel
        self.encoder = load_run_encoder(self.model, str(run), device=device)
        self.preprocess = self.encoder.preprocessor(bool(self.model.encoder.get("pad_to_square")))
        self.suffixes = tuple(self.model.text_model.get("suffixes") or ())
        self.embedder = None
        if self.vlm.fuser.needs_text:
            self.embedder = InstructionEmbedder(self.model.text_model["path"], device=str(device), suffixes=self.suffixes)

    def inputs(self, images: Sequence[Image.Image], questions: Sequence[str]) -> LiveInputs:
        pixels = torch.from_numpy(np.stack([self.preprocess(im) for im in images]))  # [B, 3, H, W]
        hidden = self.encoder(pixels)[:, self.vlm.fuser.required_layers]  # [B, k, T, D]
        stored = StorageDtype(self.model.feature_dtype).torch_dtype
        layers = hidden.to(stored).float()
        text = None
        if self.embedder is not None:
            convs = [[{"from": "human", "value": q}] for q in questions]
            text = torch.from_numpy(self.embedder.embed(convs, [True] * len(convs), max_turns=1).mean)
        f = self.vlm.fuser
        prompts = [prompt_for_generation(q, self.bundle.tokenizer, self.model.template, num_visual_tokens=f.num_visual_tokens,
                                         image_token_id=self.bundle.image_token_id, has_image=True) for q in questions]
        return LiveInputs(layers, text, prompts)

    @torch.inference_mode()
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        x = self.inputs(images, questions)
        tok = self.bundle.tokenizer
        gen = greedy_generate(self.vlm, x.prompts, x.layers, x.text, pad_id=self.bundle.pad_token_id, eos_id=tok.eos_token_id,
                              max_new_tokens=max_new_tokens, suppress=[self.bundle.image_token_id])
        return [tok.decode(g, skip_special_tokens=True).strip() for g in gen]


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB, with the same decoding and conversions as extraction (bad files: SampleError)."""
    return decode_image(Path(path).read_bytes())

