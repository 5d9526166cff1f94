"""Internal fusers (`inject` = MLVF I_D, `xattn` = MLVF I_M) and VisionLanguageModel on real Hugging Face
causal LMs (docs/methods.md#internal-fusion).

Tiny Llama / Qwen2 / Mistral models are built from their configs with a fixed seed, saved with
`save_pretrained` and loaded back through `AutoModelForCausalLM.from_pretrained` (the real loading path).
Mistral gets a sliding window shorter than the test sequences, so its sliding-window masks and caches are
exercised too.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from layerfuse.fusion import (
    FuserBuildError,
    LLMSpec,
    VisionLanguageModel,
    VisionSpec,
    build_fuser,
)
from layerfuse.fusion.internal import InternalFuser
from layerfuse.fusion.kv_cache import cache_argument, cache_kwargs, cached_tokens
from layerfuse.fusion.layers import llm_layer_for
from layerfuse.fusion.projector import Projector
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from tests.support import cache_deprecations

ARCHS = ("llama", "qwen2", "mistral")
INTERNAL = ("inject", "xattn")
VOCAB = 96
IMAGE_TOKEN = 95
VISION = VisionSpec(num_layers=24, hidden_size=24, grid=(3, 3), has_cls=True)
SIGLIP = VisionSpec(num_layers=24, hidden_size=16, grid=(3, 3), has_cls=False)  # no CLS token: nothing is dropped
N_IMG = VISION.num_patches  # 9 visual tokens per image
SEQ = 18
STARTS = (2, SEQ - N_IMG, None)  # image start per row (row 1's image ends the prompt); None = a text-only sample


# -- tiny models -------------------------------------------------------------------------------------------
def tiny_config(arch: str, num_layers: int = 4) -> PretrainedConfig:
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.1,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=8)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def saved_llms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llms")
    paths = {}
    for i, arch in enumerate(ARCHS):
        torch.manual_seed(100 + i)
        AutoModelForCausalLM.from_config(tiny_config(arch)).save_pretrained(root / arch)
        paths[arch] = root / arch
    return paths


def load_llm(path: Path) -> nn.Module:
    llm = AutoModelForCausalLM.from_pretrained(path)
    return llm.eval().requires_grad_(False)


@pytest.fixture(params=ARCHS)
def llm(request: pytest.FixtureRequest, saved_llms: dict[str, Path]) -> nn.Module:
    """A fresh copy per test (tests attach hooks, switch to train mode, enable checkpointing)."""
    return load_llm(saved_llms[request.param])


@pytest.fixture
def llama(saved_llms: dict[str, Path]) -> nn.Module:
    return load_llm(saved_llms["llama"])


def stack(llm: nn.Module) -> nn.ModuleList:
    return llm.model.layers


# -- fusers and batches ------------------------------------------------------------------------------------
def make_fuser(name: str, llm: nn.Module, layers: str = "3-18-23", seed: int = 0, vision: VisionSpec = VISION, **opts) -> InternalFuser:
    torch.manual_seed(seed)
    if name == "xattn":
        opts.setdefault("mlp_ratio", 2.0)
    return build_fuser(name, vision, LLMSpec.from_config(llm.config), layers=layers, **opts)


def open_gates(fuser: nn.Module, value: float = 0.5) -> None:
    """What training does to xattn's tanh gates (a no-op for inject)."""
    with torch.no_grad():
        for n, p in fuser.named_parameters():
            if "gate" in n:
                p.fill_(value)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S]
    layers: torch.Tensor  # [B, k, T, D] in fuser.required_layers order
    has_image: torch.Tensor  # [B] bool

    @property
    def mask(self) -> torch.Tensor:
        return self.input_ids == IMAGE_TOKEN

    def row(self, i: int) -> "Batch":
        return Batch(self.input_ids[i : i + 1], self.layers[i : i + 1], self.has_image[i : i + 1])


def make_batch(fuser: nn.Module, starts: tuple[int | None, ...] = STARTS, seq: int = SEQ, seed: int = 0, n_img: int = N_IMG) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMAGE_TOKEN - 1, (len(starts), seq), generator=g)
    for i, s in enumerate(starts):
        if s is not None:
            ids[i, s : s + n_img] = IMAGE_TOKEN
    v = fuser.vision
    layers = torch.randn(len(starts), len(fuser.required_layers), v.num_tokens, v.hidden_size, generator=g)
    return Batch(ids, layers, torch.tensor([s is not None for s in starts]))


