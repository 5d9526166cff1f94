"""MSDeformAttn CUDA kernel (plugins_trt/): the CMake build, and the kernel arithmetic checked on the CPU.

No GPU here: libmsda_host.so runs the kernels' per-thread functions (csrc/msda_kernel.cuh) on the CPU through the
same C ABI, so indexing, borders, level offsets, fp16/bf16 conversion, int32/int64 index inputs, 32/64-bit offsets
and the backward are checked against float64 references. libmsda_kernel.so is compiled with nvcc for one
architecture (through build.py and CMakeLists.txt, as `make kernel` does) and its C ABI argument checks are called
(they run before any CUDA call). The CUDA runtime tests at the end run only where a GPU exists.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layerfuse.fusion.msda import ms_deform_attn, ms_deform_attn_grid_sample
from layerfuse.plugins_trt import build as msda_build
from layerfuse.plugins_trt import kernel as msda_kernel

from tests.msda_reference import loop_reference  # float64 loop written from the formula
from tests.plugins_trt.conftest import TEST_ARCHS, skip_if_missing

NO_GPU = "no CUDA device"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


@pytest.fixture(scope="session")
def host_lib(msda_build_dir) -> msda_kernel.MSDALibrary:
    """libmsda_host.so, built once per session through kernel.load_host_library (the driver)."""
    try:
        return msda_kernel.load_host_library(build_dir=msda_build_dir)
    except msda_kernel.MSDAKernelError as err:
        if isinstance(err.__cause__, msda_build.BuildError):
            skip_if_missing(err.__cause__)
        raise


@pytest.fixture(scope="session")
def kernel_build(msda_targets) -> tuple[Path, Path]:
    """(libmsda_kernel.so, the PTX it embeds) for sm_80, built once per session."""
    config = msda_targets("msda_kernel", "msda_kernel_ptx")
    return config.output("msda_kernel"), config.output("msda_kernel_ptx")


@pytest.fixture
def host_registered(host_lib, monkeypatch):
    """ms_deform_attn(impl="kernel") on CPU tensors -> the host build, through MSDAFunction."""
    monkeypatch.setitem(msda_kernel._LIBS, "cpu", host_lib)
    from layerfuse.fusion.msda import register_kernel, unregister_kernel

    register_kernel(msda_kernel.ms_deform_attn_kernel)
    yield host_lib
    unregister_kernel()


def make_case(levels, b=2, q=5, h=2, dh=3, p=3, dtype=torch.float32, index_dtype=torch.int64, lo=-0.25, hi=1.25, seed=0):
    """value in `dtype`; locations on a 2^-10 grid so x*w - 0.5 is exact in fp32 and fp64 (same floor, same corner)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=index_dtype)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    value = torch.randn(b, int(sizes.sum()), h, dh, generator=g).to(dtype)
    loc = lo + (hi - lo) * torch.rand(b, q, h, len(levels), p, 2, generator=g)
    loc = torch.round(loc * 1024) / 1024
    attn = torch.rand(b, q, h, len(levels), p, generator=g).softmax(-1)
    return value, shapes, starts, loc, attn


def border_locations(levels, b, q, h, p, seed=0):
    """Multiples of half a pixel per level: pixel edges, centres, exactly 0 and 1, and just outside (x = -1, w)."""
    g = torch.Generator().manual_seed(seed)
    wh = torch.tensor(levels, dtype=torch.float32).flip(1).view(1, 1, 1, len(levels), 1, 2)
    top = 2 * max(max(lv) for lv in levels) + 2
    return torch.randint(-2, top, (b, q, h, len(levels), p, 2), generator=g).to(torch.float32) / (2 * wh)


def assert_rounded_from(out: torch.Tensor, ref: torch.Tensor) -> None:
    """out (fp16/bf16) is ref rounded to nearest: within half a unit in the last place (+ fp32 accumulation slack)."""
    ref = ref.double()
    _, exponent = torch.frexp(ref)
    ulp = torch.ldexp(torch.ones_like(ref), exponent - 1 - MANTISSA_BITS[out.dtype])
    if out.dtype == torch.float16:
        ulp = ulp.clamp(min=2.0**-24)  # subnormals
    err = (out.double() - ref).abs()
    bound = 0.5 * ulp + 1e-6 * (1 + ref.abs())
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), f"element {worst}: out {out.flatten()[worst]} ref {ref.flatten()[worst]}"


def assert_forward_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref.double(), rtol=1e-6, atol=1e-6)
    else:
        assert_rounded_from(out, ref)


