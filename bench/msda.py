"""MSDeformAttn benchmark: `gather` against the `grid_sample` reference, and what impl="auto" picks.

Shape: MMFuser's cross-attention (B=8, Q=576, H=16, Dh=64, L=4 levels of 24x24, P=4), value in each of
--dtypes (locations and weights fp32), on the machine's default device (CPU here). Forward alone and
forward+backward (gradients for value, sampling locations and attention weights), median of several repeats
after a warm-up, all (implementation, pass) pairs of a dtype interleaved so drift hits them alike. Then one
impl="auto" call per dtype and pass, whose one-time measurement (on the same inputs) is reported.

    python bench/msda.py --out BENCHMARKS.md [--quick] [--device cuda] [--dtypes float32,bfloat16,float16]
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys

import torch

from layerfuse.fusion.msda import ms_deform_attn
from layerfuse.fusion.msda.function import auto_choices, reset_auto
from layerfuse.core.benchmarks import bench_parser, command, machine, write_section
from layerfuse.core.timing import time_once

SECTION = "## MSDeformAttn (`bench/msda.py`)"
IMPLS = ("grid_sample", "gather")
# the same command before the sparse autograd gather (gather = autograd through torch.gather of [B*H, Q*4*L*P, Dh])
PREVIOUS = (
    "Before (gather = autograd through one `torch.gather` of [B\\*H, Q\\*4\\*L\\*P, Dh] + bmm), fp32, same command: "
    "gather / grid_sample 1.86 forward, 3.91 forward + backward (2026-11-23); 1.92 and 2.08 (2026-12-01, load ~9 on the 2 cores)."
)


def make_inputs(b: int, q: int, h: int, dh: int, levels: int, side: int, points: int, device: str, seed: int = 0,
                dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[side, side]] * levels, device=device)
    starts = torch.arange(levels, device=device) * side * side
    value = torch.randn(b, levels * side * side, h, dh, generator=g).to(device, dtype)
    loc = torch.rand(b, q, h, levels, points, 2, generator=g).to(device)
    attn = torch.rand(b, q, h, levels, points, generator=g).softmax(-1).to(device)
    return value, shapes, starts, loc, attn


def time_impl(impl: str, inputs, backward: bool, device: str) -> float:
    """Seconds of one forward (or forward + backward) of `impl`."""
    value, shapes, starts, loc, attn = inputs
    if backward:
        value, loc, attn = (t.detach().requires_grad_(True) for t in (value, loc, attn))

    def call() -> None:
        out = ms_deform_attn(value, shapes, starts, loc, attn, impl=impl)
        if backward:
            out.sum().backward()

    return time_once(call, device)


def measure(inputs, repeats: int, device: str) -> dict[tuple[str, bool], list[float]]:
    runs: dict[tuple[str, bool], list[float]] = {(i, b): [] for i in IMPLS for b in (False, True)}
    for key in runs:  # warm-up
        time_impl(key[0], inputs, key[1], device)
    for _ in range(repeats):
        for impl, backward in runs:
            runs[(impl, backward)].append(time_impl(impl, inputs, backward, device))
    return runs


def auto_picks(inputs, device: str) -> dict[bool, tuple[str, dict[str, float]]]:
    """What impl="auto" chooses for these inputs, forward and forward + backward (fresh measurements)."""
    reset_auto()
    for backward in (False, True):
        time_impl("auto", inputs, backward, device)
    value = inputs[0]
    return {key[2]: pick for key, pick in auto_choices().items() if key[:2] == (torch.device(device).type, value.dtype)}


def render(cmd: str, shape: str, device: str, results: dict, repeats: int) -> str:
    """results: dtype name -> (runs, auto picks)."""
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    rows = []
    for dtype, (runs, picks) in results.items():
        med = {k: statistics.median(v) for k, v in runs.items()}
        rng = lambda k: f"{min(runs[k]) * 1e3:.1f}–{max(runs[k]) * 1e3:.1f}"  # noqa: E731
        for backward, label in ((False, "forward"), (True, "forward + backward")):
            g, s = med[("gather", backward)], med[("grid_sample", backward)]
            choice, times = picks.get(backward, ("?", {}))
            auto = f"`{choice}` ({', '.join(f'{k} {t * 1e3:.1f} ms' for k, t in times.items())})"
            rows.append(f"| {dtype} | {label} | {ms(g)} ({rng(('gather', backward))}) | {ms(s)} ({rng(('grid_sample', backward))}) "
                        f"| **{g / s:.2f}** | {auto} |")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return "\n".join([
        SECTION, "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine()}; device {device}; load average at the end {load} (the cores are shared)  ",
        f"Shape: {shape}, locations and weights fp32, median of {repeats} after a warm-up (range in brackets)", "",
        "| Value dtype | Pass | `gather` | `grid_sample` | gather / grid_sample time | `impl=\"auto\"` picks (its one-time measurement: best of 2 after a warm-up) |",
        "|---|---|---|---|---|---|",
        *rows, "",
        "`gather` is the ONNX-friendly path (plain Gather/Floor ops when traced or exported; eagerly a CSR sparse x dense "
        "product with a hand-written backward, docs/msda-op.md). Ratios above 1 mean `gather` is slower. "
        "`impl=\"auto\"` measures once per (device type, dtype, with / without backward) and process.", "",
        PREVIOUS, "",
    ])


def main() -> None:
    ap = bench_parser(__doc__, quick="a small shape for a smoke run (numbers are not meaningful)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="value dtypes, comma-separated")
    args = ap.parse_args()
    dims = dict(b=2, q=64, h=4, dh=16, levels=2, side=8, points=2) if args.quick else dict(b=8, q=576, h=16, dh=64, levels=4, side=24, points=4)
    repeats = 1 if args.quick else args.repeats
    shape = "B={b}, Q={q}, H={h}, Dh={dh}, L={levels} levels of {side}x{side}, P={points}".format(**dims)
    results = {}
    for name in args.dtypes.split(","):
        inputs = make_inputs(**dims, device=args.device, dtype=getattr(torch, name))
        results[name] = (measure(inputs, repeats, args.device), auto_picks(inputs, args.device))
    section = render(command(), shape, args.device, results, repeats)
    write_section(args.out, SECTION, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
