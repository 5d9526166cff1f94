"""MSDeformAttn (docs/methods.md#msdeformattn): both implementations against a float64 loop written from the formula."""

from __future__ import annotations

import pytest
import torch
from layerfuse.fusion.msda import (
    MSDeformAttn,
    kernel_available,
    ms_deform_attn,
    ms_deform_attn_gather,
    reference_grid,
    register_kernel,
    unregister_kernel,
)

from layerfuse.fusion.msda import function as msda_function
from layerfuse.fusion.msda.gather import GatherFunction, gather_plain

from tests.msda_reference import loop_reference
from tests.support import REPO

IMPLS = ["grid_sample", "gather"]


def case(shapes, b=2, q=5, h=2, dh=3, p=3, dtype=torch.float64, seed=0, lo=-0.25, hi=1.25):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    n_levels = len(shapes)
    value = torch.randn(b, int(sizes.sum()), h, dh, generator=g, dtype=torch.float64).to(dtype)
    loc = lo + (hi - lo) * torch.rand(b, q, h, n_levels, p, 2, generator=g, dtype=torch.float64)
    attn = torch.rand(b, q, h, n_levels, p, generator=g, dtype=torch.float64).softmax(-1)
    return value, shapes, starts, loc, attn


SHAPES = {
    "mixed-levels": [(3, 5), (1, 4), (6, 1), (2, 2)],
    "one-level": [(4, 4)],
    "h1": [(1, 7)],
    "w1": [(5, 1), (1, 1)],
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dh", [3, 5, 8])
def test_matches_loop_reference_float64(impl, name, dh):
    value, shapes, starts, loc, attn = case(SHAPES[name], dh=dh)
    out = ms_deform_attn(value, shapes, starts, loc, attn, impl=impl)
    assert out.dtype == torch.float64 and out.shape == (2, 5, 2 * dh)
    torch.testing.assert_close(out, loop_reference(value, shapes, starts, loc, attn), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_borders_pixel_centres_and_outside(impl):
    """Exact borders (0, 1), pixel centres, integer pixel coordinates, points far outside the map."""
    value, shapes, starts, loc, attn = case([(3, 4), (2, 5)], q=8, p=4, seed=1)
    w, h = 4, 3
    special = torch.tensor(
        [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5 / w, 0.5 / h], [1.5 / w, 2.5 / h], [1 / w, 1 / h], [-3.0, 0.5], [0.5, 7.0]],
        dtype=torch.float64,
    )
    loc[0, :, 0, 0, 0] = special
    loc[1, :, 1, 1, :] = torch.tensor([[0.0, 0.5], [1.0, 0.5], [0.1, 1.0], [1.0 + 1e-9, 0.0]], dtype=torch.float64)
    out = ms_deform_attn(value, shapes, starts, loc, attn, impl=impl)
    torch.testing.assert_close(out, loop_reference(value, shapes, starts, loc, attn), rtol=1e-12, atol=1e-12)
    # entirely outside: zero contribution
    far = torch.full_like(loc, 5.0)
    assert ms_deform_attn(value, shapes, starts, far, attn, impl=impl).abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl):
    value, shapes, starts, loc, attn = case([(3, 4), (2, 3)], b=1, q=3, h=2, dh=2, p=2, seed=2, lo=0.05, hi=0.95)
    # keep the points off integer pixel coordinates (bilinear has kinks there)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    fn = lambda v, lc, a: ms_deform_attn(v, shapes, starts, lc, a, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_value_fp32_math(impl, dtype, tol):
    value, shapes, starts, loc, attn = case(SHAPES["mixed-levels"], dh=8)
    ref = ms_deform_attn(value.to(dtype).float(), shapes, starts, loc.float(), attn.float(), impl=impl)
    out = ms_deform_attn(value.to(dtype), shapes, starts, loc.float(), attn.float(), impl=impl)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)  # only the output rounding differs


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_autocast(impl):
    value, shapes, starts, loc, attn = case(SHAPES["mixed-levels"], dh=8)
    value, loc, attn = value.float(), loc.float(), attn.float()
    ref = ms_deform_attn(value, shapes, starts, loc, attn, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.bfloat16(), shapes, starts, loc, attn, impl=impl)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_gather_and_grid_sample_agree_fp32_with_grads():
    value, shapes, starts, loc, attn = case([(12, 12), (6, 6), (3, 3)], b=2, q=40, h=4, dh=16, p=4, dtype=torch.float32, seed=3)
    loc, attn = loc.float(), attn.float()
    outs, grads = [], []
    for impl in IMPLS:
        v, lc, a = (t.clone().requires_grad_(True) for t in (value, loc, attn))
        o = ms_deform_attn(v, shapes, starts, lc, a, impl=impl)
        o.square().sum().backward()
        outs.append(o.detach())
        grads.append([v.grad, lc.grad, a.grad])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)


