"""Group presets inside the LLM (issue 17; docs/methods.md#internal-fusion).

`former` / `latter` / `all` with `inject` / `xattn` fuse each layer of the group with its own projector into
consecutive LLM layers (the MLVF authors' code: hs[1..12] -> LLM layers 0..11, the last 12 blocks -> the last 12 LLM
layers); `group_mode="mean"` keeps the group mean at one layer (the behaviour before issue 17). Towers deeper than 24
blocks: a preset's layer maps from its position in the 24-block preset space, `former` / `latter` are the first /
last 12 blocks.
"""

from __future__ import annotations

import pytest
import torch
from layerfuse.fusion import FuserBuildError, LLMSpec, VisionLanguageModel, VisionSpec, build_fuser, parse_layers
from layerfuse.fusion.internal import InternalFuser
from layerfuse.fusion.layers import internal_plan, llm_layer_for
from torch import nn
from transformers import AutoModelForCausalLM

from tests.fusion.test_internal_fusion import (
    IMAGE_TOKEN,
    INTERNAL,
    STARTS,
    assert_batch_independent,
    inject_reference,
    VISION,
    Batch,
    layer_io,
    make_batch,
    mlp,
    open_gates,
    plain_logits,
    run,
    tiny_config,
)

SO400M = VisionSpec(num_layers=27, hidden_size=16, grid=(3, 3), has_cls=False)  # SigLIP-so400m: 27 blocks, no CLS
SO400M_26 = VisionSpec(num_layers=26, hidden_size=16, grid=(3, 3), has_cls=False)  # LLaVA-style towers drop the last one
SHALLOW = VisionSpec(num_layers=12, hidden_size=16, grid=(3, 3), has_cls=True)
FORMER, LATTER = list(range(1, 13)), list(range(13, 25))


def spec(depth: int) -> LLMSpec:
    return LLMSpec(hidden_size=32, num_layers=depth, num_heads=4)


def mapping(name: str, layers: str, vision: VisionSpec, depth: int, **opts) -> list[tuple[int, int]]:
    """(vision layer, LLM layer) of each fused term."""
    f = build_fuser(name, vision, spec(depth), layers=layers, **opts)
    assert all(len(f.selection.terms[t]) == 1 for t in f.fused_terms) or f.group_mode == "mean"
    return [(f.selection.terms[t][-1], m) for t, m in zip(f.fused_terms, f.llm_layer_of)]


