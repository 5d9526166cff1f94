"""Greedy generation with a VisionLanguageModel: a batch of prompts, left-padded, KV cache.

Position ids follow each row's real tokens (cumsum of the attention mask), so a left-padded prompt sees the
same positions as the right-padded training sample it came from.

    prompts: TokenizedSample each (pipeline.conversation.prompt_for_generation), layers [B, k, T, D],
    text [B, d_s] | None -> generated ids per row (without the prompt, cut at eos)
"""

from __future__ import annotations

from typing import Sequence

import torch

from layerfuse.fusion import VisionLanguageModel
from layerfuse.pipeline.data.conversation import TokenizedSample


def left_pad(prompts: Sequence[TokenizedSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids [B, S], attention_mask [B, S], padding on the left."""
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), s), dtype=torch.long)
    for i, p in enumerate(prompts):
        n = len(p)
        ids[i, s - n :] = p.input_ids
        mask[i, s - n :] = 1
    return ids, mask


@torch.inference_mode()
def greedy_generate(
    vlm: VisionLanguageModel,
    prompts: Sequence[TokenizedSample],
    layers: torch.Tensor,
    text: torch.Tensor | None,
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int = 16,
    suppress: Sequence[int] = (),
) -> list[list[int]]:
    """Greedy decoding; `suppress` token ids are never generated (the image placeholder, typically)."""
    device = next(vlm.llm.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    has_image = torch.tensor([p.has_image for p in prompts], dtype=torch.bool, device=device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = vlm(ids, layers.to(device), None if text is None else text.to(device), has_image=has_image,
              attention_mask=mask, position_ids=position_ids, use_cache=True)
    cache = out.cache
    banned = torch.tensor(list(suppress), dtype=torch.long, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B]
        if banned.numel():
            logits = logits.index_fill(-1, banned, float("-inf"))
        return logits.argmax(-1)

    next_tok = pick(out.logits[:, -1])  # [B]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in prompts]
    pos = position_ids[:, -1]
    for _ in range(max_new_tokens):
        for i, t in enumerate(next_tok.tolist()):
            if not done[i] and t != eos_id:
                generated[i].append(t)
        done |= next_tok == eos_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        step = vlm(next_tok[:, None], None, attention_mask=mask, position_ids=pos[:, None], cache=cache, use_cache=True)
        cache = step.cache
        next_tok = pick(step.logits[:, -1])
    return generated
