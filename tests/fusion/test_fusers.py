"""External fusers built from the registry: identity at init, gradients, batch independence, real-size
parameter counts, bf16 autocast (docs/methods.md: Baseline and External Direct, MMFuser, IGVA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from layerfuse.fusion import (
    FuserBuildError,
    LLMSpec,
    VisionSpec,
    build_fuser,
    fuser_config,
    list_fusers,
)
from layerfuse.fusion.igva import entropy
from layerfuse.fusion.mmfuser import MMFuserBlock

VISION = VisionSpec(num_layers=24, hidden_size=32, grid=(4, 4), has_cls=True, text_dim=24)
SIGLIP = VisionSpec(num_layers=24, hidden_size=32, grid=(4, 4), has_cls=False, text_dim=24)
LLM = LLMSpec(hidden_size=48, num_layers=4, num_heads=4)

# fuser name -> (options, expected visual tokens for VISION's 4x4 grid)
EXTERNAL = {
    "single": ({}, 16),
    "concat": ({"layers": "3-18-23"}, 16),
    "sti": ({"layers": "8-16", "pool": 2}, 16 + 2 * 4),
    "mmfuser": ({"heads": 4, "points": 2}, 16),
    "igva": ({"allocator_dim": 32, "allocator_heads": 4, "allocator_blocks": 2}, 16),
}


def make(name: str, vision: VisionSpec = VISION, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    opts, _ = EXTERNAL[name]
    return build_fuser(name, vision, LLM, **{**opts, **extra})


def inputs(fuser, b: int = 3, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    v = fuser.vision
    layers = torch.randn(b, len(fuser.required_layers), v.num_tokens, v.hidden_size, generator=g).to(dtype)
    text = torch.randn(b, v.text_dim, generator=g).to(dtype) if fuser.needs_text else None
    return layers, text


def open_gates(fuser) -> None:
    """Move zero-initialised parameters (LayerScale vectors, MSDA offset/attention weights) off zero, as
    training would, so that every parameter is on the output path."""
    g = torch.Generator().manual_seed(7)
    for n, p in fuser.named_parameters():
        if "gamma" in n:
            p.data.normal_(0.0, 0.5, generator=g)
        elif not p.data.any() and "weight" in n:
            p.data.normal_(0.0, 0.02, generator=g)


def test_registry_lists_and_builds_every_fuser():
    assert {"single", "concat", "sti", "mmfuser", "igva", "inject", "xattn"} <= set(list_fusers())
    cfg = fuser_config("mmfuser", heads=4)
    assert dataclasses.is_dataclass(cfg) and cfg.layers == "mmfuser" and cfg.heads == 4
    fuser = build_fuser("mmfuser", VISION, LLM, config=cfg)
    assert fuser.required_layers == [3, 8, 13, 18, 23]
    with pytest.raises(FuserBuildError, match="unknown fuser 'nope'"):
        build_fuser("nope", VISION, LLM)
    with pytest.raises(FuserBuildError, match="has no option"):
        build_fuser("single", VISION, LLM, heads=3)
    with pytest.raises(FuserBuildError, match="exactly one layer"):
        build_fuser("single", VISION, LLM, layers="3-18-23")
    with pytest.raises(FuserBuildError, match="at least 2 layer groups"):
        build_fuser("igva", VISION, LLM, layers="18", allocator_dim=32)
    with pytest.raises(FuserBuildError, match="K/V layers"):
        build_fuser("mmfuser", VISION, LLM, layers="penultimate", heads=4)
    with pytest.raises(FuserBuildError, match="instruction embeddings"):
        build_fuser("igva", dataclasses.replace(VISION, text_dim=0), LLM, allocator_dim=32)


@pytest.mark.parametrize("name", list(EXTERNAL))
def test_shapes_and_declared_inputs(name):
    fuser = make(name)
    layers, text = inputs(fuser)
    out = fuser(layers, text)
    assert out.tokens.shape == (3, EXTERNAL[name][1], LLM.hidden_size) == (3, fuser.num_visual_tokens, LLM.hidden_size)
    assert fuser.needs_text == (name == "igva")
    with pytest.raises(ValueError, match="expected layers"):
        fuser(layers[:, :, :5], text)


def test_declared_layers():
    assert make("single").required_layers == [23]
    assert make("concat").required_layers == [3, 18, 23]
    assert make("igva").required_layers == list(range(1, 25))
    assert make("concat", layers="former").required_layers == list(range(1, 13)) + [23]


def test_single_drops_cls_only_when_present():
    for vision, start in ((VISION, 1), (SIGLIP, 0)):
        fuser = make("single", vision)
        layers, _ = inputs(fuser)
        expected = fuser.projector(layers[:, 0, start:])
        torch.testing.assert_close(fuser(layers).tokens, expected, rtol=0, atol=0)


def test_concat_is_a_channel_concat_of_terms():
    fuser = make("concat", layers="former")  # DCI: the group mean of 1..12, then the base
    layers, _ = inputs(fuser)
    expected = fuser.projector(torch.cat([layers[:, :12, 1:].mean(1), layers[:, 12, 1:]], dim=-1))
    torch.testing.assert_close(fuser(layers).tokens, expected)
    assert fuser.projector.in_dim == 2 * VISION.hidden_size


def test_sti_appends_pooled_tokens():
    fuser = make("sti")
    layers, _ = inputs(fuser)
    grid = layers[:, 0, 1:].reshape(3, 4, 4, -1)  # layer 8
    pooled = grid.reshape(3, 2, 2, 2, 2, -1).mean(dim=(2, 4)).reshape(3, 4, -1)
    expected = fuser.projector(torch.cat([layers[:, 2, 1:], pooled], dim=1))[:, :20]
    torch.testing.assert_close(fuser(layers).tokens[:, :20], expected)


@pytest.mark.parametrize("vision", [VISION, SIGLIP], ids=["cls", "no-cls"])
def test_mmfuser_is_identity_on_the_base_layer_at_init(vision):
    fuser = make("mmfuser", vision)
    layers, _ = inputs(fuser)
    base = layers[:, -1, 1:] if vision.has_cls else layers[:, -1]
    assert torch.equal(fuser.fused_features(layers), base)
    single = make("single", vision)
    single.projector.load_state_dict(fuser.projector.state_dict())
    torch.testing.assert_close(fuser(layers).tokens, single(layers[:, -1:]).tokens, rtol=0, atol=0)
    open_gates(fuser)
    assert not torch.allclose(fuser.fused_features(layers), base)


@pytest.mark.parametrize("vision", [VISION, SIGLIP], ids=["cls", "no-cls"])
def test_igva_uniform_equals_group_mean_concat(vision):
    fuser = make("igva", vision, mode="uniform")
    assert not fuser.needs_text
    layers, _ = inputs(fuser)
    patches = layers[:, :, 1:] if vision.has_cls else layers
    groups = torch.stack([patches[:, i : i + 6].mean(1) for i in (0, 6, 12, 18)], dim=1)  # [B, 4, N, D]
    expected = fuser.projector(torch.cat([patches[:, 22], groups.mean(1)], dim=-1))  # hs[23] is position 22
    out = fuser(layers)
    torch.testing.assert_close(out.tokens, expected)
    torch.testing.assert_close(out.weights, torch.full((3, 4), 0.25))


def test_igva_allocator_weights_entropy_and_group_cls():
    fuser = make("igva", entropy_lambda=0.02)
    layers, text = inputs(fuser)
    seen = {}
    fuser.allocator.head.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o))
    out = fuser(layers, text)
    w = out.weights
    assert w.shape == (3, 4) and w.dtype == torch.float32
    torch.testing.assert_close(w, seen["logits"].float().softmax(-1))  # one softmax, not two
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    torch.testing.assert_close(out.aux_loss, -0.02 * entropy(w).mean())
    assert torch.allclose(entropy(torch.full((1, 4), 0.25)), torch.log(torch.tensor([4.0])))
    c, _ = fuser.group_features(layers)
    torch.testing.assert_close(c[:, 0], layers[:, :6, 0].mean(1))  # group CLS = CLS of the averaged states
    # per-sample weights depend on the instruction
    other = fuser(layers, text.flip(0)).weights
    assert not torch.allclose(other, w)
    assert make("igva").forward(layers, text).aux_loss is None  # lambda 0: no regulariser


def test_igva_no_cls_uses_mean_patch():
    fuser = make("igva", SIGLIP)
    layers, _ = inputs(fuser)
    c, f = fuser.group_features(layers)
    torch.testing.assert_close(c[:, 1], layers[:, 6:12].mean(1).mean(1))
    assert f.shape[2] == 16


def test_igva_stage_switch_freezes_allocator():
    fuser = make("igva", mode="uniform")
    assert not any(p.requires_grad for p in fuser.allocator.parameters())
    fuser.set_mode("allocator")
    assert all(p.requires_grad for p in fuser.allocator.parameters()) and fuser.needs_text
    with pytest.raises(FuserBuildError):
        fuser.set_mode("bogus")


@pytest.mark.parametrize("name", list(EXTERNAL) + ["igva-uniform"])
def test_gradients_reach_every_trainable_parameter(name):
    fuser = make("igva", mode="uniform") if name == "igva-uniform" else make(name)
    layers, text = inputs(fuser)
    fuser(layers, text).tokens.square().mean().backward()
    trainable = {n for n, p in fuser.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for n, p in fuser.named_parameters() if n in trainable), "graph disconnected"
    assert all(p.grad is None for n, p in fuser.named_parameters() if n not in trainable), "frozen parts got grads"
    if name == "igva-uniform":
        assert all(not p.requires_grad for p in fuser.allocator.parameters())
    fuser.zero_grad(set_to_none=True)
    open_gates(fuser)
    fuser(layers, text).tokens.square().mean().backward()
    zero = [n for n, p in fuser.named_parameters() if n in trainable and not p.grad.abs().sum() > 0]
    assert not zero, f"no gradient reaches {zero}"


@pytest.mark.parametrize("name", list(EXTERNAL))
def test_batch_independence(name):
    fuser = make(name)
    open_gates(fuser)
    layers, text = inputs(fuser, b=4)
    whole = fuser(layers, text).tokens
    for i in range(4):
        alone = fuser(layers[i : i + 1], None if text is None else text[i : i + 1]).tokens
        torch.testing.assert_close(alone[0], whole[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(EXTERNAL))
def test_bf16_autocast_close_to_fp32(name):
    fuser = make(name)
    open_gates(fuser)
    layers, text = inputs(fuser)
    ref = fuser(layers, text).tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fuser(layers, text).tokens
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"bf16 relative error {err:.4f}"


def test_real_size_parameter_counts():
    """docs/methods.md: MMFuser block at D=1024, 16 heads, 4 levels, 4 points ~ 5.19 M; IGVA allocator ~ 27 M."""
    block = MMFuserBlock(1024, (24, 24), levels=4, heads=16, points=4, eps=1e-6, impl="auto")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(block.cross) == 2_886_400
    assert count(block.self_attn) == 2_296_000
    assert count(block) - count(block.cross) - count(block.self_attn) == 8_192
    assert count(block) == 5_190_592
    vit_l = VisionSpec(num_layers=24, hidden_size=1024, grid=(24, 24), has_cls=True, text_dim=768)
    igva = build_fuser("igva", vit_l, LLMSpec(hidden_size=64))
    assert 26.5e6 < count(igva.allocator) < 27.5e6
    assert count(igva.allocator) == 27_047_940


def test_igva_entropy_regulariser_pushes_toward_uniform():
    fuser = make("igva", entropy_lambda=1.0)
    layers, text = inputs(fuser)
    opt = torch.optim.SGD(fuser.allocator.parameters(), lr=0.05)
    with torch.no_grad():
        before = entropy(fuser(layers, text).weights).mean()
    for _ in range(5):
        opt.zero_grad()
        fuser(layers, text).aux_loss.backward()
        opt.step()
    with torch.no_grad():
        assert entropy(fuser(layers, text).weights).mean() > before


def test_fusers_cli_lists_and_resolves():
    from click.testing import CliRunner
    from layerfuse.pipeline.cli import main

    res = CliRunner().invoke(main, ["fusers", "--layers", "3-18-23", "--depth", "12"])
    assert res.exit_code == 0, res.output
    for name in ("single", "concat", "sti", "mmfuser", "igva", "inject", "xattn"):
        assert name in res.output
    assert "reads hidden states [2, 9, 11]" in res.output
    res = CliRunner().invoke(main, ["fusers", "--layers", "bogus"])
    assert res.exit_code != 0 and "unknown layer spec" in res.output