LEVELS = {
    "mixed-levels": [(3, 5), (1, 4), (6, 1), (2, 2)],
    "one-level": [(4, 4)],
    "h1": [(1, 7)],
    "w1-and-1x1": [(5, 1), (1, 1)],
}


# ---- build ---------------------------------------------------------------------------------------------------------


def test_arch_list_parsing_and_choice(monkeypatch, tmp_path):
    assert msda_build.parse_archs("80;90") == ["80", "90"]
    assert msda_build.parse_archs("sm_86, sm_90") == ["86", "90"]
    with pytest.raises(msda_build.BuildError, match="architectures"):
        msda_build.parse_archs("ampere")
    monkeypatch.delenv("LAYERFUSE_CUDA_ARCHS", raising=False)
    assert msda_build.choose_archs(None, tmp_path) == ["80", "90"]  # not configured: the default
    monkeypatch.setenv("LAYERFUSE_CUDA_ARCHS", "75")
    assert msda_build.choose_archs(None, tmp_path) == ["75"]
    assert msda_build.choose_archs("86", tmp_path) == ["86"]


def test_cmake_default_architectures_equal_the_driver_default():
    """Direct cmake users get the driver's default: the two spellings of it agree."""
    cmake = (msda_build.PACKAGE_DIR / "CMakeLists.txt").read_text()
    assert re.search(r'set\(MSDA_CUDA_ARCHS "([^"]+)" CACHE', cmake).group(1) == msda_build.DEFAULT_ARCHS


def test_cmake_compiles_sass_per_arch_and_ptx_of_the_highest(tmp_path, monkeypatch):
    """Configure only (the compile is covered below): what nvcc is asked for, and the architectures kept for later."""
    monkeypatch.delenv("LAYERFUSE_CUDA_ARCHS", raising=False)
    config = msda_build.configure(tmp_path, "90;80")
    if "msda_kernel" in config.unavailable:
        pytest.skip(config.unavailable["msda_kernel"])
    assert config.archs == ["90", "80"] and msda_build.choose_archs(None, tmp_path) == ["90", "80"]
    ninja = (msda_build.cmake_dir(tmp_path) / "build.ninja").read_text()
    block = ninja.split("build CMakeFiles/msda_kernel_objects.dir/csrc/msda_kernel.cu.o:")[1].split("\n\n")[0]
    codes = set(re.findall(r"--generate-code=arch=compute_(\d+),code=\[(\w+)\]", block))
    assert codes == {("80", "sm_80"), ("90", "sm_90"), ("90", "compute_90")}


def test_driver_errors_name_the_missing_tool_and_the_failed_command(monkeypatch, msda_build_dir):
    with pytest.raises(msda_build.BuildError, match=r"cmake --build .* --target no_such_target") as failed:
        msda_build.build(["no_such_target"], msda_build_dir, TEST_ARCHS)
    assert "no_such_target" in str(failed.value).split("\n", 1)[1]  # ninja's own output follows the command
    monkeypatch.setattr(msda_build, "_pypi_tool", lambda *args: None)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(msda_build.BuildError, match=r"cmake not found: pip install 'layerfuse\[kernel\]'") as missing:
        msda_build.configure(msda_build_dir, TEST_ARCHS)
    assert missing.value.missing == "cmake"


def test_an_up_to_date_build_compiles_nothing(host_lib, msda_build_dir):
    before = host_lib.path.stat().st_mtime_ns
    assert msda_build.build(["msda_host"], msda_build_dir, TEST_ARCHS).output("msda_host") == host_lib.path
    assert host_lib.path.stat().st_mtime_ns == before


def test_nvcc_builds_the_kernel_library_with_vectorised_loads(kernel_build):
    lib_path, ptx_path = kernel_build
    assert lib_path.is_file() and lib_path.stat().st_size > 0
    ptx = ptx_path.read_text()
    assert ".entry" in ptx and ".target sm_80" in ptx
    # 16-byte channel packs: 8 x fp16/bf16 (v4.u32) and 4 x fp32 (v4.f32) per load, read-only path
    assert "ld.global.nc.v4.u32" in ptx and "ld.global.nc.v4.f32" in ptx
    assert "shfl.sync.bfly" in ptx  # backward group reduction