def next_tokens(b: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(1, IMAGE_TOKEN - 1, (b, 1), generator=torch.Generator().manual_seed(seed))


def run(vlm: VisionLanguageModel, batch: Batch, **kw) -> torch.Tensor:
    return vlm(batch.input_ids, batch.layers, has_image=batch.has_image, **kw).logits


def plain_logits(vlm: VisionLanguageModel, batch: Batch, **kw) -> torch.Tensor:
    """The unmodified LLM on the same inputs_embeds (visual tokens in place, no internal fusion)."""
    embeds, _ = vlm.embed(batch.input_ids, vlm.fuser(batch.layers), batch.has_image)
    vlm.fuser.clear_context()
    return vlm.llm(inputs_embeds=embeds, **kw).logits


def mlp(p: Projector, x: torch.Tensor) -> torch.Tensor:
    """The projector written out from its weights (mlp2x_gelu), independent of Projector.forward."""
    return F.linear(F.gelu(F.linear(x, p.linear_1.weight, p.linear_1.bias)), p.linear_2.weight, p.linear_2.bias)


@contextmanager
def layer_io(llm: nn.Module) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Record every decoder layer's input (as the layer sees it, i.e. after the fuser's pre-hooks, which were
    registered earlier and so run first) and output."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    handles = []
    for layer in stack(llm):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, kw: ins.append((a[0] if a else kw["hidden_states"]).detach().clone()), with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach().clone())))
    try:
        yield ins, outs
    finally:
        for h in handles:
            h.remove()


def expected_llm_layer(k: int, llm_depth: int) -> int:
    """docs/methods.md#internal-fusion written out for a 24-block tower: m(k) = int(k * L_llm / 24 - 1), clamped."""
    return min(llm_depth - 1, max(0, int(k * llm_depth / 24 - 1)))


# -- 1. layer mapping --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", INTERNAL)
def test_layer_mapping_on_a_24_layer_llm(name: str) -> None:
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(tiny_config("llama", num_layers=24)).eval().requires_grad_(False)
    fuser = make_fuser(name, llm)
    assert fuser.llm_layer_of == [2, 17, 22]  # docs/methods.md: 3-18-23 -> {2, 17, 22}
    assert [llm_layer_for(k, 24, 24) for k in (3, 18, 23)] == [2, 17, 22]
    assert "3->2" in repr(fuser) and "18->17" in repr(fuser) and "23->22" in repr(fuser)
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    assert {i for i, layer in enumerate(stack(llm)) if layer._forward_pre_hooks} == {2, 17, 22}
    # behaviour: the residual stream changes between layers exactly where the fuser acts
    batch = make_batch(fuser)
    embeds, _ = vlm.embed(batch.input_ids, fuser(batch.layers), batch.has_image)
    with torch.no_grad(), layer_io(llm) as (ins, outs):
        run(vlm, batch)
    before = [embeds, *outs[:-1]]
    assert {i for i, (x, y) in enumerate(zip(ins, before)) if not torch.equal(x, y)} == {2, 17, 22}


@pytest.mark.parametrize(
    "spec, depth, fused, expected",
    [
        ("3-18-23", 4, (3, 18, 23), [0, 2, 2]),  # int(3*4/24 - 1) = int(-0.5) = 0; 18 -> 2; 23 -> int(2.83) = 2
        ("3-18", 4, (3, 18), [0, 2]),  # the base 23 is appended, not listed: it only feeds the input sequence
        ("3-18-23", 32, (3, 18, 23), [3, 23, 29]),
        ("12-18", 24, (12, 18), [11, 17]),
        ("4,12,20", 24, (4, 12, 20), [3, 11, 19]),  # explicit lists: every listed layer is fused
    ],
)
def test_layer_mapping_scaling(spec: str, depth: int, fused: tuple[int, ...], expected: list[int]) -> None:
    assert [expected_llm_layer(k, depth) for k in fused] == expected
    llm = LLMSpec(hidden_size=32, num_layers=depth, num_heads=4)
    for name in INTERNAL:
        fuser = build_fuser(name, VISION, llm, layers=spec)
        assert fuser.llm_layer_of == expected
        assert len(fuser.layer_projectors) == len(expected)
    # group means (group_mode="mean", the pre-issue-17 default for former / latter / all; tests/fusion/
    # test_internal_groups.py has the per-layer default): a group enters where its last layer would
    for name in INTERNAL:
        assert build_fuser(name, VISION, llm, layers="former", group_mode="mean").llm_layer_of == [expected_llm_layer(12, depth)]


