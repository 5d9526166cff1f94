"""GPU check of the MSDeformAttn CUDA kernel: correctness against grid_sample in float64, determinism, timing.

    python -m layerfuse.plugins_trt.gpu_check [--out BENCHMARKS.md] [--json FILE] [--quick] [--archs 90] [--no-large]

1. Builds libmsda_kernel.so (build.py: CMake + nvcc), loads it with ctypes and registers it with ms_deform_attn.
2. Correctness matrix, each case against the grid_sample reference computed in float64 on the GPU from the same
   (dtype-rounded) inputs: value fp32 / fp16 / bf16; MMFuser shapes (B 1, 8, 32; Q 576; H 16; Dh 64; 4 levels of
   24x24; P 4); Deformable-DETR multi-scale shapes (levels 100x150, 50x75, 25x38, 13x19; H 8; Dh 32; Q 300 and
   Q = S); edge cases (points outside and exactly on borders, h = 1, w = 1, one level, Dh 1/3/5/6/12, a misaligned
   value pointer, int32 and int64 index inputs, > 2^31 value elements for the 64-bit offset path); the backward
   (grad value, locations, weights) against autograd of grid_sample; `impl="auto"` picking the kernel; bitwise
   determinism of the forward (two runs, same bytes).
3. Timing with CUDA events (median of repeats after warm-up), forward and forward+backward, against both PyTorch
   implementations (grid_sample, gather): speed-ups and achieved memory bandwidth as a fraction of the device's peak
   (compulsory bytes: value, locations, weights and output read/written once).

Writes its section of BENCHMARKS.md with --out (replacing only that section), and its numbers as JSON with --json
(bench/gpu.py, `make gpu-check`, reads them). Exit status: 0 all checks passed,
1 a check failed, 2 no CUDA device / kernel not buildable. `--device cpu` runs the same script on the CPU build of
the kernel arithmetic with tiny shapes: a test of this script, not of the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerfuse.fusion.msda import ms_deform_attn, ms_deform_attn_grid_sample
from layerfuse.core.benchmarks import write_section
from layerfuse.core.timing import median_time

from . import kernel

SECTION = "## MSDeformAttn CUDA kernel (plugins_trt/gpu_check.py)"
# Normalised error bounds, max|out - ref| / max(max|ref|, 1): fp32 accumulation error, plus the output's rounding
# for fp16 (2^-11 relative) and bf16 (2^-8).
FORWARD_TOL = {torch.float32: 2e-6, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
BACKWARD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Peak DRAM bandwidth (bytes/s) by device name, when torch does not report memory clock and bus width.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("H800", 3.35e12),
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("RTX 4090", 1.008e12),
]

MMFUSER_LEVELS = [(24, 24)] * 4
LOC_QUANTUM = 1024.0
DETR_LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]


@dataclass
class Case:
    """One correctness case: shapes, value dtype, location range, index dtype."""

    name: str
    levels: list[tuple[int, int]]
    b: int = 2
    q: int = 32
    h: int = 8
    dh: int = 32
    p: int = 4
    dtype: torch.dtype = torch.float32
    lo: float = 0.0  # sampling locations uniform in [lo, hi]
    hi: float = 1.0
    index_dtype: torch.dtype = torch.int64
    borders: bool = False  # snap locations to 0, 1, pixel centres and pixel edges
    misaligned: bool = False  # value starts one element past an aligned address
    backward: bool = False
    reference: str = "grid_sample"  # "gather" (fp32 accumulation) for the case too big for an fp64 copy


@dataclass
class Outcome:
    case: Case
    forward_err: float
    backward_err: dict[str, float] = field(default_factory=dict)
    passed: bool = True
    note: str = ""


def make_inputs(case: Case, device: str, seed: int = 0):
    """value [B,S,H,Dh] (case dtype), shapes [L,2], starts [L], loc [B,Q,H,L,P,2] fp32, attn [B,Q,H,L,P] fp32."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = torch.tensor(case.levels, dtype=case.index_dtype)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    s = int(sizes.sum())
    n_levels = len(case.levels)
    numel = case.b * s * case.h * case.dh
    if numel > 2**27:  # large: draw on the device, in the target dtype, to spare host memory
        gd = torch.Generator(device=device).manual_seed(seed)
        value = torch.randn(case.b, s, case.h, case.dh, generator=gd, device=device, dtype=case.dtype)
    else:
        value = torch.randn(case.b, s, case.h, case.dh, generator=g).to(device=device, dtype=case.dtype)
    if case.misaligned:
        flat = torch.empty(value.numel() + 1, dtype=case.dtype, device=device)
        flat[1:] = value.reshape(-1)
        value = flat[1:].view(value.shape)
    loc = case.lo + (case.hi - case.lo) * torch.rand(case.b, case.q, case.h, n_levels, case.p, 2, generator=g)
    if case.borders:
        wh = shapes.flip(1).to(torch.float32).view(1, 1, 1, n_levels, 1, 2)  # (w, h) per level
        ticks = torch.randint(-1, 2 * int(shapes.max()) + 2, loc.shape, generator=g).to(torch.float32)
        loc = ticks / (2 * wh)  # multiples of half a pixel: edges, centres, 0, 1, just outside (power-of-two sizes)
    # Multiples of 2^-10: x = loc*w - 0.5 is then exact in fp32 as in fp64, so the kernel and the fp64 reference floor
    # to the same corner (the location gradient jumps there) and fp32 rounding cannot pick a different side.
    loc = torch.round(loc * LOC_QUANTUM) / LOC_QUANTUM
    attn = torch.rand(case.b, case.q, case.h, n_levels, case.p, generator=g).softmax(-1)
    return value, shapes.to(device), starts.to(device), loc.to(device), attn.to(device)