def test_dispatch_and_kernel_hook():
    value, shapes, starts, loc, attn = case([(2, 2)], dtype=torch.float32)
    loc, attn = loc.float(), attn.float()
    assert not kernel_available()
    with pytest.raises(RuntimeError, match="register_kernel"):
        ms_deform_attn(value, shapes, starts, loc, attn, impl="kernel")
    calls = []

    def fake(*args):
        calls.append(args[0].shape)
        return ms_deform_attn_gather(*args)

    register_kernel(fake)
    try:
        assert kernel_available()
        ms_deform_attn(value, shapes, starts, loc, attn, impl="kernel")
        ms_deform_attn(value, shapes, starts, loc, attn, impl="auto")  # CPU tensors: auto never takes the kernel
        assert len(calls) == 1
    finally:
        unregister_kernel()
    assert not kernel_available()
    with pytest.raises(ValueError, match="unknown impl"):
        ms_deform_attn(value, shapes, starts, loc, attn, impl="cuda-magic")


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda v, s, st, lc, a: (v[0], s, st, lc, a), "value must be"),
        (lambda v, s, st, lc, a: (v, s, st, lc[..., :1], a), "sampling_locations must be"),
        (lambda v, s, st, lc, a: (v, s, st, lc, a[:, :, :, :, :1]), "attention_weights must be"),
        (lambda v, s, st, lc, a: (v[:, :-1], s, st, lc, a), "rows"),
        (lambda v, s, st, lc, a: (v, s, st + 1, lc, a), "level_start_index"),
        (lambda v, s, st, lc, a: (v, s.float(), st, lc, a), "integer"),
    ],
)
def test_bad_shapes_are_clear(mutate, msg):
    args = case([(2, 3), (1, 2)], dtype=torch.float32)
    with pytest.raises(ValueError, match=msg):
        ms_deform_attn(*mutate(*args))


def test_gather_exports_with_dynamic_batch_and_queries():
    """torch.export with symbolic B and Q: the gather path has no data-dependent control flow (ONNX-ready)."""
    value, shapes, starts, loc, attn = case([(3, 4), (2, 2)], b=2, q=5, dtype=torch.float32)

    class Op(torch.nn.Module):
        def forward(self, v, lc, a):
            return ms_deform_attn_gather(v, shapes, starts, lc, a)

    batch, queries = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("queries", min=2, max=4096)
    exported = torch.export.export(
        Op(), (value.float(), loc.float(), attn.float()),
        dynamic_shapes=({0: batch}, {0: batch, 1: queries}, {0: batch, 1: queries}),
    )
    v3, _, _, lc3, a3 = case([(3, 4), (2, 2)], b=3, q=9, dtype=torch.float32, seed=5)
    torch.testing.assert_close(
        exported.module()(v3, lc3.float(), a3.float()), ms_deform_attn_gather(v3, shapes, starts, lc3.float(), a3.float())
    )


# --- the module ------------------------------------------------------------------------------------------


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_module_parameter_counts_at_mmfuser_size():
    assert count(MSDeformAttn(1024, n_levels=4, n_heads=16, n_points=4)) == 2_886_400
    assert count(MSDeformAttn(1024, n_levels=1, n_heads=16, n_points=4)) == 2_296_000