def test_fuser_built_for_another_depth_refuses_to_attach(llama: nn.Module) -> None:
    fuser = build_fuser("inject", VISION, LLMSpec(hidden_size=32, num_layers=24, num_heads=4))
    with pytest.raises(FuserBuildError, match="24 decoder layers, the LLM has 4"):
        fuser.attach(llama)


@pytest.mark.parametrize("name", INTERNAL)
def test_internal_fuser_needs_extra_layers(name: str) -> None:
    with pytest.raises(FuserBuildError, match="has none"):
        build_fuser(name, VISION, LLMSpec(32, 4, 4), layers="penultimate")


# -- 2. inject: exact against a hand-written reference -------------------------------------------------------
def inject_reference(llm: nn.Module, fuser: InternalFuser, batch: Batch, vision_layers: tuple[int, ...] = (3, 18, 23),
                     llm_layers: list[int] | None = None) -> torch.Tensor:
    """docs/methods.md#internal-fusion written out: inputs_embeds carry P(hs[23] patches) at the image positions; a
    pre-hook on decoder layer m(k) (`llm_layers[k]`, by default MLVF's rule for the layer) adds P_k(hs[k] patches)
    there, in order. The fuser's hooks must be idle (context cleared)."""
    d, depth = llm.config.hidden_size, llm.config.num_hidden_layers
    where = {layer: i for i, layer in enumerate(fuser.required_layers)}
    patches = batch.layers[:, :, 1:] if fuser.vision.has_cls else batch.layers  # CLS dropped where there is one
    mask, img = batch.mask, batch.has_image
    embeds = llm.get_input_embeddings()(batch.input_ids.masked_fill(mask, 0))
    embeds[mask] = mlp(fuser.projector, patches[:, where[23]])[img].reshape(-1, d)
    handles = []
    for k, layer in enumerate(vision_layers):
        delta = mlp(fuser.layer_projectors[k], patches[:, where[layer]])[img].reshape(-1, d)

        def add(module: nn.Module, args: tuple, kwargs: dict, delta: torch.Tensor = delta) -> tuple[tuple, dict]:
            h = args[0].clone()
            h[mask] = h[mask] + delta
            return (h, *args[1:]), kwargs

        m = expected_llm_layer(layer, depth) if llm_layers is None else llm_layers[k]
        handles.append(llm.model.layers[m].register_forward_pre_hook(add, with_kwargs=True))
    try:
        return llm(inputs_embeds=embeds).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("vision", [VISION, SIGLIP], ids=["cls", "no-cls"])
@torch.no_grad()
def test_inject_matches_a_hand_written_reference(llm: nn.Module, vision: VisionSpec) -> None:
    fuser = make_fuser("inject", llm, vision=vision)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    got = run(vlm, batch)
    fuser.clear_context()
    assert torch.equal(got, inject_reference(llm, fuser, batch))
    plain = plain_logits(vlm, batch)
    for row, start in enumerate(STARTS[:2]):
        assert torch.equal(got[row, :start], plain[row, :start])  # causality: nothing before the image changes
        assert (got[row, start:] - plain[row, start:]).abs().amax(dim=-1).min() > 1e-4  # everything after does
    assert torch.equal(got[2], plain[2])  # the text-only sample is untouched


