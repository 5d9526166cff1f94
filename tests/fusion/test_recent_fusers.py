"""Fusers from 2024-2026 (docs/methods.md: TGIF, TokenPacker, DeepStack, shallow / middle / deep): shapes, parameter
counts by formula, behaviour at init, batch independence, TGIF's prompt-only router and DeepStack inside a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from layerfuse.fusion import FuserBuildError, LLMSpec, VisionLanguageModel, VisionSpec, build_fuser, parse_layers
from layerfuse.fusion.internal import ImageSpan
from transformers import AutoModelForCausalLM, LlamaConfig

VISION = VisionSpec(num_layers=24, hidden_size=32, grid=(4, 4), has_cls=True, text_dim=24)
SIGLIP = VisionSpec(num_layers=24, hidden_size=32, grid=(4, 4), has_cls=False, text_dim=24)
LLM = LLMSpec(hidden_size=48, num_layers=4, num_heads=4)
D, d, N = 32, 48, 16

# name -> (fuser, options, visual tokens on VISION)
CASES = {
    "tgif-llm": ("tgif", {"router_dim": 16}, 16),
    "tgif-sentence": ("tgif", {"router": "sentence", "router_dim": 16}, 16),
    "tokenpacker": ("tokenpacker", {"heads": 4}, 4),
    "deepstack": ("deepstack", {}, 16),
    "shallow-middle-deep": ("concat", {"layers": "shallow-middle-deep"}, 16),
}


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def projector_params(i: int, o: int) -> int:
    return i * o + o + o * o + o  # Linear(i, o) -> GELU -> Linear(o, o)


def make(case: str, vision: VisionSpec = VISION, seed: int = 0, **extra):
    torch.manual_seed(seed)
    name, opts, _ = CASES[case]
    return build_fuser(name, vision, LLM, **{**opts, **extra})


def inputs(fuser, b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    v = fuser.vision
    layers = torch.randn(b, len(fuser.required_layers), v.num_tokens, v.hidden_size, generator=g)
    text = torch.randn(b, fuser.text_dim, generator=g) if fuser.needs_text or fuser.needs_prompt else None
    return layers, text


def perturb(fuser, scale: float = 0.3, seed: int = 7) -> None:
    """Move every parameter off its init (zero-initialised router / merger layers included), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fuser.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# -- common to all ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_shapes_and_declared_inputs(case):
    fuser = make(case)
    layers, text = inputs(fuser)
    out = fuser(layers, text)
    assert out.tokens.shape == (3, CASES[case][2], d) == (3, fuser.num_visual_tokens, d)
    assert fuser.needs_text == (case == "tgif-sentence") and fuser.needs_prompt == (case == "tgif-llm")
    assert fuser.internal == (case == "deepstack")
    with pytest.raises(ValueError, match="expected layers"):
        fuser(layers[:, :, :5], text)