def test_module_init_is_deformable_detr():
    m = MSDeformAttn(32, n_levels=2, n_heads=4, n_points=3)
    bias = m.sampling_offsets.bias.view(4, 2, 3, 2)
    assert not m.sampling_offsets.weight.any() and not m.attention_weights.weight.any() and not m.attention_weights.bias.any()
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)  # theta = pi/2
    for p in range(3):
        torch.testing.assert_close(bias[:, :, p], (p + 1) * bias[:, :, 0])
    torch.testing.assert_close(bias[:, 0], bias[:, 1])  # same for every level
    assert bias.abs().amax(-1).div(torch.arange(1, 4)).allclose(torch.ones(4, 2, 3))  # max |component| = p+1
    assert not m.value_proj.bias.any() and not m.output_proj.bias.any()


def test_module_uniform_attention_at_init_and_shapes(monkeypatch):
    torch.manual_seed(0)
    m = MSDeformAttn(16, n_levels=2, n_heads=2, n_points=2, impl="gather")
    shapes, starts = torch.tensor([[4, 4], [2, 2]]), torch.tensor([0, 16])
    x, q, ref = torch.randn(3, 20, 16), torch.randn(3, 6, 16), torch.rand(3, 6, 2)
    import layerfuse.fusion.msda.module as module

    seen: dict[str, torch.Tensor] = {}

    def spy(value, shapes_, starts_, loc, attn, impl):
        seen.update(loc=loc, attn=attn)
        return ms_deform_attn(value, shapes_, starts_, loc, attn, impl=impl)

    monkeypatch.setattr(module, "ms_deform_attn", spy)
    out = m(q, ref, x, shapes, starts)
    assert out.shape == (3, 6, 16)
    torch.testing.assert_close(seen["attn"], torch.full((3, 6, 2, 2, 2), 0.25))  # one softmax over L*P
    # loc = ref + offset / (w_l, h_l): head 0 points along +x, (p+1) pixels of each level
    for lvl, (h, w) in enumerate(((4, 4), (2, 2))):
        for p in range(2):
            torch.testing.assert_close(seen["loc"][:, :, 0, lvl, p], ref + torch.tensor([(p + 1) / w, 0.0]))
    torch.testing.assert_close(m(q, ref[:, :, None].expand(3, 6, 2, 2), x, shapes, starts), out)


def test_module_padding_mask_and_batch_independence():
    torch.manual_seed(1)
    m = MSDeformAttn(16, n_levels=1, n_heads=2, n_points=4)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(m.attention_weights.weight, std=0.1)
    shapes, starts = torch.tensor([[3, 3]]), torch.tensor([0])
    x, q, ref = torch.randn(4, 9, 16), torch.randn(4, 5, 16), torch.rand(4, 5, 2)
    whole = m(q, ref, x, shapes, starts)
    for i in range(4):
        torch.testing.assert_close(m(q[i : i + 1], ref[i : i + 1], x[i : i + 1], shapes, starts)[0], whole[i], rtol=1e-5, atol=1e-6)
    pad = torch.ones(4, 9, dtype=torch.bool)
    torch.testing.assert_close(m(q, ref, x, shapes, starts, pad), m.output_proj.bias.expand(4, 5, 16))  # all padded: only the bias


def test_reference_grid_pixel_centres():
    g = reference_grid(2, 3)
    torch.testing.assert_close(g[0], torch.tensor([1 / 6, 1 / 4]))
    torch.testing.assert_close(g[4], torch.tensor([3 / 6, 3 / 4]))  # row 1, column 1
    assert g.shape == (6, 2)


# --- the gather path's two executions (plain ops when traced, the sparse autograd.Function eagerly) -------