@torch.no_grad()
def test_inject_leaves_earlier_layers_alone(llm: nn.Module) -> None:
    fuser = make_fuser("inject", llm, layers="12-18")  # enters before layers 1 and 2 of 4
    assert fuser.llm_layer_of == [1, 2]
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    with layer_io(llm) as (ins, outs):
        run(vlm, batch)
    fuser.clear_context()
    with layer_io(llm) as (plain_ins, plain_outs):
        plain_logits(vlm, batch)
    assert torch.equal(ins[0], plain_ins[0]) and torch.equal(outs[0], plain_outs[0])
    delta = ins[1] - outs[0]  # what the hook added before layer 1
    expected = torch.zeros_like(delta)
    expected[batch.mask] = mlp(fuser.layer_projectors[0], batch.layers[:, 0, 1:])[batch.has_image].reshape(-1, delta.shape[-1])
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=0)
    assert not delta[~batch.mask].any()


@pytest.mark.parametrize("name", INTERNAL)
@torch.no_grad()
def test_hooks_take_hidden_states_positionally_or_by_keyword(llama: nn.Module, name: str) -> None:
    """transformers 5 passes hidden_states positionally; other callers may pass it by keyword."""
    fuser = make_fuser(name, llama)
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llama, IMAGE_TOKEN)
    batch = make_batch(fuser)
    run(vlm, batch)  # sets the context
    h, _ = vlm.embed(batch.input_ids, fuser(batch.layers), batch.has_image)
    rope = llama.model.rotary_emb(h, position_ids=torch.arange(SEQ).unsqueeze(0))
    layer = stack(llama)[0]
    positional = layer(h, position_embeddings=rope)
    keyword = layer(hidden_states=h, position_embeddings=rope)
    fuser.clear_context()
    bare = layer(h, position_embeddings=rope)
    assert torch.equal(positional, keyword) and not torch.equal(positional, bare)


# -- 3. inject is prefill-only -----------------------------------------------------------------------------
@torch.no_grad()
def test_inject_is_prefill_only(llm: nn.Module) -> None:
    fuser = make_fuser("inject", llm)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    nxt = next_tokens(3)
    pre = vlm(batch.input_ids, batch.layers, has_image=batch.has_image, use_cache=True)
    assert pre.cache is not None and pre.cache.get_seq_length() == SEQ
    torch.testing.assert_close(pre.logits, run(vlm, batch), atol=1e-6, rtol=0)  # the prefill got the injection
    assert not torch.allclose(pre.logits, plain_logits(vlm, batch), atol=1e-4)
    pre = vlm(batch.input_ids, batch.layers, has_image=batch.has_image, use_cache=True)  # context of this prefill

    # decoding step through the VLM (the prefill's context is kept), and straight through the LLM as
    # generate() does, with the context still set: both add nothing ...
    through_vlm = vlm(nxt, None, cache=copy.deepcopy(pre.cache)).logits[:, -1]
    through_llm = llm(input_ids=nxt, **cache_kwargs(llm, copy.deepcopy(pre.cache))).logits[:, -1]
    fuser.clear_context()
    bare = llm(input_ids=nxt, **cache_kwargs(llm, copy.deepcopy(pre.cache))).logits[:, -1]
    assert torch.equal(through_vlm, bare) and torch.equal(through_llm, bare)
    # ... and continue the injected prefill: the last position of a full forward
    full = run(vlm, Batch(torch.cat([batch.input_ids, nxt], dim=1), batch.layers, batch.has_image))[:, -1]
    torch.testing.assert_close(through_vlm, full, atol=1e-5, rtol=1e-5)


# -- 4. xattn is the identity at init, and leaves the pretrained model alone ------------------------------------
@torch.no_grad()
def test_xattn_is_identity_at_init_and_leaves_the_llm_untouched(llm: nn.Module) -> None:
    keys = list(llm.state_dict())
    params = {n: p.clone() for n, p in llm.named_parameters()}
    modules = [(n, type(m), m) for n, m in llm.named_modules()]
    fuser = make_fuser("xattn", llm)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    assert list(llm.state_dict()) == keys
    assert [(n, type(m), m) for n, m in llm.named_modules()] == modules  # nothing wrapped or replaced
    assert type(llm).__module__.startswith("transformers.models.")  # no forked modeling code
    assert all(torch.equal(p, params[n]) for n, p in llm.named_parameters())
    assert {f"llm.{k}" for k in keys} <= set(vlm.state_dict()) and any(k.startswith("fuser.blocks.") for k in vlm.state_dict())
    batch = make_batch(fuser)
    assert torch.equal(run(vlm, batch), plain_logits(vlm, batch))
    fuser.detach()
    assert not any(layer._forward_pre_hooks for layer in stack(llm))