def normalised_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, 1.0)
    return float((out.double() - ref).abs().max()) / scale if ref.numel() else 0.0


def reference_forward(case: Case, value, shapes, starts, loc, attn) -> torch.Tensor:
    if case.reference == "gather":
        return ms_deform_attn(value, shapes, starts, loc, attn, impl="gather").double()
    return ms_deform_attn_grid_sample(value.double(), shapes, starts, loc.double(), attn.double())


def check_case(case: Case, device: str) -> Outcome:
    value, shapes, starts, loc, attn = make_inputs(case, device)
    out = ms_deform_attn(value, shapes, starts, loc, attn, impl="kernel")
    ref = reference_forward(case, value, shapes, starts, loc, attn)
    outcome = Outcome(case, normalised_error(out, ref))
    ok = out.dtype == case.dtype and tuple(out.shape) == (case.b, case.q, case.h * case.dh)
    ok = ok and bool(torch.isfinite(out).all()) and outcome.forward_err <= FORWARD_TOL[case.dtype]
    if case.backward:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, case.dtype)
        v, l, a = (t.detach().clone().requires_grad_(True) for t in (value, loc, attn))
        ms_deform_attn(v, shapes, starts, l, a, impl="kernel").backward(grad_out)
        v64, l64, a64 = (t.detach().double().requires_grad_(True) for t in (value, loc, attn))
        ms_deform_attn_grid_sample(v64, shapes, starts, l64, a64).backward(grad_out.double())
        outcome.backward_err = {
            "value": normalised_error(v.grad, v64.grad),
            "locations": normalised_error(l.grad, l64.grad),
            "weights": normalised_error(a.grad, a64.grad),
        }
        ok = ok and v.grad.dtype == case.dtype and max(outcome.backward_err.values()) <= BACKWARD_TOL[case.dtype]
    outcome.passed = ok
    return outcome