@pytest.mark.parametrize("name", list(SHAPES))
def test_plain_formulation_matches_loop_reference_float64(name):
    """gather_plain is what tracing / export / compile see: same contract as the eager path."""
    value, shapes, starts, loc, attn = case(SHAPES[name], dh=5)
    torch.testing.assert_close(gather_plain(value, shapes, starts, loc, attn), loop_reference(value, shapes, starts, loc, attn), rtol=1e-12, atol=1e-12)


def test_plain_formulation_gradcheck_float64():
    value, shapes, starts, loc, attn = case([(3, 4), (2, 3)], b=1, q=3, h=2, dh=2, p=2, seed=2, lo=0.05, hi=0.95)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, lc, a: gather_plain(v, shapes, starts, lc, a), (value, loc, attn), eps=1e-6, atol=1e-6)


def test_sparse_function_gradcheck_borders_and_outside_float64():
    """The hand-written backward where corners leave the map (zero padding) and across several levels / heads."""
    value, shapes, starts, loc, attn = case(SHAPES["mixed-levels"], b=2, q=4, h=3, dh=3, p=2, seed=7, lo=-0.3, hi=1.3)
    loc = loc.detach().clone()
    loc[0, 0, 0, 0, 0] = torch.tensor([-0.9, 0.5], dtype=torch.float64)  # entirely outside: zero gradient
    for t in (value, loc, attn):
        t.requires_grad_(True)
    fn = lambda v, lc, a: GatherFunction.apply(v, shapes, starts, lc, a)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-7, atol=1e-6)


