"""greedy_generate: a left-padded batch with a KV cache decodes like one full forward per token of each prompt alone."""

from __future__ import annotations

import pytest
import torch
from layerfuse.fusion import LLMSpec, VisionLanguageModel, VisionSpec, build_fuser
from layerfuse.pipeline.data.conversation import IGNORE_INDEX, TokenizedSample
from layerfuse.pipeline.models.generate import greedy_generate
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.support import cache_deprecations

VOCAB = 64
IMAGE_TOKEN = 63
VISION = VisionSpec(num_layers=12, hidden_size=16, grid=(2, 2), has_cls=False)
STEPS = 6


def tiny_vlm(fuser_name: str) -> VisionLanguageModel:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    llm = AutoModelForCausalLM.from_config(config).eval()
    options = {"layers": "3-8-11"} if fuser_name == "xattn" else {}
    fuser = build_fuser(fuser_name, VISION, LLMSpec.from_config(config), **options)
    with torch.no_grad():
        for name, p in fuser.named_parameters():
            if "gate" in name:
                p.fill_(0.5)  # open xattn's gates, so that decoding steps depend on the image
    return VisionLanguageModel(fuser, llm, IMAGE_TOKEN).eval()


def prompt(ids: list[int], image_start: int) -> TokenizedSample:
    x = torch.tensor(ids, dtype=torch.long)
    if image_start >= 0:
        x = torch.cat([x[:image_start], torch.full((VISION.num_patches,), IMAGE_TOKEN), x[image_start:]])
    return TokenizedSample(x, torch.full_like(x, IGNORE_INDEX), image_start, VISION.num_patches if image_start >= 0 else 0)


@torch.no_grad()
def one_at_a_time(vlm: VisionLanguageModel, p: TokenizedSample, layers: torch.Tensor) -> list[int]:
    """The reference: the prompt alone, one full forward (no cache, no padding) per generated token."""
    ids, out = p.input_ids[None], []
    for _ in range(STEPS):
        logits = vlm(ids, layers[None], has_image=torch.tensor([p.has_image])).logits[0, -1]
        logits[IMAGE_TOKEN] = -torch.inf
        out.append(int(logits.argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


@pytest.mark.parametrize("fuser_name", ["concat", "xattn"])
def test_greedy_generate_matches_one_forward_per_token(fuser_name: str) -> None:
    vlm = tiny_vlm(fuser_name)
    g = torch.Generator().manual_seed(1)
    prompts = [prompt(torch.randint(1, IMAGE_TOKEN, (5,), generator=g).tolist(), 2),
               prompt(torch.randint(1, IMAGE_TOKEN, (9,), generator=g).tolist(), 1),  # the longest: no padding
               prompt(torch.randint(1, IMAGE_TOKEN, (4,), generator=g).tolist(), -1)]  # text only
    k = len(vlm.fuser.required_layers)
    layers = torch.randn(len(prompts), k, VISION.num_tokens, VISION.hidden_size, generator=g)
    expected = [one_at_a_time(vlm, p, layers[i]) for i, p in enumerate(prompts)]
    # eos: a token row 0 produces after at least one other; it stops there, the others go on (or stop where they produce it)
    eos = next((t for j, t in enumerate(expected[0]) if j and t not in expected[0][:j]), None)
    assert eos is not None, f"row 0 repeats one token: {expected[0]}; pick other seeds"
    cut = [e[: e.index(eos)] if eos in e else e for e in expected]
    assert 0 < len(cut[0]) < STEPS and any(len(c) > len(cut[0]) for c in cut[1:]), expected
    with cache_deprecations() as seen:
        got = greedy_generate(vlm, prompts, layers, None, pad_id=0, eos_id=eos, max_new_tokens=STEPS, suppress=[IMAGE_TOKEN])
    assert got == cut
    assert seen == []  # the cache went to transformers under the name it wants