def test_kernel_library_c_abi_checks_arguments_before_touching_cuda(kernel_build):
    """Loads on a machine without a GPU (cudart is static and lazy) and refuses bad arguments with a message."""
    lib = msda_kernel.MSDALibrary(kernel_build[0])
    raw = lib.lib
    raw.msda_forward.restype = ctypes.c_int
    raw.msda_forward.argtypes = lib._forward.argtypes
    args = [None] * 6 + [1, 4, 1, 2, 1, 1, 1]
    assert raw.msda_forward(*args, 7, 0, None) == 2  # MSDA_STATUS_UNSUPPORTED_DTYPE
    assert b"value dtype" in raw.msda_last_error()
    assert raw.msda_forward(*args, 0, 5, None) == 2
    assert raw.msda_forward(*([None] * 6 + [1, 4, 1, 2, 1, 2000, 1]), 0, 0, None) == 1  # > MSDA_MAX_LEVELS
    assert raw.msda_forward(*([None] * 6 + [0, 4, 1, 2, 1, 1, 1]), 0, 0, None) == 0  # empty output: nothing to do
    assert raw.msda_forward(*([None] * 6 + [1, 4, 1, 2, 1, 1, 1]), 0, 0, None) == 1  # null pointers
    assert raw.msda_status_string(3) == b"CUDA error"
    assert lib.lib.msda_backward_workspace_size(2, 10, 4, 8, 1) == 4 * 2 * 10 * 4 * 8
    assert lib.lib.msda_backward_workspace_size(2, 10, 4, 8, 0) == 0  # fp32 accumulates in grad_value


# ---- forward, host build ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("name", list(LEVELS))
@pytest.mark.parametrize("dh", [1, 3, 8, 12])
def test_host_forward_matches_loop_reference(host_lib, dtype, index_dtype, name, dh):
    value, shapes, starts, loc, attn = make_case(LEVELS[name], dh=dh, dtype=dtype, index_dtype=index_dtype)
    out = torch.empty(2, 5, 2 * dh, dtype=dtype)
    host_lib.forward(value, shapes, starts.to(index_dtype), loc, attn, out)
    assert_forward_matches(out, loop_reference(value.double(), shapes, starts, loc.double(), attn.double()))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("dh", [5, 6, 64])
def test_host_forward_matches_grid_sample_at_larger_sizes(host_lib, dtype, dh):
    """Dh 64 takes the 8 x 16-bit / 4 x fp32 packs, 6 the 2-wide ones, 5 the scalar path."""
    value, shapes, starts, loc, attn = make_case([(24, 24), (12, 12), (6, 6)], b=2, q=24, h=4, dh=dh, p=4, dtype=dtype)
    out = torch.empty(2, 24, 4 * dh, dtype=dtype)
    host_lib.forward(value, shapes, starts, loc, attn, out)
    assert_forward_matches(out, ms_deform_attn_grid_sample(value.double(), shapes, starts, loc.double(), attn.double()))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_host_forward_borders_and_outside(host_lib, dtype):
    levels = [(4, 8), (1, 4), (2, 1)]
    value, shapes, starts, _, attn = make_case(levels, q=16, p=4, dh=4, dtype=dtype)
    loc = border_locations(levels, 2, 16, 2, 4)
    loc[0, 0, 0, 0, 0] = torch.tensor([float("nan"), 0.5])  # NaN samples zero
    loc[0, 0, 0, 0, 1] = torch.tensor([1e30, -1e30])  # far outside, no integer overflow
    out = torch.empty(2, 16, 8, dtype=dtype)
    host_lib.forward(value, shapes, starts, loc, attn, out)
    loc_ref = loc.clone()
    loc_ref[0, 0, 0, 0, 0] = torch.tensor([5.0, 0.5])  # the reference has no NaN rule: any outside point samples 0
    assert_forward_matches(out, loop_reference(value.double(), shapes, starts, loc_ref.double(), attn.double()))