def test_sparse_function_and_plain_agree_with_grads_and_partial_needs():
    value, shapes, starts, loc, attn = case([(6, 5), (3, 3)], b=2, q=7, h=4, dh=8, p=3, seed=8)
    grads = []
    for fn in (GatherFunction.apply, gather_plain):
        v, lc, a = (t.clone().requires_grad_(True) for t in (value, loc, attn))
        out = fn(v, shapes, starts, lc, a)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        grads.append((out.detach(), v.grad, lc.grad, a.grad))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    # only some inputs need gradients: the others get None, the rest is unchanged
    lc = loc.clone().requires_grad_(True)
    GatherFunction.apply(value, shapes, starts, lc, attn).sum().backward()
    ref = loc.clone().requires_grad_(True)
    gather_plain(value, shapes, starts, ref, attn).sum().backward()
    torch.testing.assert_close(lc.grad, ref.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_value_grads_fp32_math(dtype, tol):
    """Reduced-precision value: fp32 sums in forward and backward, gradients back in value's dtype."""
    value, shapes, starts, loc, attn = case(SHAPES["mixed-levels"], dh=8)
    v16 = value.to(dtype)
    res = []
    for v in (v16.float(), v16):
        v, lc, a = v.clone().requires_grad_(True), loc.float().requires_grad_(True), attn.float().requires_grad_(True)
        ms_deform_attn(v, shapes, starts, lc, a, impl="gather").square().sum().backward()
        res.append((v.grad, lc.grad, a.grad))
    assert res[1][0].dtype == dtype
    for x, y in zip(*res):
        torch.testing.assert_close(y.float(), x, rtol=tol, atol=tol)


def test_traced_gather_is_plain_ops():
    """Under tracing the gather path is the plain formulation (no sparse tensors, no custom autograd node)."""
    value, shapes, starts, loc, attn = case([(3, 4), (2, 2)], dtype=torch.float32)
    traced = torch.jit.trace(lambda v, lc, a: ms_deform_attn_gather(v, shapes, starts, lc, a), (value, loc.float(), attn.float()))
    kinds = {n.kind() for n in traced.graph.nodes()}
    assert "aten::index_select" in kinds and "aten::bmm" in kinds
    assert not any("sparse" in k or "PythonOp" in k for k in kinds), kinds


# --- impl="auto" -----------------------------------------------------------------------------------------


@pytest.fixture
def fresh_auto(monkeypatch):
    monkeypatch.delenv(msda_function.AUTO_ENV, raising=False)
    msda_function.reset_auto()
    yield
    msda_function.reset_auto()


def test_auto_measures_once_per_device_dtype_and_pass(fresh_auto, monkeypatch):
    value, shapes, starts, loc, attn = case([(4, 4), (2, 2)], dtype=torch.float32)
    loc, attn = loc.float(), attn.float()
    times = {"grid_sample": 2.0, "gather": 1.0}
    measured = []

    def fake_measure(args, backward):
        measured.append(backward)
        return dict(times)

    monkeypatch.setattr(msda_function, "_measure", fake_measure)
    for _ in range(3):
        out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert measured == [False]
    assert msda_function.auto_choices() == {("cpu", torch.float32, False): ("gather", times)}
    torch.testing.assert_close(out, ms_deform_attn(value, shapes, starts, loc, attn, impl="gather"))
    times.update(grid_sample=0.5)
    ms_deform_attn(value.requires_grad_(True), shapes, starts, loc, attn).sum().backward()  # training: its own entry
    ms_deform_attn(value.detach().bfloat16(), shapes, starts, loc, attn)  # another dtype: its own entry
    assert measured == [False, True, False]
    choices = {k: c for k, (c, _) in msda_function.auto_choices().items()}
    assert choices == {("cpu", torch.float32, False): "gather", ("cpu", torch.float32, True): "grid_sample",
                       ("cpu", torch.bfloat16, False): "grid_sample"}


def test_auto_real_measurement_and_pin(fresh_auto, monkeypatch):
    value, shapes, starts, loc, attn = case([(4, 4), (2, 2)], b=3, dtype=torch.float32)
    loc, attn = loc.float(), attn.float()
    ms_deform_attn(value, shapes, starts, loc, attn)
    ((key, (choice, times)),) = msda_function.auto_choices().items()
    assert key == ("cpu", torch.float32, False) and choice in ("grid_sample", "gather")
    assert set(times) == {"grid_sample", "gather"} and choice == min(times, key=times.get)
    monkeypatch.setenv(msda_function.AUTO_ENV, "gather")
    assert msda_function.auto_choice(value, shapes, starts, loc, attn) == "gather"
    monkeypatch.setenv(msda_function.AUTO_ENV, "nope")
    with pytest.raises(ValueError, match="LAYERFUSE_MSDA_IMPL"):
        ms_deform_attn(value, shapes, starts, loc, attn)


def test_auto_drops_a_failing_candidate(fresh_auto, monkeypatch):
    value, shapes, starts, loc, attn = case([(2, 3)], dtype=torch.float32)

    def broken(*args):
        raise RuntimeError("not on this device")

    monkeypatch.setitem(msda_function.IMPLS, "grid_sample", broken)
    assert ms_deform_attn(value, shapes, starts, loc.float(), attn.float()).shape == (2, 5, 6)
    assert msda_function.auto_choices()[("cpu", torch.float32, False)][0] == "gather"


def test_auto_does_not_measure_while_tracing(fresh_auto, monkeypatch):
    value, shapes, starts, loc, attn = case([(3, 4), (2, 2)], dtype=torch.float32)
    monkeypatch.setattr(msda_function, "_measure", lambda *a: pytest.fail("measured while tracing"))
    fn = lambda v, lc, a: ms_deform_attn(v, shapes, starts, lc, a)  # noqa: E731
    traced = torch.jit.trace(fn, (value, loc.float(), attn.float()), check_trace=False)  # the check reruns it eagerly
    assert "aten::index_select" in {n.kind() for n in traced.graph.nodes()}
    assert msda_function.auto_choices() == {}


def test_benchmark_script_writes_its_section(tmp_path):
    """bench/msda.py --quick runs end to end and replaces only its own section."""
    import subprocess
    import sys

    out = tmp_path / "BENCH.md"
    out.write_text("# layerfuse benchmarks\n\n## Other (`x`)\n\nkeep me\n")
    script = REPO / "bench" / "msda.py"
    for _ in range(2):
        subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], check=True, capture_output=True, timeout=300)
    text = out.read_text()
    assert "keep me" in text and text.count("## MSDeformAttn (`bench/msda.py`)") == 1
    assert "| forward + backward |" in text