def correctness_cases(quick: bool, large: bool, device: str) -> list[Case]:
    """The matrix of the module docstring (tiny shapes for --device cpu)."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    cases: list[Case] = []
    if device == "cpu":  # the host build loops one lane at a time: keep it small
        for dt in dtypes:
            cases += [
                Case(f"mmfuser-like {DTYPE_NAMES[dt]}", [(4, 4)] * 4, b=1, q=8, h=2, dh=8, dtype=dt, backward=True),
                Case(f"detr-like {DTYPE_NAMES[dt]}", [(6, 9), (3, 5), (2, 3), (1, 2)], b=1, q=6, h=2, dh=4, dtype=dt,
                     lo=-0.25, hi=1.25, index_dtype=torch.int32, backward=True),
                Case(f"borders dh=3 {DTYPE_NAMES[dt]}", [(2, 4), (1, 8), (4, 1)], b=1, q=6, h=2, dh=3, dtype=dt,
                     borders=True, backward=True),
                Case(f"misaligned {DTYPE_NAMES[dt]}", [(3, 3)], b=1, q=4, h=1, dh=8, dtype=dt, misaligned=True),
            ]
        return cases
    batches = [1, 8] if quick else [1, 8, 32]
    for dt in dtypes:
        name = DTYPE_NAMES[dt]
        for b in batches:
            cases.append(Case(f"MMFuser B={b} {name}", MMFUSER_LEVELS, b=b, q=576, h=16, dh=64, dtype=dt,
                              backward=b == 1))
        s = sum(hh * ww for hh, ww in DETR_LEVELS)
        cases.append(Case(f"DETR decoder Q=300 {name}", DETR_LEVELS, b=2, q=300, h=8, dh=32, dtype=dt,
                          lo=-0.1, hi=1.1, index_dtype=torch.int32, backward=True))
        if not quick:
            cases.append(Case(f"DETR encoder Q=S={s} {name}", DETR_LEVELS, b=2, q=s, h=8, dh=32, dtype=dt))
        cases += [
            Case(f"outside [-0.5, 1.5] {name}", [(7, 5), (3, 4)], q=64, dtype=dt, lo=-0.5, hi=1.5, backward=True),
            Case(f"borders/half pixels {name}", [(8, 16), (4, 2), (1, 8)], q=64, dtype=dt, borders=True, backward=True),
            Case(f"h=1, w=1, 1x1 {name}", [(1, 9), (7, 1), (1, 1)], q=32, dtype=dt, lo=-0.2, hi=1.2, backward=True),
            Case(f"one level {name}", [(24, 24)], q=96, h=16, dh=64, p=8, dtype=dt, backward=True),
            Case(f"Dh=1 {name}", [(5, 6), (2, 3)], q=32, dh=1, dtype=dt, backward=True),
            Case(f"Dh=3 {name}", [(5, 6), (2, 3)], q=32, dh=3, dtype=dt, backward=True),
            Case(f"Dh=5 int32 {name}", [(5, 6), (2, 3)], q=32, dh=5, dtype=dt, index_dtype=torch.int32, backward=True),
            Case(f"Dh=6 {name}", [(5, 6), (2, 3)], q=32, dh=6, dtype=dt, backward=True),
            Case(f"Dh=12 {name}", [(5, 6), (2, 3)], q=32, dh=12, dtype=dt, backward=True),
            Case(f"Dh=256 {name}", [(8, 8)], q=32, h=2, dh=256, dtype=dt, backward=True),
            Case(f"misaligned value {name}", [(6, 7)], q=32, dh=64, dtype=dt, misaligned=True, backward=True),
        ]
    if large:  # > 2^31 value elements: the 64-bit offset path (about 4.3 GB of fp16 value)
        cases.append(Case("64-bit offsets (2.15e9 value elements) fp16", [(2900, 2900)], b=1, q=64, h=8, dh=32,
                          dtype=torch.float16, lo=-0.1, hi=1.1, reference="gather"))
    return cases


def check_determinism(device: str) -> bool:
    """The forward is bitwise reproducible (no atomics): two runs give the same bytes."""
    ok = True
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        case = Case("determinism", MMFUSER_LEVELS if device != "cpu" else [(4, 4)] * 2,
                    b=4 if device != "cpu" else 1, q=576 if device != "cpu" else 8, h=16 if device != "cpu" else 2,
                    dh=64 if device != "cpu" else 8, dtype=dt)
        value, shapes, starts, loc, attn = make_inputs(case, device, seed=3)
        first = ms_deform_attn(value, shapes, starts, loc, attn, impl="kernel")
        second = ms_deform_attn(value, shapes, starts, loc, attn, impl="kernel")
        ok = ok and torch.equal(first.view(torch.int16 if dt != torch.float32 else torch.int32),
                                second.view(torch.int16 if dt != torch.float32 else torch.int32))
    return ok


def check_auto_dispatch(device: str) -> bool:
    """impl="auto" picks the registered kernel for CUDA tensors (the bytes equal impl="kernel")."""
    if device == "cpu":
        return True  # "auto" means grid_sample on CPU by design
    case = Case("auto", [(6, 6), (3, 3)], q=16)
    value, shapes, starts, loc, attn = make_inputs(case, device)
    return torch.equal(ms_deform_attn(value, shapes, starts, loc, attn, impl="auto"),
                       ms_deform_attn(value, shapes, starts, loc, attn, impl="kernel"))


# ---- timing -------------------------------------------------------------------------------------------------------


WARMUP = 3  # untimed calls before each timing (core/timing.py times them)


def peak_bandwidth(device: str) -> tuple[float, str]:
    """(bytes/s, how it was found) for the current GPU."""
    if device != "cuda":
        return float("nan"), "n/a on CPU"
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8, f"memory clock {clock_khz / 1e6:.2f} GHz x {bus_bits}-bit bus x 2"
    for key, bw in PEAK_BANDWIDTH:
        if key.lower() in props.name.lower():
            return bw, f"datasheet value for {key}"
    return float("nan"), f"unknown for {props.name}"


@dataclass
class Timing:
    name: str
    dtype: torch.dtype
    backward: bool
    ms: dict[str, float]
    bytes_moved: int

    def speedup(self, impl: str) -> float:
        return self.ms[impl] / self.ms["kernel"]


def compulsory_bytes(value, loc, attn, backward: bool) -> int:
    """Value, locations, weights read and the output written once (backward: twice that, plus the gradients)."""
    b, _, h, dh = value.shape
    q = loc.shape[1]
    out = b * q * h * dh * value.element_size()
    fwd = value.numel() * value.element_size() + loc.numel() * 4 + attn.numel() * 4 + out
    return fwd if not backward else 2 * fwd + value.numel() * 4 + loc.numel() * 4 + attn.numel() * 4


def timing_cases(quick: bool, device: str) -> list[Case]:
    if device == "cpu":
        return [Case("tiny fp32", [(4, 4)] * 2, b=1, q=8, h=2, dh=8)]
    cases = [Case(f"MMFuser B=8 {DTYPE_NAMES[dt]}", MMFUSER_LEVELS, b=8, q=576, h=16, dh=64, dtype=dt)
             for dt in (torch.float32, torch.float16, torch.bfloat16)]
    if not quick:
        cases.append(Case("MMFuser B=32 bf16", MMFUSER_LEVELS, b=32, q=576, h=16, dh=64, dtype=torch.bfloat16))
    s = sum(hh * ww for hh, ww in DETR_LEVELS)
    cases += [Case(f"DETR encoder Q=S={s} {DTYPE_NAMES[dt]}", DETR_LEVELS, b=2, q=s, h=8, dh=32, dtype=dt)
              for dt in (torch.float32, torch.float16)]
    cases.append(Case("DETR decoder Q=300 fp32", DETR_LEVELS, b=2, q=300, h=8, dh=32))
    return cases


def _time_impl(impl: str, inputs, backward: bool, device: str, repeats: int) -> float:
    """Median ms of ms_deform_attn(impl=...) forward (no grad) or forward+backward."""
    value, shapes, starts, loc, attn = inputs
    if backward:
        v, l, a = (t.detach().clone().requires_grad_(True) for t in (value, loc, attn))
        return 1e3 * median_time(lambda: ms_deform_attn(v, shapes, starts, l, a, impl=impl).sum().backward(), repeats,
                                 device=device, warmup=WARMUP)

    def forward() -> None:
        with torch.no_grad():
            ms_deform_attn(value, shapes, starts, loc, attn, impl=impl)

    return 1e3 * median_time(forward, repeats, device=device, warmup=WARMUP)


def _time_launcher(case: Case, inputs, device: str, repeats: int) -> float:
    """Median ms of msda_forward alone: no dispatcher checks, output preallocated."""
    value, shapes, starts, loc, attn = inputs
    lib = kernel.bound_library(device)
    out = torch.empty(case.b, case.q, case.h * case.dh, dtype=case.dtype, device=device)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    return 1e3 * median_time(lambda: lib.forward(value, shapes, starts, loc, attn, out, stream), repeats, device=device, warmup=WARMUP)


def run_timings(quick: bool, device: str, repeats: int) -> list[Timing]:
    results = []
    for case in timing_cases(quick, device):
        inputs = make_inputs(case, device)
        value, _, _, loc, attn = inputs
        for backward in (False, True):
            ms = {impl: _time_impl(impl, inputs, backward, device, repeats) for impl in ("kernel", "grid_sample", "gather")}
            if not backward:
                ms["raw"] = _time_launcher(case, inputs, device, repeats)
            results.append(Timing(case.name, case.dtype, backward, ms, compulsory_bytes(value, loc, attn, backward)))
    return results


# ---- report -------------------------------------------------------------------------------------------------------


def machine(device: str) -> str:
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU (CPU build of the kernel math)"
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU torch"
    return f"{gpu}, {platform.processor() or platform.machine()}, torch {torch.__version__} ({cuda})"


def render(outcomes: list[Outcome], determinism: bool, auto_ok: bool, timings: list[Timing], device: str) -> str:
    peak, peak_how = peak_bandwidth(device)
    cmd = shlex.join(["python", "-m", "layerfuse.plugins_trt.gpu_check", *sys.argv[1:]])
    lines = [
        SECTION,
        "",
        f"Machine: {machine(device)}. Command: `{cmd}`. Date: {datetime.date.today().isoformat()}.",
        "",
        (
            f"**Correctness**: {sum(o.passed for o in outcomes)}/{len(outcomes)} cases pass against grid_sample in "
            "float64 (normalised error max|out - ref| / max(max|ref|, 1); bounds fp32 "
            f"{FORWARD_TOL[torch.float32]:g}, fp16 {FORWARD_TOL[torch.float16]:g}, bf16 {FORWARD_TOL[torch.bfloat16]:g} "
            f"forward). Forward bitwise deterministic: {'yes' if determinism else 'NO'}. "
            f"`impl=\"auto\"` uses the kernel on CUDA: {'yes' if auto_ok else 'NO'}."
        ),
        "",
        "| case | forward err | grad value | grad locations | grad weights | pass |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        be = o.backward_err
        cells = [f"{be[k]:.1e}" if k in be else "-" for k in ("value", "locations", "weights")]
        lines.append(f"| {o.case.name} | {o.forward_err:.1e} | {' | '.join(cells)} | {'yes' if o.passed else '**NO**'} |")
    lines += [
        "",
        (
            f"**Timing** (median of CUDA-event timings; peak bandwidth {peak / 1e12:.2f} TB/s, {peak_how}). \"kernel\", "
            "grid_sample and gather: `ms_deform_attn(impl=...)` with its input checks (speed-ups compare these); "
            "\"launcher\": msda_forward alone. Bandwidth = compulsory bytes (value, locations, weights, output once; "
            "for fwd+bwd also the gradients) / launcher time (fwd) or kernel time (fwd+bwd)."
        ),
        "",
        "| shape | pass | kernel ms | launcher ms | grid_sample ms | gather ms | vs grid_sample | vs gather | GB/s | % of peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in timings:
        kernel_ms = t.ms.get("raw", t.ms["kernel"])
        gbs = t.bytes_moved / (kernel_ms * 1e-3) / 1e9
        frac = f"{100 * gbs * 1e9 / peak:.0f}%" if not math.isnan(peak) else "-"
        raw = f"{t.ms['raw']:.3f}" if "raw" in t.ms else "-"
        lines.append(
            f"| {t.name} | {'fwd+bwd' if t.backward else 'fwd'} | {t.ms['kernel']:.3f} | {raw} | "
            f"{t.ms['grid_sample']:.3f} | {t.ms['gather']:.3f} | {t.speedup('grid_sample'):.1f}x | "
            f"{t.speedup('gather'):.1f}x | {gbs:.0f} | {frac} |"
        )
    return "\n".join(lines) + "\n"


def summary(outcomes: list[Outcome], determinism: bool, auto_ok: bool, timings: list[Timing], device: str) -> dict:
    """The report's numbers as JSON-ready values (--json)."""
    peak, peak_how = peak_bandwidth(device)
    rows = []
    for t in timings:
        seconds = t.ms.get("raw", t.ms["kernel"]) * 1e-3
        gbs = t.bytes_moved / seconds / 1e9
        rows.append({"name": t.name, "dtype": DTYPE_NAMES[t.dtype], "backward": t.backward, "kernel_ms": t.ms["kernel"],
                     "launcher_ms": t.ms.get("raw"), "grid_sample_ms": t.ms["grid_sample"], "gather_ms": t.ms["gather"],
                     "vs_grid_sample": t.speedup("grid_sample"), "vs_gather": t.speedup("gather"), "gb_per_s": gbs,
                     "fraction_of_peak": None if math.isnan(peak) else gbs * 1e9 / peak})
    return {
        "machine": machine(device), "cases": len(outcomes), "passed": sum(o.passed for o in outcomes),
        "failed": [o.case.name for o in outcomes if not o.passed], "determinism": determinism, "auto": auto_ok,
        "peak": None if math.isnan(peak) else peak, "peak_how": peak_how,
        "outcomes": [{"name": o.case.name, "forward_err": o.forward_err, "backward_err": o.backward_err,
                      "passed": o.passed, "note": o.note} for o in outcomes],
        "timings": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the report section into this markdown file (BENCHMARKS.md)")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON to this file")
    parser.add_argument("--quick", action="store_true", help="a smaller matrix and fewer timing shapes")
    parser.add_argument("--no-large", action="store_true", help="skip the > 2^31-element case (needs ~5 GB)")
    parser.add_argument("--archs", default=None, help="CUDA architectures to build for (default LAYERFUSE_CUDA_ARCHS or 80;90)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: run this script on the CPU build of the kernel math (tiny shapes; tests the script)")
    args = parser.parse_args(argv)

    archs = args.archs
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (torch.cuda.is_available() is False, torch "
                  f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): nothing checked", file=sys.stderr)
            return 2
        if archs is None and not os.environ.get("LAYERFUSE_CUDA_ARCHS"):
            major, minor = torch.cuda.get_device_capability(0)
            archs = f"{major}{minor}"  # build for this GPU only: faster
    try:
        kernel.register(host=args.device == "cpu", archs=archs)
    except kernel.MSDAKernelError as err:
        print(f"gpu_check: cannot build or load the kernel: {err}", file=sys.stderr)
        return 2
    print(f"gpu_check: {machine(args.device)}", file=sys.stderr)

    outcomes = []
    for case in correctness_cases(args.quick, not args.no_large and args.device == "cuda", args.device):
        try:
            outcome = check_case(case, args.device)
        except torch.OutOfMemoryError:
            outcome = Outcome(case, float("nan"), passed=True, note="skipped: out of memory")
            torch.cuda.empty_cache()
        outcomes.append(outcome)
        status = outcome.note or ("ok" if outcome.passed else "MISMATCH")
        print(f"  {case.name:48s} fwd {outcome.forward_err:.1e} "
              f"bwd {max(outcome.backward_err.values()) if outcome.backward_err else float('nan'):.1e}  {status}",
              file=sys.stderr)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    determinism = check_determinism(args.device)
    auto_ok = check_auto_dispatch(args.device)
    print(f"  forward bitwise deterministic: {determinism}; impl='auto' uses the kernel: {auto_ok}", file=sys.stderr)

    timings = run_timings(args.quick, args.device, args.repeats if args.device == "cuda" else 3)
    section = render(outcomes, determinism, auto_ok, timings, args.device)
    print(section)
    if args.out:
        write_section(args.out, SECTION, section)
    if args.json:
        args.json.write_text(json.dumps(summary(outcomes, determinism, auto_ok, timings, args.device), indent=1))
    failed = [o.case.name for o in outcomes if not o.passed]
    if failed or not determinism or not auto_ok:
        print(f"gpu_check: FAILED: {failed or ''} {'' if determinism else 'forward not deterministic'} "
              f"{'' if auto_ok else 'auto dispatch'}", file=sys.stderr)
        return 1
    print("gpu_check: all checks passed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