# -- 5. xattn masking: only tokens after the image start see the image ------------------------------------------
@torch.no_grad()
def test_xattn_masking(llm: nn.Module) -> None:
    fuser = make_fuser("xattn", llm)
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    got = run(vlm, batch)
    plain = plain_logits(vlm, batch)
    for row, start in enumerate(STARTS[:2]):
        assert torch.equal(got[row, : start + 1], plain[row, : start + 1])  # (a) at or before the image start
        assert (got[row, start + 1 :] - plain[row, start + 1 :]).abs().amax(dim=-1).min() > 1e-4
    assert torch.equal(got[2], plain[2])  # (c) text-only sample

    # (b) other features for layer 3 (cross-attended only, not in the input sequence) of row 0
    layers = batch.layers.clone()
    layers[0, fuser.required_layers.index(3)] = torch.randn_like(layers[0, 0])
    other = run(vlm, Batch(batch.input_ids, layers, batch.has_image))
    start = STARTS[0]
    assert torch.equal(other[0, : start + 1], got[0, : start + 1])
    assert (other[0, start + 1 :] - got[0, start + 1 :]).abs().amax(dim=-1).min() > 1e-5
    torch.testing.assert_close(other[1:], got[1:], atol=1e-6, rtol=0)


@torch.no_grad()
def test_xattn_acts_at_decoding_steps(llm: nn.Module) -> None:
    """(d) With a KV cache the cross-attention still runs at each decoding step, at the right sequence position."""
    fuser = make_fuser("xattn", llm)
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    nxt = next_tokens(3)
    extended = Batch(torch.cat([batch.input_ids, nxt], dim=1), batch.layers, batch.has_image)
    full = run(vlm, extended)[:, -1]
    plain = plain_logits(vlm, extended)[:, -1]
    pre = vlm(batch.input_ids, batch.layers, has_image=batch.has_image, use_cache=True)
    through_vlm = vlm(nxt, None, cache=copy.deepcopy(pre.cache)).logits[:, -1]
    through_llm = llm(input_ids=nxt, **cache_kwargs(llm, copy.deepcopy(pre.cache))).logits[:, -1]
    for step in (through_vlm, through_llm):
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
        assert (step[:2] - plain[:2]).abs().amax(dim=-1).min() > 1e-3  # the image rows are still fused
        torch.testing.assert_close(step[2], plain[2], atol=1e-5, rtol=1e-5)  # the text-only row is not


@pytest.mark.parametrize("name", INTERNAL)
@torch.no_grad()
def test_greedy_generate_matches_full_forwards(llm: nn.Module, name: str) -> None:
    """transformers' generate() with inputs_embeds after a VLM call (which sets the context) decodes like a
    loop of full-sequence VLM forwards."""
    fuser = make_fuser(name, llm)
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser, starts=STARTS[:2])
    steps = 4
    ids = batch.input_ids
    for _ in range(steps):
        logits = run(vlm, Batch(ids, batch.layers, batch.has_image))[:, -1]
        logits[:, IMAGE_TOKEN] = -torch.inf  # generated text never contains image placeholders
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    embeds, _ = vlm.embed(batch.input_ids, fuser(batch.layers), batch.has_image)
    run(vlm, batch)  # sets the context of this batch
    out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(batch.input_ids), max_new_tokens=steps,
                       do_sample=False, pad_token_id=0, eos_token_id=None, suppress_tokens=[IMAGE_TOKEN])
    assert torch.equal(out[:, -steps:], ids[:, -steps:])