def test_host_forward_misaligned_value_falls_back_to_narrow_loads(host_lib):
    """A value pointer one element past 16-byte alignment must still be read correctly (scalar packs)."""
    value, shapes, starts, loc, attn = make_case([(5, 6)], dh=8, dtype=torch.float16)
    flat = torch.empty(value.numel() + 1, dtype=torch.float16)
    flat[1:] = value.flatten()
    shifted = flat[1:].view(value.shape)
    assert shifted.data_ptr() % 16 != 0
    out = torch.empty(2, 5, 16, dtype=torch.float16)
    host_lib.forward(shifted, shapes, starts, loc, attn, out)
    assert_forward_matches(out, loop_reference(value.double(), shapes, starts, loc.double(), attn.double()))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_host_64bit_offset_path_gives_the_same_bytes(host_lib, dtype, monkeypatch):
    """LAYERFUSE_MSDA_WIDE_OFFSETS=1 forces the int64-offset instantiations (real use: > 2^31 elements)."""
    value, shapes, starts, loc, attn = make_case([(6, 5), (3, 2)], q=9, dh=8, dtype=dtype)
    narrow, wide = torch.empty(2, 9, 16, dtype=dtype), torch.empty(2, 9, 16, dtype=dtype)
    host_lib.forward(value, shapes, starts, loc, attn, narrow)
    monkeypatch.setenv("LAYERFUSE_MSDA_WIDE_OFFSETS", "1")
    host_lib.forward(value, shapes, starts, loc, attn, wide)
    assert torch.equal(narrow.view(torch.uint8), wide.view(torch.uint8))
    assert_forward_matches(wide, loop_reference(value.double(), shapes, starts, loc.double(), attn.double()))


# ---- backward, host build through MSDAFunction ---------------------------------------------------------------


def grads(impl, value, shapes, starts, loc, attn, grad_out, dtype):
    """(out, grad value, grad locations, grad weights): kernel in `dtype`, or grid_sample in float64."""
    if impl == "grid_sample":
        value, loc, attn, grad_out = value.double(), loc.double(), attn.double(), grad_out.double()
    v, l, a = (t.detach().clone().requires_grad_(True) for t in (value, loc, attn))
    out = ms_deform_attn(v, shapes, starts, l, a, impl=impl)
    out.backward(grad_out)
    return out, v.grad, l.grad, a.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("name,dh", [("mixed-levels", 3), ("mixed-levels", 8), ("one-level", 64), ("w1-and-1x1", 5),
                                     ("h1", 12)])
