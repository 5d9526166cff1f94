"""The vision-language model of phase two: fuser (+ projector) + a Hugging Face causal LM.

Input ids carry `num_visual_tokens` copies of `image_token_id` where the image goes (the tokenizer side
expands `<image>`); their embeddings are replaced by the fuser's visual tokens, in order, like transformers'
LLaVA. Internal fusers get their features and the image span through `set_context` before the LLM runs.
A fuser that `needs_prompt` (tgif with router=llm) gets as `text` the mean LLM token embedding of the prompt:
the tokens that are not padding, not image placeholders and not supervised (label < 0: IGNORE_INDEX), so the
answer tokens of a training sample never reach it; training must therefore pass `labels`.

    input_ids [B, S], layers [B, k, T, D], text [B, d_s] | None, has_image [B] -> logits [B, S, V]

Decoding with a KV cache: call it again with the new token(s) and `cache=` the previous output's `cache`
(`layers` may be None); the model passes it to the LLM under the name its transformers version wants (kv_cache.py).
Such a step carries no image; the internal fusers keep the context of the prefill (inject adds nothing, xattn
still attends to the image). Calling the LLM directly after a prefill through this model (e.g. transformers'
`generate(inputs_embeds=...)`) works the same way, as long as the fuser context is that prefill's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Fuser, FuserOutput
from .internal import ImageSpan, InternalFuser
from .kv_cache import LEGACY, cache_kwargs, cached_tokens, output_cache


@dataclass
class VLMOutput:
    logits: torch.Tensor  # [B, S, V]
    loss: torch.Tensor | None  # LM loss (+ the fuser's aux loss)
    lm_loss: torch.Tensor | None
    fused: FuserOutput | None  # None in a decoding step (the fuser does not run)
    cache: object | None = None  # the LLM's KV cache when called with use_cache=True


class VisionLanguageModel(nn.Module):
    def __init__(self, fuser: Fuser, llm: nn.Module, image_token_id: int):
        super().__init__()
        self.fuser = fuser
        self.llm = llm
        self.image_token_id = int(image_token_id)
        fuser.attach(llm)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] -> the LLM's token embeddings [B, S, d] (image placeholders embedded as id 0)."""
        return self.llm.get_input_embeddings()(input_ids.masked_fill(input_ids == self.image_token_id, 0))

    def prompt_embedding(self, input_ids: torch.Tensor, token_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean token embedding of each row's prompt tokens: [B, S], [B, S, d] -> [B, d] (fp32; zeros for a row without any).

        Prompt tokens: attended (attention_mask), not image placeholders, and not supervised (labels < 0). Without
        labels every attended text token counts (a generation prompt holds no answer); in training mode labels are
        required, so that answer tokens cannot leak into the fusion."""
        if labels is None and self.training:
            raise ValueError(
                f"{self.fuser.name} pools the prompt's token embeddings: pass `labels` in training so that the answer "
                "tokens (label >= 0) are left out"
            )
        keep = input_ids != self.image_token_id  # [B, S]
        if attention_mask is not None:
            keep = keep & attention_mask.to(keep.device).bool()
        if labels is not None:
            keep = keep & (labels.to(keep.device) < 0)
        w = keep.unsqueeze(-1).float()  # [B, S, 1]
        return (token_embeds.float() * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)

    def embed(self, input_ids: torch.Tensor, fused: FuserOutput, has_image: torch.Tensor | None = None,
              token_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, ImageSpan]:
        """input_ids [B, S] -> inputs_embeds [B, S, d] with the visual tokens in place, and the image span
        (`token_embeds` [B, S, d]: the token embeddings when already looked up)."""
        mask = input_ids == self.image_token_id  # [B, S]
        b = input_ids.shape[0]
        if has_image is None:
            has_image = mask.any(dim=1)
        has_image = has_image.to(mask.device, torch.bool)
        n_v = fused.tokens.shape[1]
        counts = mask.sum(dim=1)
        expected = has_image.long() * n_v
        if not torch.equal(counts, expected):
            bad = (counts != expected).nonzero().flatten().tolist()
            raise ValueError(
                f"image placeholders do not match the visual tokens for batch rows {bad}: found "
                f"{counts[bad].tolist()} tokens {self.image_token_id}, expected {expected[bad].tolist()} "
                f"({n_v} per sample with an image)"
            )
        embeds = self.token_embeddings(input_ids) if token_embeds is None else token_embeds
        visual = fused.tokens[has_image.to(fused.tokens.device)].to(embeds.dtype)  # [B_img, N_v, d]
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), visual)
        if b and not has_image.any():
            embeds = embeds + 0.0 * fused.tokens.sum()  # keep the fuser in the graph (DDP needs every param used)
        return embeds, ImageSpan.from_mask(mask)

    def prepare(
        self, input_ids: torch.Tensor, layers: torch.Tensor, text: torch.Tensor | None = None, has_image: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, FuserOutput]:
        """Run the fuser, place its tokens and hand the internal fusers their context: -> inputs_embeds [B, S, d].

        `attention_mask` and `labels` [B, S] only matter to a fuser that `needs_prompt` (its `text` is computed here)."""
        token_embeds = self.token_embeddings(input_ids)  # [B, S, d]
        if self.fuser.needs_prompt:
            text = self.prompt_embedding(input_ids, token_embeds, attention_mask, labels)
        fused = self.fuser(layers, text)
        embeds, span = self.embed(input_ids, fused, has_image, token_embeds)
        if isinstance(self.fuser, InternalFuser):
            self.fuser.set_context(fused.internal, span)
        return embeds, fused

    def forward(
        self,
        input_ids: torch.Tensor,
        layers: torch.Tensor | None,
        text: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: object | None = None,
        **llm_kwargs,
    ) -> VLMOutput:
        legacy = [name for name in LEGACY if name in llm_kwargs]
        if legacy:
            raise TypeError(f"VisionLanguageModel takes the KV cache as `cache=`, not `{legacy[0]}=`")
        llm_kwargs.update(cache_kwargs(self.llm, cache))
        past = cached_tokens(cache)
        if past > 0:
            return self._decode_step(input_ids, past, attention_mask, labels, llm_kwargs)
        if layers is None:
            raise ValueError("`layers` (the cached vision features) are needed unless this is a decoding step with a filled KV cache")
        embeds, fused = self.prepare(input_ids, layers, text, has_image, attention_mask, labels)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **llm_kwargs)
        lm_loss = getattr(out, "loss", None)
        loss = lm_loss
        if loss is not None and fused.aux_loss is not None:
            loss = loss + fused.aux_loss
        return VLMOutput(out.logits, loss, lm_loss, fused, output_cache(out))

    def _decode_step(self, input_ids: torch.Tensor, past: int, attention_mask: torch.Tensor | None,
                     labels: torch.Tensor | None, llm_kwargs: dict) -> VLMOutput:
        """Tokens after a cached prefill: text only; the internal fusers keep the prefill's context."""
        placeholders = input_ids == self.image_token_id
        if placeholders.any():
            bad = placeholders.any(dim=1).nonzero().flatten().tolist()
            raise ValueError(
                f"image placeholders in a decoding step (batch rows {bad}, {past} tokens already cached): "
                "the image must be part of the prefill"
            )
        if isinstance(self.fuser, InternalFuser):
            context = self.fuser.context
            if context is None:
                raise RuntimeError(
                    f"{self.fuser.name}: a decoding step with a filled KV cache but no image context; run the prefill "
                    "through this VisionLanguageModel first (and do not clear_context() in between)"
                )
            b, s = context[1].mask.shape
            if b != input_ids.shape[0] or s > past:
                raise RuntimeError(
                    f"{self.fuser.name}: the fuser's context is for a batch of {b} samples x {s} tokens, this decoding "
                    f"step has {input_ids.shape[0]} samples after {past} cached tokens; run its prefill through this "
                    "VisionLanguageModel first"
                )
        out = self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **llm_kwargs)
        lm_loss = getattr(out, "loss", None)
        return VLMOutput(out.logits, lm_loss, lm_loss, None, output_cache(out))
