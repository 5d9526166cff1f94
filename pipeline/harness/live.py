"""A trained run answering and scoring benchmark requests from raw images, live: the path of `layerfuse infer`.

    Request(image | None, text) -> LivePipeline.inputs: the recorded encoder on the image, every hidden state, the
      fuser's layers rounded to the cache dtype, the question's sentence embedding (fusers that need it)
    answer:        prompt in the run's template -> greedy_generate -> text, cut at the first stop string
    loglikelihood: the training tokenisation of (text, continuation) -> one forward -> the summed log-probabilities
                   of the continuation's tokens, and whether greedy decoding picks each of them

A request carries at most one image (the run's model has one image slot, as LLaVA-1.5): harnesses that hand over
several pass the first (`first_image`, with a warning), as VLMEvalKit's non-interleaved models do. A request
without an image is asked as a text-only sample: no image tokens, and zero features and embedding where the
batch needs a row (the cache's marked-empty rule).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from layerfuse.core.distributed import DistContext
from layerfuse.core.errors import InputError
from layerfuse.pipeline.data.conversation import IGNORE_INDEX, IMAGE_TOKEN, TokenizedSample, collate, prompt_for_generation, tokenize_conversation
from layerfuse.pipeline.data.images import to_rgb
from layerfuse.pipeline.models.generate import greedy_generate
from layerfuse.pipeline.training.infer import LivePipeline, load_image


@dataclass(frozen=True)
class Request:
    """One question (a human turn's text) about at most one image."""

    image: Image.Image | None
    text: str


def as_image(visual: Any, *, where: str) -> Image.Image:
    """A PIL image (any mode: converted to RGB as extraction does) or an image file path -> RGB image."""
    if isinstance(visual, Image.Image):
        visual.load()
        return to_rgb(visual)
    if isinstance(visual, (str, Path)) and Path(visual).is_file():
        return load_image(visual)
    raise InputError(f"{where}: {type(visual).__name__} {str(visual)[:80]!r} is neither a PIL image nor an image file; "
                     "a layerfuse run answers about still images only")


def first_image(visuals: Sequence[Any], *, where: str) -> Image.Image | None:
    """The image a request is asked about: the first of `visuals` (None when there is none)."""
    if not visuals:
        return None
    if len(visuals) > 1:  # one message for all such requests, so that Python's default filter shows it once
        warnings.warn("requests with several images are answered from their first: the run's model has one image slot",
                      stacklevel=2)
    return as_image(visuals[0], where=where)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (lm-eval's `until`), stripped."""
    ends = [text.find(s) for s in until if s and s in text]
    return (text[: min(ends)] if ends else text).strip()


class LiveRun:
    """A run folder loaded for live answering and scoring (LivePipeline: encoder, sentence model, the run's model)."""

    def __init__(self, run: str | Path, *, device: str | torch.device = "auto"):
        self.pipe = LivePipeline(run, device=DistContext().device(str(device)))
        self.device = next(self.pipe.vlm.llm.parameters()).device
        self.tokenizer = self.pipe.bundle.tokenizer

    def _prompt_text(self, r: Request) -> str:
        return r.text if r.image is not None else r.text.replace(IMAGE_TOKEN, "").strip()

    def features(self, requests: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> layers [B, k, T, D] (float32, rounded through the cache dtype), text [B, d_s] | None (fusers that need it).

        Rows without an image are zeros (they carry no image tokens, so the fuser's output for them is not used)."""
        f, spec = self.pipe.vlm.fuser, self.pipe.model.vision_spec()
        layers = torch.zeros((len(requests), len(f.required_layers), spec.num_tokens, spec.hidden_size))
        text = torch.zeros((len(requests), self.pipe.embedder.dim)) if self.pipe.embedder is not None else None
        rows = [i for i, r in enumerate(requests) if r.image is not None]
        if rows:
            x = self.pipe.inputs([requests[i].image for i in rows], [requests[i].text for i in rows])
            layers[rows] = x.layers.cpu()
            if text is not None:
                text[rows] = x.text.cpu()
        return layers.to(self.device), None if text is None else text.to(self.device)

    @torch.inference_mode()
    def answer(self, requests: Sequence[Request], *, max_new_tokens: int = 32, until: Sequence[str] = ()) -> list[str]:
        """Greedy answers, each cut at the first stop string of `until`."""
        if not requests:
            return []
        f, bundle = self.pipe.vlm.fuser, self.pipe.bundle
        prompts = [prompt_for_generation(self._prompt_text(r), self.tokenizer, self.pipe.model.template, num_visual_tokens=f.num_visual_tokens,
                                         image_token_id=bundle.image_token_id, has_image=r.image is not None) for r in requests]
        layers, text = self.features(requests)
        gen = greedy_generate(self.pipe.vlm, prompts, layers, text, pad_id=bundle.pad_token_id, eos_id=self.tokenizer.eos_token_id,
                              max_new_tokens=max_new_tokens, suppress=[bundle.image_token_id])
        return [cut_at_stop(self.tokenizer.decode(g, skip_special_tokens=True), until) for g in gen]

    def scored_sample(self, r: Request, continuation: str) -> tuple[TokenizedSample, int]:
        """The training tokenisation of (r.text, continuation) and how many of its supervised tokens are the
        continuation's: all but the end-of-turn token(s) the template puts after every answer (those of an empty
        answer). The continuation is the assistant's reply, leading and trailing spaces stripped (the template
        supplies the space after "ASSISTANT:")."""
        f, bundle, template = self.pipe.vlm.fuser, self.pipe.bundle, self.pipe.model.template
        has_image = r.image is not None

        def tokens(answer: str) -> TokenizedSample:
            conv = [{"from": "human", "value": self._prompt_text(r)}, {"from": "gpt", "value": answer}]
            return tokenize_conversation(conv, self.tokenizer, template, num_visual_tokens=f.num_visual_tokens,
                                         image_token_id=bundle.image_token_id, max_length=sys.maxsize, has_image=has_image)

        sample = tokens(continuation.strip())
        return sample, sample.num_supervised - tokens("").num_supervised

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[Request], continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation token | everything before it), whether each is the greedy choice) per request.

        The sample is the one training would build from (text, continuation), run through the same forward as the
        training objective (fuser, tokens placed, LLM on inputs_embeds, right padding), so the sum is minus the
        objective's summed cross-entropy on the continuation's tokens. The greedy check leaves out the image token,
        which generation never picks."""
        if not requests:
            return []
        bundle, vlm = self.pipe.bundle, self.pipe.vlm
        scored = [self.scored_sample(r, c) for r, c in zip(requests, continuations, strict=True)]
        batch = collate([s for s, _ in scored], bundle.pad_token_id).to(self.device)  # [B, S]
        layers, text = self.features(requests)
        # labels mark the answer and end-of-turn tokens as in training, so a fuser pooling the prompt leaves them out
        embeds, _ = vlm.prepare(batch.input_ids, layers, text, batch.has_image, batch.attention_mask, batch.labels)  # [B, S, d]
        logits = vlm.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1]  # [B, S-1, V]
        logp = logits.float().log_softmax(-1)  # position t predicts token t+1
        choice = logp.index_fill(-1, torch.tensor([bundle.image_token_id], device=logp.device), float("-inf")).argmax(-1)  # [B, S-1]
        targets = batch.input_ids[:, 1:]  # [B, S-1]
        out = []
        for i, (_, n) in enumerate(scored):
            pos = (batch.labels[i, 1:] != IGNORE_INDEX).nonzero().flatten()[:n]  # the continuation's n tokens
            lp = logp[i, pos].gather(-1, targets[i, pos, None]).sum()
            out.append((float(lp), bool((choice[i, pos] == targets[i, pos]).all())))
        return out