def test_host_backward_matches_grid_sample_autograd(host_registered, dtype, index_dtype, name, dh):
    value, shapes, starts, loc, attn = make_case(LEVELS[name], dh=dh, dtype=dtype, index_dtype=index_dtype)
    grad_out = torch.randn(2, 5, 2 * dh, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, gv, gl, ga = grads("kernel", value, shapes, starts.to(index_dtype), loc, attn, grad_out, dtype)
    _, rv, rl, ra = grads("grid_sample", value, shapes, starts, loc, attn, grad_out, dtype)
    assert out.dtype == dtype and gv.dtype == dtype and gl.dtype == torch.float32 and ga.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(gv.double(), rv, rtol=1e-5, atol=1e-6)
    else:
        assert_rounded_from(gv, rv)  # accumulated in fp32, rounded once
    scale_l, scale_a = max(1.0, float(rl.abs().max())), max(1.0, float(ra.abs().max()))
    torch.testing.assert_close(gl.double() / scale_l, rl / scale_l, rtol=0, atol=2e-6)
    torch.testing.assert_close(ga.double() / scale_a, ra / scale_a, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_host_backward_at_borders_takes_grid_sample_subgradient(host_registered, dtype):
    """Exact pixel edges/centres and x = -1 or w: kinks of the bilinear map, where both take the right derivative."""
    levels = [(4, 8), (2, 4), (1, 2)]
    value, shapes, starts, _, attn = make_case(levels, q=12, p=4, dh=4, dtype=dtype)
    loc = border_locations(levels, 2, 12, 2, 4, seed=5)
    grad_out = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    _, gv, gl, ga = grads("kernel", value, shapes, starts, loc, attn, grad_out, dtype)
    _, rv, rl, ra = grads("grid_sample", value, shapes, starts, loc, attn, grad_out, dtype)
    torch.testing.assert_close(gl.double(), rl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga.double(), ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gv.double(), rv, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)


def test_host_backward_64bit_offsets_and_empty_problems(host_registered, monkeypatch):
    value, shapes, starts, loc, attn = make_case([(3, 4), (2, 2)], dh=4)
    grad_out = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    narrow = grads("kernel", value, shapes, starts, loc, attn, grad_out, torch.float32)
    monkeypatch.setenv("LAYERFUSE_MSDA_WIDE_OFFSETS", "1")
    wide = grads("kernel", value, shapes, starts, loc, attn, grad_out, torch.float32)
    for a, b in zip(narrow, wide):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    monkeypatch.delenv("LAYERFUSE_MSDA_WIDE_OFFSETS")
    # Q = 0: empty output, zero gradients (which must be written, not left uninitialised)
    value, shapes, starts, loc, attn = make_case([(3, 4)], q=0, dh=4)
    out, gv, gl, ga = grads("kernel", value, shapes, starts, loc, attn, torch.zeros(2, 0, 8), torch.float32)
    assert out.shape == (2, 0, 8) and torch.equal(gv, torch.zeros_like(gv)) and gl.numel() == 0 == ga.numel()


def test_host_forward_is_the_dispatch_target_and_handles_non_contiguous_inputs(host_registered):
    value, shapes, starts, loc, attn = make_case([(3, 5), (2, 2)], dh=4)
    loc_t = loc.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    out = ms_deform_attn(value, shapes, starts, loc_t, attn, impl="kernel")
    assert not loc_t.is_contiguous()
    assert_forward_matches(out, loop_reference(value.double(), shapes, starts, loc.double(), attn.double()))


# ---- errors --------------------------------------------------------------------------------------------------------


def test_kernel_sends_float64_to_grid_sample_and_refuses_unbound_devices(host_registered, monkeypatch):
    """float64 (gradcheck) keeps working under impl="auto" on CUDA once the kernel is registered."""
    value, shapes, starts, loc, attn = make_case([(3, 3)], dtype=torch.float64)
    out = ms_deform_attn(value, shapes, starts, loc, attn, impl="kernel")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ms_deform_attn_grid_sample(value, shapes, starts, loc, attn), rtol=0, atol=0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ms_deform_attn(value.to(torch.int32), shapes, starts, loc, attn, impl="kernel")
    monkeypatch.delitem(msda_kernel._LIBS, "cpu")
    with pytest.raises(msda_kernel.MSDAKernelError, match="needs CUDA tensors"):
        ms_deform_attn(value.float(), shapes, starts, loc, attn, impl="kernel")


def test_host_library_reports_bad_arguments(host_lib):
    status = host_lib._forward(*([None] * 6), 1, 9, 1, 2, 1, 1, 1, 5, 0, None)  # value dtype code 5
    with pytest.raises(msda_kernel.MSDAKernelError, match="msda_forward_host failed: unsupported dtype: value dtype"):
        host_lib._check(status, "msda_forward")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_register_without_cuda_says_so():
    with pytest.raises(msda_kernel.MSDAKernelError, match="no CUDA device"):
        msda_kernel.register(build=False)


# ---- gpu_check -----------------------------------------------------------------------------------------------------


def run_gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerfuse.plugins_trt.gpu_check", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})}, check=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_check_without_cuda_exits_2_with_a_clear_message(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = run_gpu_check("--out", str(out))
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert not out.exists()


def test_gpu_check_script_runs_end_to_end_on_the_host_build(host_lib, tmp_path):
    """--device cpu: the whole script (matrix, determinism, timings, report) on the CPU build of the kernel math."""
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# layerfuse benchmarks\n\n## Other section\n\nkept\n\n"
                   "## MSDeformAttn CUDA kernel (plugins_trt/gpu_check.py)\n\nold numbers\n\n## Last\n\nkept too\n")
    proc = run_gpu_check("--device", "cpu", "--quick", "--out", str(out),
                         env={"LAYERFUSE_MSDA_HOST_LIB": str(host_lib.path)})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    text = out.read_text()
    assert "old numbers" not in text and "## Other section\n\nkept" in text and "## Last\n\nkept too" in text
    assert text.count("## MSDeformAttn CUDA kernel") == 1
    assert "12/12 cases pass" in text and "Forward bitwise deterministic: yes" in text


# ---- CUDA runtime (GPU machines only) -----------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_kernel_matches_grid_sample(dtype):
    msda_kernel.register()
    try:
        value, shapes, starts, loc, attn = (t.cuda() for t in make_case([(6, 7), (3, 4)], q=33, h=4, dh=64, dtype=dtype))
        grad_out = torch.randn(2, 33, 256, device="cuda").to(dtype)
        out, gv, gl, ga = grads("kernel", value, shapes, starts, loc, attn, grad_out, dtype)
        _, rv, rl, ra = grads("grid_sample", value, shapes, starts, loc, attn, grad_out, dtype)
        ref = ms_deform_attn_grid_sample(value.double(), shapes, starts, loc.double(), attn.double())
        assert_forward_matches(out.detach().cpu(), ref.cpu())
        torch.testing.assert_close(gl.double(), rl, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ga.double(), ra, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gv.double(), rv, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-4)
        again = ms_deform_attn(value, shapes, starts, loc, attn, impl="auto")  # auto -> kernel on CUDA, deterministic
        assert torch.equal(again.view(torch.uint8), out.detach().view(torch.uint8))
    finally:
        msda_kernel.unregister()