@pytest.mark.parametrize("name", INTERNAL)
@torch.no_grad()
def test_left_padding(llm: nn.Module, name: str) -> None:
    """A left-padded sample (attention_mask, position_ids from it, as generate() makes them) gets the logits it
    gets alone, in the prefill and in a cached decoding step."""
    fuser = make_fuser(name, llm)
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    long = make_batch(fuser, starts=(2,), seq=SEQ, seed=1)
    short = make_batch(fuser, starts=(3,), seq=SEQ - 4, seed=2)
    pad = torch.zeros(1, 4, dtype=torch.long)
    ids = torch.cat([long.input_ids, torch.cat([pad, short.input_ids], dim=1)])
    attention = torch.ones_like(ids)
    attention[1, :4] = 0
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    padded = Batch(ids, torch.cat([long.layers, short.layers]), torch.tensor([True, True]))
    pre = vlm(padded.input_ids, padded.layers, has_image=padded.has_image, attention_mask=attention, position_ids=positions, use_cache=True)
    alone = run(vlm, short)
    torch.testing.assert_close(pre.logits[1, 4:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre.logits[0], run(vlm, long)[0], atol=1e-5, rtol=1e-5)

    vlm(padded.input_ids, padded.layers, has_image=padded.has_image, attention_mask=attention, position_ids=positions, use_cache=True)
    nxt = next_tokens(2)
    step = vlm(nxt, None, cache=pre.cache, attention_mask=torch.cat([attention, torch.ones(2, 1, dtype=torch.long)], 1),
               position_ids=positions[:, -1:] + 1).logits[:, -1]
    alone_next = run(vlm, Batch(torch.cat([short.input_ids, nxt[1:]], 1), short.layers, short.has_image))[0, -1]
    torch.testing.assert_close(step[1], alone_next, atol=1e-5, rtol=1e-5)


# -- 6. gradients ------------------------------------------------------------------------------------------
def lm_loss(vlm: VisionLanguageModel, batch: Batch) -> torch.Tensor:
    labels = batch.input_ids.masked_fill(batch.mask, -100)
    return vlm(batch.input_ids, batch.layers, has_image=batch.has_image, labels=labels).loss


@pytest.mark.parametrize("name", INTERNAL)
def test_gradients(llm: nn.Module, name: str) -> None:
    fuser = make_fuser(name, llm)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    lm_loss(vlm, batch).backward()
    assert all(p.grad is None for p in llm.parameters())  # frozen LLM
    grads = {n: p.grad for n, p in fuser.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    if name == "inject":
        assert all(g.any() for g in grads.values()), [n for n, g in grads.items() if not g.any()]
        return
    # closed gates: the gates learn, nothing behind them does yet
    for n, g in grads.items():
        if "gate" in n or n.startswith("projector."):
            assert g.any(), n
        else:
            assert not g.any(), n
    fuser.zero_grad(set_to_none=True)
    open_gates(fuser)
    lm_loss(vlm, batch).backward()
    assert all(p.grad is not None and p.grad.any() for p in fuser.parameters())
    assert all(p.grad is None for p in llm.parameters())


# -- 7. batch independence ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", INTERNAL)
@torch.no_grad()
def test_batch_independence(llm: nn.Module, name: str) -> None:
    assert_batch_independent(make_fuser(name, llm), llm)


def assert_batch_independent(fuser: InternalFuser, llm: nn.Module) -> None:
    """With the gates open, each sample's logits in the batch equal its logits alone."""
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    together = vlm(batch.input_ids, batch.layers, has_image=batch.has_image, attention_mask=torch.ones_like(batch.input_ids)).logits
    for i in range(3):
        torch.testing.assert_close(together[i : i + 1], run(vlm, batch.row(i)), atol=1e-5, rtol=1e-5)


# -- 8. bf16 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", INTERNAL)
@torch.no_grad()
def test_bf16_close_to_fp32(llm: nn.Module, name: str) -> None:
    """Under CPU autocast, and with the whole model cast to bf16 (the residual stream keeps its dtype)."""
    fuser = make_fuser(name, llm)
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    ref = run(vlm, batch)
    tol = dict(atol=0.03 * ref.abs().max().item(), rtol=0.03)  # measured: ~1% of the largest logit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run(vlm, batch)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, **tol)
    vlm.to(torch.bfloat16)
    with layer_io(llm) as (ins, _):
        low = run(vlm, Batch(batch.input_ids, batch.layers.bfloat16(), batch.has_image))
    assert low.dtype == torch.bfloat16 and all(x.dtype == torch.bfloat16 for x in ins)
    torch.testing.assert_close(low.float(), ref, **tol)


# -- 9. detach / attach ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", INTERNAL)
@torch.no_grad()
def test_detach_and_attach_twice(llama: nn.Module, name: str) -> None:
    fuser = make_fuser(name, llama)
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llama, IMAGE_TOKEN)
    batch = make_batch(fuser)
    hooks = [len(layer._forward_pre_hooks) for layer in stack(llama)]
    fused = run(vlm, batch)
    fuser.attach(llama)  # again
    VisionLanguageModel(fuser, llama, IMAGE_TOKEN)  # and through a second wrapper
    assert [len(layer._forward_pre_hooks) for layer in stack(llama)] == hooks
    assert torch.equal(run(vlm, batch), fused)  # applied once, not twice
    fuser.detach()
    assert not any(layer._forward_pre_hooks for layer in stack(llama))
    plain = run(vlm, batch)  # the context is set, but nothing reads it any more
    assert torch.equal(plain, plain_logits(vlm, batch)) and not torch.equal(plain, fused)


# -- 10. image placeholder errors --------------------------------------------------------------------------
@torch.no_grad()
def test_embed_names_the_bad_batch_row(llama: nn.Module) -> None:
    fuser = make_fuser("inject", llama)
    vlm = VisionLanguageModel(fuser, llama, IMAGE_TOKEN)
    batch = make_batch(fuser)
    fused = fuser(batch.layers)
    short = batch.input_ids.clone()
    short[1, STARTS[1]] = 7  # 8 image tokens instead of 9
    with pytest.raises(ValueError, match=r"batch rows \[1\].*found \[8\].*expected \[9\]"):
        vlm.embed(short, fused, batch.has_image)
    with pytest.raises(ValueError, match=r"batch rows \[2\]"):  # says it has an image, has no placeholders
        vlm.embed(batch.input_ids, fused, torch.tensor([True, True, True]))
    with pytest.raises(ValueError, match=r"batch rows \[0\]"):  # placeholders in a sample marked text-only
        vlm(batch.input_ids, batch.layers, has_image=torch.tensor([False, True, False]))
    pre = vlm(batch.input_ids, batch.layers, has_image=batch.has_image, use_cache=True)
    with pytest.raises(ValueError, match=r"decoding step.*batch rows \[1\]"):
        vlm(torch.tensor([[3], [IMAGE_TOKEN], [4]]), None, cache=pre.cache)


@torch.no_grad()
def test_decoding_step_needs_its_prefill(llama: nn.Module) -> None:
    fuser = make_fuser("xattn", llama)
    vlm = VisionLanguageModel(fuser, llama, IMAGE_TOKEN)
    batch = make_batch(fuser)
    pre = vlm(batch.input_ids, batch.layers, has_image=batch.has_image, use_cache=True)
    fuser.clear_context()
    with pytest.raises(RuntimeError, match="prefill"):
        vlm(next_tokens(3), None, cache=copy.deepcopy(pre.cache))
    vlm(batch.input_ids, batch.layers, has_image=batch.has_image)
    with pytest.raises(RuntimeError, match="batch of 3"):
        vlm(next_tokens(2), None, cache=copy.deepcopy(pre.cache))


# -- 11. gradient checkpointing ----------------------------------------------------------------------------
def fuser_grads(vlm: VisionLanguageModel, batch: Batch) -> dict[str, torch.Tensor]:
    vlm.fuser.zero_grad(set_to_none=True)
    lm_loss(vlm, batch).backward()
    return {n: p.grad.clone() for n, p in vlm.fuser.named_parameters()}


@pytest.mark.parametrize("name", INTERNAL)
def test_gradient_checkpointing_gives_the_same_grads(llm: nn.Module, name: str) -> None:
    fuser = make_fuser(name, llm)
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    vlm.train()
    batch = make_batch(fuser)
    plain = fuser_grads(vlm, batch)
    calls: list[int] = []  # module hooks do not fire in a non-reentrant recompute: count forward() itself
    mlp = llm.model.layers[-1].mlp
    forward = mlp.forward
    mlp.forward = lambda x: (calls.append(1), forward(x))[1]
    for kwargs in ({"use_reentrant": False}, {"use_reentrant": True}):
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5 (gradient_checkpointing_* are deprecated aliases)
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        vlm.train()
        calls.clear()
        checkpointed = fuser_grads(vlm, batch)
        assert len(calls) == 2, kwargs  # the layer really was recomputed in the backward pass
        for n, g in plain.items():
            torch.testing.assert_close(checkpointed[n], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n} {kwargs}: {m}")
        (getattr(llm, "activation_checkpointing_disable", None) or llm.gradient_checkpointing_disable)()
    assert all(p.grad is None for p in llm.parameters())


# -- external fusers through the VLM ------------------------------------------------------------------------
@pytest.mark.parametrize("name, options, n_visual", [("single", {}, 9), ("sti", {"layers": "8-16", "pool": 2}, 9 + 2)])
@torch.no_grad()
def test_external_fusers_through_the_vlm(llama: nn.Module, name: str, options: dict, n_visual: int) -> None:
    torch.manual_seed(0)
    fuser = build_fuser(name, VISION, LLMSpec.from_config(llama.config), **options)
    assert fuser.num_visual_tokens == n_visual
    vlm = VisionLanguageModel(fuser, llama, IMAGE_TOKEN)
    starts = (2, SEQ - n_visual, None)
    batch = make_batch(fuser, starts=starts, n_img=n_visual)
    fused = fuser(batch.layers)
    embeds, span = vlm.embed(batch.input_ids, fused, batch.has_image)
    for row, start in enumerate(starts[:2]):
        assert torch.equal(embeds[row, start : start + n_visual], fused.tokens[row])
        assert int(span.start[row]) == start
    text = llama.get_input_embeddings()(batch.input_ids)
    assert torch.equal(embeds[~batch.mask], text[~batch.mask])
    assert int(span.start[2]) == -1
    assert torch.equal(run(vlm, batch), llama(inputs_embeds=embeds).logits)
    assert not any(layer._forward_pre_hooks for layer in stack(llama))


def test_vlm_loss_adds_the_fuser_aux_loss_only_when_present(llama: nn.Module) -> None:
    fuser = make_fuser("inject", llama)
    vlm = VisionLanguageModel(fuser, llama, IMAGE_TOKEN)
    batch = make_batch(fuser)
    out = vlm(batch.input_ids, batch.layers, has_image=batch.has_image, labels=batch.input_ids.masked_fill(batch.mask, -100))
    assert out.loss is not None and torch.equal(out.loss, out.lm_loss)
    assert out.fused.internal.keys() == {0, 1, 2}



# -- 12. the KV cache under the name of the installed transformers (`cache` from 5.24, `past_key_values` before) --
def test_the_cache_argument_is_the_name_the_outputs_carry(llm: nn.Module) -> None:
    name = cache_argument(llm)
    assert name in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    lora = get_peft_model(llm, LoraConfig(r=2, target_modules=["q_proj"]))
    assert cache_argument(lora) == name  # a PEFT wrapper (stage 2 LoRA) answers for the model it wraps


@torch.no_grad()
def test_no_cache_deprecation_notices_from_our_calls(llama: nn.Module) -> None:
    """Prefill, decoding steps through the VLM and straight through the LLM, and a training call: transformers
    gets the cache under the name it wants and we read it from its outputs without the deprecated name."""
    fuser = make_fuser("xattn", llama)
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llama, IMAGE_TOKEN)
    batch = make_batch(fuser)
    with cache_deprecations() as seen:
        pre = vlm(batch.input_ids, batch.layers, has_image=batch.has_image, use_cache=True)
        step = vlm(next_tokens(3), None, cache=pre.cache, use_cache=True)
        llama(input_ids=next_tokens(3, seed=6), **cache_kwargs(llama, step.cache))
        vlm(batch.input_ids, batch.layers, has_image=batch.has_image, labels=batch.input_ids.masked_fill(batch.mask, -100))
    assert seen == []
    assert cached_tokens(step.cache) == SEQ + 2  # the direct LLM step went into the same cache


def test_the_vlm_takes_the_cache_only_as_cache(llama: nn.Module) -> None:
    fuser = make_fuser("xattn", llama)
    vlm = VisionLanguageModel(fuser, llama, IMAGE_TOKEN)
    batch = make_batch(fuser)
    pre = vlm(batch.input_ids, batch.layers, has_image=batch.has_image, use_cache=True)
    with pytest.raises(TypeError, match="`cache=`, not `past_key_values=`"):
        vlm(next_tokens(3), None, past_key_values=pre.cache)