def tiny_llm(depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama", num_layers=depth)).eval().requires_grad_(False)


def make(name: str, llm: nn.Module, layers: str, vision: VisionSpec = VISION, seed: int = 0, **opts) -> InternalFuser:
    torch.manual_seed(seed)
    if name == "xattn":
        opts.setdefault("mlp_ratio", 2.0)
    return build_fuser(name, vision, LLMSpec.from_config(llm.config), layers=layers, **opts)


# -- 1. the mapping ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", INTERNAL)
def test_per_layer_is_the_default_for_the_group_presets(name: str) -> None:
    # the authors' 24-layer LLM: one LLM layer per vision layer, former 0..11, latter 12..23
    assert mapping(name, "former", VISION, 24) == [(k, k - 1) for k in FORMER]
    assert mapping(name, "latter", VISION, 24) == [(k, k - 1) for k in LATTER]
    assert mapping(name, "all", VISION, 24) == [(k, k - 1) for k in FORMER + LATTER]
    # a deeper LLM (MobileLLaMA-2.7B: 32 layers): former the first 12 layers, latter the last 12
    assert mapping(name, "former", VISION, 32) == [(k, k - 1) for k in FORMER]
    assert mapping(name, "latter", VISION, 32) == [(k, 20 + k - 13) for k in LATTER]
    assert mapping(name, "all", VISION, 32) == [(k, k - 1) for k in FORMER] + [(k, 20 + k - 13) for k in LATTER]
    # 12..23 layers: former / latter still fit (the first / last 12); all does not: spread, r-th of 24 -> floor(r*16/24)
    assert mapping(name, "latter", VISION, 16) == [(k, 4 + k - 13) for k in LATTER]
    assert [m for _, m in mapping(name, "all", VISION, 16)] == [r * 16 // 24 for r in range(24)]
    # the tiny 4-layer LLM: every run is spread over the whole LLM, consecutive vision layers share a layer
    assert [m for _, m in mapping(name, "former", VISION, 4)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [m for _, m in mapping(name, "latter", VISION, 4)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [m for _, m in mapping(name, "all", VISION, 4)] == [r // 6 for r in range(24)]
    # the base (hs[23], appended) feeds the input sequence only
    assert build_fuser(name, VISION, spec(24), layers="former").required_layers == FORMER + [23]


@pytest.mark.parametrize("preset, groups", [("former", 1), ("latter", 1), ("all", 2)])
@pytest.mark.parametrize("depth", range(1, 41))
def test_per_layer_runs_on_any_llm_depth(preset: str, groups: int, depth: int) -> None:
    """In range, non-decreasing; one layer each, consecutive runs at the start / end, whenever the LLM has enough."""
    plan = internal_plan(parse_layers(preset, 24), depth)
    layers = list(plan.llm_layers)
    n = 12 * groups
    assert len(layers) == n and all(0 <= m < depth for m in layers) and layers == sorted(layers)
    if n <= depth:
        expected = {"former": list(range(12)), "latter": list(range(depth - 12, depth))}
        expected["all"] = expected["former"] + expected["latter"]
        assert layers == expected[preset]
    else:
        assert layers == [r * depth // n for r in range(n)]
        assert set(layers) == set(range(depth))  # spread over every layer


def test_deeper_towers_map_from_the_24_block_preset_space() -> None:
    """SigLIP-so400m (27 blocks; 26 where the last is dropped): former = hs[1..12], latter = the last 12 blocks, into
    the same LLM layers as on a 24-block tower; single preset layers map from their preset position."""
    for vision in (SO400M, SO400M_26):
        L = vision.num_layers
        last12 = list(range(L - 11, L + 1))
        assert mapping("inject", "former", vision, 24) == [(k, k - 1) for k in FORMER]
        assert mapping("inject", "latter", vision, 24) == [(k, r + 12) for r, k in enumerate(last12)]
        assert mapping("inject", "all", vision, 32) == [(k, k - 1) for k in FORMER] + [(k, 20 + r) for r, k in enumerate(last12)]
        assert mapping("xattn", "latter", vision, 4) == [(k, r // 3) for r, k in enumerate(last12)]
        # 3-18-23: scaled vision layers, LLM layers of 3, 18, 23 on any tower (the authors divide by 24)
        sel = parse_layers("3-18-23", L)
        assert mapping("inject", "3-18-23", vision, 24) == [(t[0], m) for t, m in zip(sel.terms, [2, 17, 22])]
    assert parse_layers("3-18-23", 27).terms == ((3,), (20,), (26,))
    assert parse_layers("3-18-23", 26).terms == ((3,), (20,), (25,))
    # the old rule int(k * L_llm / L - 1) would give 1, 16, 22 on 27 blocks: it remains for explicit lists
    assert mapping("inject", "3,20,26", SO400M, 24) == [(3, 1), (20, 16), (26, 22)]
    assert [llm_layer_for(k, 27, 24) for k in (3, 20, 26)] == [1, 16, 22]
    assert [llm_layer_for(k, 27, 24, preset_position=p) for k, p in ((3, 3), (20, 18), (26, 23))] == [2, 17, 22]
    # docs/methods.md: a 26-block SigLIP maps preset layer 3 to LLM layer 2 (the authors' code), not int(3*24/26-1) = 1
    assert mapping("inject", "3-18", SO400M_26, 24)[0] == (3, 2)
    # other presets too: deepstack's 8, 15, 22 are hs[9], hs[17], hs[25] on 27 blocks, LLM layers 7, 14, 21
    assert mapping("inject", "deepstack", SO400M, 24) == [(9, 7), (17, 14), (25, 21)]
    # mean mode on a deeper tower: the parsed groups (every fuser's `latter`: the scaled 15..27), at the last position
    f = build_fuser("inject", SO400M, spec(24), layers="latter", group_mode="mean")
    assert f.selection.terms[0] == tuple(range(15, 28)) and f.llm_layer_of == [23]


def test_shallower_towers_take_the_scaled_groups() -> None:
    """12 blocks: former = hs[1..6], latter = hs[7..12] (the preset scaling), into the first / last 6 LLM layers."""
    assert mapping("inject", "former", SHALLOW, 24) == [(k, k - 1) for k in range(1, 7)]
    assert mapping("inject", "latter", SHALLOW, 24) == [(k, 18 + k - 7) for k in range(7, 13)]
    assert mapping("inject", "all", SHALLOW, 12) == [(k, k - 1) for k in range(1, 13)]  # 12 layers: one each
    assert mapping("inject", "all", SHALLOW, 8) == [(k, r * 8 // 12) for r, k in enumerate(range(1, 13))]  # spread


def test_group_mode_option() -> None:
    # mean: one group mean per group, at its last layer's position (the pre-issue-17 behaviour)
    assert mapping("inject", "former", VISION, 24, group_mode="mean") == [(12, 11)]
    assert mapping("xattn", "all", VISION, 32, group_mode="mean") == [(12, 15), (24, 31)]
    f = build_fuser("inject", VISION, spec(24), layers="all", group_mode="mean")
    assert f.selection.terms == (tuple(FORMER), tuple(LATTER), (23,)) and f.group_mode == "mean"
    # the resolved mode is what a saved run records (not "auto")
    assert build_fuser("inject", VISION, spec(24), layers="former").config.options()["group_mode"] == "per_layer"
    assert build_fuser("xattn", VISION, spec(24)).config.options()["group_mode"] == "mean"
    # auto keeps group means for other groups (igva's, explicit ones); per_layer splits them, each layer k at its m(k)
    assert build_fuser("inject", VISION, spec(24), layers="igva").llm_layer_of == [5, 11, 17, 23]
    assert mapping("inject", "igva", VISION, 24, group_mode="per_layer") == [(k, k - 1) for k in range(1, 25)]
    assert mapping("inject", "1:6,7:12,23", VISION, 24, group_mode="per_layer") == [(k, k - 1) for k in range(1, 13)] + [(23, 22)]
    assert mapping("inject", "1:6,7:12,23", VISION, 24) == [(6, 5), (12, 11), (23, 22)]
    # single-layer specs do not change with the mode
    for mode in ("auto", "mean", "per_layer"):
        assert mapping("xattn", "3-18-23", VISION, 24, group_mode=mode) == [(3, 2), (18, 17), (23, 22)]
    with pytest.raises(FuserBuildError, match="group_mode must be one of auto, per_layer, mean"):
        build_fuser("inject", VISION, spec(24), layers="former", group_mode="stack")
    # deepstack (not MLVF) keeps group means under auto; per_layer stacks each layer
    assert build_fuser("deepstack", VISION, spec(24), layers="former").fused_terms == [0]
    stacked = build_fuser("deepstack", VISION, spec(24), layers="former", group_mode="per_layer")
    assert stacked.llm_layer_of == list(range(1, 13)) and len(stacked.layer_projectors) == 12


def test_per_layer_reads_single_layers_not_group_means() -> None:
    """A cache's stored group mean of the group serves the mean mode only."""
    per_layer = build_fuser("inject", VISION, spec(24), layers="former")
    per_layer.use_views([tuple(FORMER)])
    assert per_layer.required_inputs == FORMER + [23]
    mean = build_fuser("inject", VISION, spec(24), layers="former", group_mode="mean")
    mean.use_views([tuple(FORMER)])
    assert mean.required_inputs == [23, tuple(FORMER)]
    assert "1->0" in repr(per_layer) and "12->11" in repr(per_layer)


# -- 2. parameter counts ---------------------------------------------------------------------------------------------
def projector_params(D: int, d: int) -> int:
    return D * d + d + d * d + d  # Linear(D, d) -> GELU -> Linear(d, d)


def xattn_block_params(d: int, ratio: float) -> int:
    h = int(round(d * ratio))
    return d + d * d + 2 * d * d + d * d + 1 + d + d * h + h * d + 1  # norm, q, kv, out, gate, norm, mlp, gate


@pytest.mark.parametrize("layers, fused", [("former", 12), ("latter", 12), ("all", 24), ("3-18-23", 3)])
def test_parameter_counts(layers: str, fused: int) -> None:
    D, d = VISION.hidden_size, 32
    count = lambda f: sum(p.numel() for p in f.parameters())
    inject = build_fuser("inject", VISION, spec(24), layers=layers)
    assert count(inject) == (1 + fused) * projector_params(D, d)
    xattn = build_fuser("xattn", VISION, spec(24), layers=layers, mlp_ratio=2.0)
    assert count(xattn) == (1 + fused) * projector_params(D, d) + fused * xattn_block_params(d, 2.0)
    groups = {"former": 1, "latter": 1, "all": 2}.get(layers)
    if groups:
        assert count(build_fuser("inject", VISION, spec(24), layers=layers, group_mode="mean")) == (1 + groups) * projector_params(D, d)


# -- 3. behaviour ----------------------------------------------------------------------------------------------------
def inputs_after(vlm: VisionLanguageModel, batch: Batch) -> list[torch.Tensor]:
    with torch.no_grad(), layer_io(vlm.llm) as (ins, _):
        run(vlm, batch)
    return ins


@pytest.mark.parametrize("name", INTERNAL)
@pytest.mark.parametrize("layers, depth, probes", [("former", 24, (0, 5, 11)), ("latter", 32, (0, 11)), ("all", 4, (0, 7, 23))])
def test_each_projector_enters_its_own_llm_layer(name: str, layers: str, depth: int, probes: tuple[int, ...]) -> None:
    """Perturb one vision layer's projector: the first decoder layer whose input changes is that layer's LLM layer."""
    llm = tiny_llm(depth)
    fuser = make(name, llm, layers)
    open_gates(fuser)
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    base = inputs_after(vlm, batch)
    for k in probes:
        p = fuser.layer_projectors[k].linear_2
        saved = p.bias.detach().clone()
        with torch.no_grad():
            p.bias.add_(0.5)
        changed = [i for i, (x, y) in enumerate(zip(inputs_after(vlm, batch), base)) if not torch.equal(x, y)]
        with torch.no_grad():
            p.bias.copy_(saved)
        assert changed and changed[0] == fuser.llm_layer_of[k], (k, changed[:3])
        assert torch.equal(inputs_after(vlm, batch)[-1], base[-1])  # restored


@torch.no_grad()
def test_inject_per_layer_matches_a_hand_written_reference() -> None:
    """former on a 4-layer LLM (3 vision layers per LLM layer): inputs_embeds carry P(hs[23]); before LLM layer r // 3,
    P_r(hs[r + 1]) is added at the image positions, in order."""
    llm = tiny_llm(4)
    fuser = make("inject", llm, "former")
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    got = run(vlm, batch)
    fuser.clear_context()
    ref = inject_reference(llm, fuser, batch, FORMER, llm_layers=[r // 3 for r in range(len(FORMER))])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    plain = plain_logits(vlm, batch)
    assert torch.equal(got[2], plain[2])  # the text-only sample is untouched
    for row, start in enumerate(STARTS[:2]):
        assert torch.equal(got[row, :start], plain[row, :start])  # nothing before the image changes


@torch.no_grad()
def test_mean_mode_is_the_old_behaviour() -> None:
    """group_mode="mean" (the default before issue 17): one projector on mean(hs[1..12]), added before LLM layer
    int(12 * L_llm / 24 - 1) (11 on 24 layers); parameter names as before."""
    llm = tiny_llm(24)
    fuser = make("inject", llm, "former", group_mode="mean")
    assert fuser.llm_layer_of == [11] and len(fuser.layer_projectors) == 1
    assert sorted({n.split(".")[0] for n, _ in fuser.named_parameters()}) == ["layer_projectors", "projector"]
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    got = run(vlm, batch)
    fuser.clear_context()
    d = llm.config.hidden_size
    patches, mask, img = batch.layers[:, :, 1:], batch.mask, batch.has_image
    embeds = llm.get_input_embeddings()(batch.input_ids.masked_fill(mask, 0))
    embeds[mask] = mlp(fuser.projector, patches[:, 12])[img].reshape(-1, d)  # required layers 1..12, 23
    delta = mlp(fuser.layer_projectors[0], patches[:, :12].mean(dim=1))[img].reshape(-1, d)

    def add(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        h = args[0].clone()
        h[mask] = h[mask] + delta
        return (h, *args[1:]), kwargs

    handle = llm.model.layers[11].register_forward_pre_hook(add, with_kwargs=True)
    try:
        ref = llm(inputs_embeds=embeds).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_xattn_per_layer_starts_as_the_plain_llm() -> None:
    """Closed gates at init: 24 cross-attention blocks and the LLM's outputs are the pretrained ones."""
    llm = tiny_llm(4)
    fuser = make("xattn", llm, "all")
    assert len(fuser.blocks) == 24
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    assert torch.equal(run(vlm, batch), plain_logits(vlm, batch))


@pytest.mark.parametrize("name", INTERNAL)
@torch.no_grad()
def test_per_layer_batch_independence(name: str) -> None:
    llm = tiny_llm(4)
    assert_batch_independent(make(name, llm, "all"), llm)


def test_per_layer_inject_trains_every_projector() -> None:
    llm = tiny_llm(4)
    fuser = make("inject", llm, "all")
    vlm = VisionLanguageModel(fuser, llm, IMAGE_TOKEN)
    batch = make_batch(fuser)
    labels = batch.input_ids.masked_fill(batch.mask, -100)
    vlm(batch.input_ids, batch.layers, has_image=batch.has_image, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in fuser.named_parameters()}
    assert all(g is not None and g.any() for g in grads.values()), [n for n, g in grads.items() if g is None or not g.any()]
    assert all(p.grad is None for p in llm.parameters())