@pytest.mark.parametrize("case", list(CASES))
def test_batch_independence(case):
    fuser = make(case)
    perturb(fuser)
    layers, text = inputs(fuser, b=4)
    whole = fuser(layers, text)
    for i in range(4):
        alone = fuser(layers[i : i + 1], None if text is None else text[i : i + 1])
        torch.testing.assert_close(alone.tokens[0], whole.tokens[i], rtol=1e-5, atol=1e-5)
        if whole.weights is not None:
            torch.testing.assert_close(alone.weights[0], whole.weights[i], rtol=1e-5, atol=1e-6)
        for k in whole.internal:
            torch.testing.assert_close(alone.internal[k][0], whole.internal[k][i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_every_parameter(case):
    fuser = make(case)
    perturb(fuser)
    layers, text = inputs(fuser)
    out = fuser(layers, text)
    loss = out.tokens.square().mean() + sum(f.square().mean() for f in out.internal.values())
    loss.backward()
    missing = [n for n, p in fuser.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def test_presets_resolve_and_scale():
    assert parse_layers("tokenpacker", 24).terms == ((12,), (16,), (22,), (23,))
    assert parse_layers("deepstack", 24).terms == ((8,), (15,), (22,), (23,))
    assert parse_layers("deepstack", 27).terms == ((9,), (17,), (25,), (26,))  # Qwen3-VL-8B: blocks 8, 16, 24 (0-based) of 27
    smd = parse_layers("shallow-middle-deep", 24)
    assert smd.terms == (tuple(range(1, 13)), tuple(range(13, 21)), tuple(range(21, 25)))  # the deep group is the base
    assert parse_layers("shallow-middle-deep", 12).terms == (tuple(range(1, 7)), tuple(range(7, 11)), (11, 12))
    every = parse_layers("tgif", 24)
    assert every.terms[-1] == (23,) and sorted(every.terms) == [(i,) for i in range(1, 25)]
    assert parse_layers("tgif", 12).layers == list(range(1, 13)) and parse_layers("tgif", 12).base == (11,)  # every block, any depth


# -- TGIF -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["tgif-llm", "tgif-sentence"])
def test_tgif_parameter_count(case):
    fuser = make(case)
    text_dim = d if case == "tgif-llm" else VISION.text_dim
    h, k = 16, 24  # router width, one expert per block
    router = text_dim * h + h + h * k + k
    assert fuser.text_dim == text_dim and count(fuser.router) == router
    assert count(fuser) == router + 2 * D + projector_params(D, d)
    # real size (docs/methods.md): ViT-L (D = 1024, 24 blocks), 4096-wide LLM, router width 512
    vit_l = VisionSpec(num_layers=24, hidden_size=1024, grid=(24, 24), has_cls=True, text_dim=768)
    with torch.device("meta"):
        real = build_fuser("tgif", vit_l, LLMSpec(4096, 32, 32))
    assert count(real.router) + count(real.norm) == 4096 * 512 + 512 + 512 * 24 + 24 + 2 * 1024 == 2_112_024
    with torch.device("meta"):
        sentence = build_fuser("tgif", VisionSpec(24, 1024, (24, 24), True, 384), LLMSpec(4096), router="sentence")
    assert count(sentence.router) == 384 * 512 + 512 + 512 * 24 + 24 == 209_432


@pytest.mark.parametrize("vision", [VISION, SIGLIP], ids=["cls", "no-cls"])
def test_tgif_is_uniform_at_init(vision):
    fuser = make("tgif-llm", vision)
    layers, text = inputs(fuser)
    patches = layers[:, :, 1:] if vision.has_cls else layers  # required_layers = hs[1..24]: position i is hs[i+1]
    out = fuser(layers, text)
    torch.testing.assert_close(out.weights, torch.full((3, 24), 1 / 24))
    expected = fuser.norm(patches[:, 22] + patches.mean(dim=1))  # base hs[23] + the uniform mix of every block
    torch.testing.assert_close(out.tokens, fuser.projector(expected))
    torch.testing.assert_close(fuser(layers, -text).weights, out.weights)  # any text: the router's last layer is 0


def test_tgif_weights_follow_the_router_in_layer_order():
    fuser = make("tgif-sentence")
    perturb(fuser)
    layers, text = inputs(fuser)
    fused, w = fuser.fused_features(layers, text)
    logits = fuser.router.logits(torch.relu(fuser.router.hidden(text)))
    torch.testing.assert_close(w, logits.softmax(-1))  # one softmax, fp32
    assert w.dtype == torch.float32 and not torch.allclose(w[0], w[1])
    patches = layers[:, :, 1:]
    mix = (w[:, :, None, None] * patches).sum(1)  # w[:, i] weighs hs[i+1]
    torch.testing.assert_close(fused, fuser.norm(patches[:, 22] + mix))
    assert not torch.allclose(fuser(layers, text.flip(0)).weights, w)


def test_tgif_refusals():
    with pytest.raises(FuserBuildError, match="probe mode has none"):
        build_fuser("tgif", VISION, LLMSpec(48))  # no LLM: the llm router has nothing to read
    with pytest.raises(FuserBuildError, match="instruction embeddings"):
        build_fuser("tgif", VisionSpec(24, 32, (4, 4), True, 0), LLM, router="sentence")
    with pytest.raises(FuserBuildError, match="router"):
        build_fuser("tgif", VISION, LLM, router="bogus")
    with pytest.raises(FuserBuildError, match="at least 2"):
        build_fuser("tgif", VISION, LLM, layers="penultimate")
    assert build_fuser("tgif", VISION, LLMSpec(48), router="sentence").needs_text  # probe mode: the sentence router works


# -- a tiny Llama for the LLM-side tests ---------------------------------------------------------------------------------
IMAGE_TOKEN, VOCAB = 95, 96


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)


def conversation(prompt: list[int], answer: list[int], pad: int = 0):
    """[prompt[:2], image x N, prompt[2:], answer] right-padded by `pad`: (ids, attention mask, labels) [1, S]."""
    ids = prompt[:2] + [IMAGE_TOKEN] * N + prompt[2:] + answer + [1] * pad
    labels = [-100] * (len(prompt) + N) + answer + [-100] * pad
    mask = [1] * (len(ids) - pad) + [0] * pad
    return torch.tensor([ids]), torch.tensor([mask]), torch.tensor([labels])


def test_tgif_llm_router_reads_the_prompt_only(llama):
    fuser = make("tgif-llm")
    perturb(fuser)
    vlm = VisionLanguageModel(fuser, llama, IMAGE_TOKEN).eval()
    layers, _ = inputs(fuser, b=1)
    prompt = [5, 6, 7, 8, 9]

    def weights(ids, mask, labels):
        return vlm(ids, layers, attention_mask=mask, labels=labels).fused.weights

    base = weights(*conversation(prompt, [20, 21, 22]))
    torch.testing.assert_close(weights(*conversation(prompt, [40, 41, 42, 43])), base, rtol=0, atol=0)  # other answer: same weights
    torch.testing.assert_close(weights(*conversation(prompt, [20, 21, 22], pad=3)), base, rtol=0, atol=0)  # padding: same
    assert not torch.allclose(weights(*conversation([5, 6, 7, 8, 30], [20, 21, 22])), base)  # other prompt: other weights
    ids, mask, labels = conversation(prompt, [20, 21, 22])
    emb = llama.get_input_embeddings().weight
    expected = emb[prompt].mean(0, keepdim=True)  # the mean over the prompt tokens, image placeholders and answer left out
    token_embeds = vlm.token_embeddings(ids)
    torch.testing.assert_close(vlm.prompt_embedding(ids, token_embeds, mask, labels), expected)
    # generation: no labels, the input holds the prompt only
    gen_ids = ids[:, : len(prompt) + N]
    torch.testing.assert_close(vlm.prompt_embedding(gen_ids, vlm.token_embeddings(gen_ids)), expected)
    # training without labels would pool the answer: refused
    vlm.train()
    with pytest.raises(ValueError, match="pass `labels` in training"):
        vlm.prepare(ids, layers, None, None, mask)
    vlm.prepare(ids, layers, None, None, mask, labels)


# -- TokenPacker ------------------------------------------------------------------------------------------------------
def test_tokenpacker_parameter_count():
    fuser = make("tokenpacker")
    e, k = D, 4  # attention width E = D; keys/values from 4 terms (12, 16, 22, 23) concatenated on channels
    q = D * e
    kv = 2 * (k * D * e + e + e * e + e)
    norms = 3 * 2 * e
    mha = 3 * e * e + 3 * e + e * e + e
    assert count(fuser) == q + kv + norms + mha + projector_params(e, d)
    # real size (docs/methods.md): ViT-L, E = 1024, 8 heads, 4 levels, 4096-wide LLM
    vit_l = VisionSpec(num_layers=24, hidden_size=1024, grid=(24, 24), has_cls=True)
    with torch.device("meta"):
        real = build_fuser("tokenpacker", vit_l, LLMSpec(4096))
    assert real.num_visual_tokens == 144
    assert count(real) - count(real.projector) == 1024 * 1024 + 2 * (4096 * 1024 + 1024 + 1024 * 1024 + 1024) + 6 * 1024 + 4 * 1024 * 1024 + 4 * 1024
    assert count(real) - count(real.projector) == 15_742_976


def test_tokenpacker_token_count_and_refusals():
    big = VisionSpec(num_layers=24, hidden_size=32, grid=(8, 8), has_cls=True)
    assert build_fuser("tokenpacker", big, LLM, heads=4).num_visual_tokens == 16
    assert build_fuser("tokenpacker", big, LLM, heads=4, downsample=4).num_visual_tokens == 4
    assert build_fuser("tokenpacker", big, LLM, heads=4, downsample=1).num_visual_tokens == 64
    with pytest.raises(FuserBuildError, match="divide the 4x4"):
        build_fuser("tokenpacker", VISION, LLM, heads=4, downsample=3)
    with pytest.raises(FuserBuildError, match="divisible"):
        build_fuser("tokenpacker", VISION, LLM, heads=5)
    assert build_fuser("tokenpacker", VISION, LLM, heads=4, dim=64).projector.in_dim == 64


@pytest.mark.parametrize("vision", [VISION, SIGLIP], ids=["cls", "no-cls"])
def test_tokenpacker_queries_and_regions(vision):
    fuser = make("tokenpacker", vision)
    layers, _ = inputs(fuser)
    patches = layers[:, :, 1:] if vision.has_cls else layers
    # point queries: bilinear interpolation to half the grid = the mean of each 2x2 region at s = 2
    base = patches[:, 3].reshape(3, 2, 2, 2, 2, D)  # [B, h/2, 2, w/2, 2, D]
    torch.testing.assert_close(fuser.point_queries(patches[:, 3]), base.mean(dim=(2, 4)).reshape(3, 4, D))
    # init: TokenPacker's (truncated normal weights, zero biases, unit LayerNorms)
    assert not fuser.k_proj[0].bias.any() and torch.equal(fuser.norm_q.weight, torch.ones(D))
    # each packed token sees its own 2x2 region (of every layer) only
    out = fuser.packed_features(layers)
    region0 = torch.tensor([0, 1, 4, 5]) + (1 if vision.has_cls else 0)  # tokens of the top-left region
    changed = layers.clone()
    changed[:, :, region0] += 1.0
    again = fuser.packed_features(changed)
    assert not torch.allclose(again[:, 0], out[:, 0])
    torch.testing.assert_close(again[:, 1:], out[:, 1:], rtol=0, atol=0)


# -- shallow / middle / deep ------------------------------------------------------------------------------------------
def test_shallow_middle_deep_is_a_light_concat_of_the_group_means():
    fuser = make("shallow-middle-deep")
    assert fuser.required_layers == list(range(1, 25))
    layers, _ = inputs(fuser)
    p = layers[:, :, 1:]  # position i is hs[i+1]
    expected = fuser.projector(torch.cat([p[:, 0:12].mean(1), p[:, 12:20].mean(1), p[:, 20:24].mean(1)], dim=-1))
    torch.testing.assert_close(fuser(layers).tokens, expected)
    assert count(fuser) == projector_params(3 * D, d)


# -- DeepStack --------------------------------------------------------------------------------------------------------
def test_deepstack_layers_options_and_refusals():
    fuser = make("deepstack")
    assert fuser.llm_layer_of == [1, 2, 3] and fuser.fused_terms == [0, 1, 2]  # Qwen3-VL: after layers 0, 1, 2
    assert make("deepstack", llm_layers="0,0,2").llm_layer_of == [0, 0, 2]
    assert make("deepstack", llm_layers=[3, 2, 1]).llm_layer_of == [3, 2, 1]
    listed = make("deepstack", layers="8,15,22,23")
    assert listed.fused_terms == [0, 1, 2] and listed.llm_layer_of == [1, 2, 3]  # the base is never stacked
    assert make("deepstack", layers="6-12").llm_layer_of == [1, 2]
    with pytest.raises(FuserBuildError, match="names 2 decoder layers for 3"):
        make("deepstack", llm_layers="1,2")
    with pytest.raises(FuserBuildError, match=r"do not exist in a 4-layer LLM"):
        make("deepstack", llm_layers="1,2,4")
    with pytest.raises(FuserBuildError, match="decoder-layer indices"):
        make("deepstack", llm_layers="a,b,c")
    with pytest.raises(FuserBuildError, match=r"decoder layers \[3\] do not exist in a 3-layer LLM.*e.g. .0,1,2."):
        build_fuser("deepstack", VISION, LLMSpec(48, 3, 4))  # default 1, 2, 3 on a 3-layer LLM


def test_deepstack_parameter_count():
    fuser = make("deepstack")
    merger = 2 * D + projector_params(D, d)  # LayerNorm + projector per stacked layer
    assert count(fuser) == projector_params(D, d) + 3 * merger
    assert count(make("deepstack", merger_norm=False)) == 4 * projector_params(D, d)
    vit_l = VisionSpec(num_layers=24, hidden_size=1024, grid=(24, 24), has_cls=True)
    with torch.device("meta"):
        real = build_fuser("deepstack", vit_l, LLMSpec(4096, 32, 32))
    assert count(real) == projector_params(1024, 4096) + 3 * (2 * 1024 + projector_params(1024, 4096)) == 83_924_992


def test_deepstack_is_the_base_only_model_at_init_then_adds_at_image_positions(llama):
    fuser = make("deepstack")
    layers, _ = inputs(fuser, b=2)
    out = fuser(layers)
    assert all(not f.any() for f in out.internal.values())  # zero-initialised mergers
    vlm = VisionLanguageModel(fuser, llama, IMAGE_TOKEN).eval()
    ids = torch.cat([conversation([5, 6, 7, 8], [20])[0], conversation([9, 10, 11, 12], [21])[0]])
    seen = {}
    hook = llama.model.layers[1].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", (a[0] if a else k["hidden_states"]).clone()),
                                                           with_kwargs=True)  # after deepstack's own hook: sees the sum

    def without_stacking() -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM on P(base) alone (the fuser's hooks see no context): logits, input of layer 1."""
        embeds, _ = vlm.prepare(ids, layers)
        fuser.clear_context()
        return llama(inputs_embeds=embeds).logits, seen["x"]

    try:
        with torch.no_grad():
            logits = vlm(ids, layers).logits
            plain, _ = without_stacking()
            torch.testing.assert_close(logits, plain, rtol=0, atol=0)
            perturb(fuser)
            stacked = vlm(ids, layers)
            stacked_x = seen["x"]
            _, plain_x = without_stacking()
    finally:
        hook.remove()
        fuser.detach()
    image = ids == IMAGE_TOKEN
    span = ImageSpan.from_mask(image)
    assert span.start.tolist() == [2, 2]
    delta = stacked_x - plain_x  # before layer 1: exactly M_0(h_8) at the image positions, nothing elsewhere
    torch.testing.assert_close(delta[image].reshape(2, N, d), stacked.fused.internal[0], rtol=1e-5, atol=1e-5)
    assert not delta[~image].any()
