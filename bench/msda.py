"""MSDeformAttn benchmark: the `gather` implementation against the `grid_sample` reference.

Shape: MMFuser's cross-attention (B=8, Q=576, H=16, Dh=64, L=4 levels of 24x24, P=4), fp32, on the machine's
default device (CPU here). Forward alone and forward+backward (gradients for value, sampling locations and
attention weights), median of several repeats after a warm-up, both implementations interleaved so drift hits
both alike.

    python bench/msda.py --out BENCHMARKS.md [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch

from layerfuse.fusion.msda import ms_deform_attn
from layerfuse.core.benchmarks import command, machine, write_section
from layerfuse.core.timing import time_once

SECTION = "## MSDeformAttn (`bench/msda.py`)"
IMPLS = ("grid_sample", "gather")


def make_inputs(b: int, q: int, h: int, dh: int, levels: int, side: int, points: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[side, side]] * levels, device=device)
    starts = torch.arange(levels, device=device) * side * side
    value = torch.randn(b, levels * side * side, h, dh, generator=g).to(device)
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


def render(cmd: str, shape: str, device: str, runs: dict, repeats: int) -> str:
    med = {k: statistics.median(v) for k, v in runs.items()}
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    rng = lambda k: f"{min(runs[k]) * 1e3:.1f}–{max(runs[k]) * 1e3:.1f}"  # noqa: E731
    rows = []
    for backward, label in ((False, "forward"), (True, "forward + backward")):
        g, s = med[("gather", backward)], med[("grid_sample", backward)]
        rows.append(f"| {label} | {ms(g)} ({rng(('gather', backward))}) | {ms(s)} ({rng(('grid_sample', backward))}) | **{g / s:.2f}** | {s / g:.2f} |")
    return "\n".join([
        SECTION, "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine()}; device {device}  ",
        f"Shape: {shape}, fp32, median of {repeats} after a warm-up (range in brackets)", "",
        "| Pass | `gather` | `grid_sample` | gather / grid_sample time | grid_sample / gather time |",
        "|---|---|---|---|---|",
        *rows, "",
        "`gather` is the ONNX-friendly path (plain Gather/Floor ops, no GridSample); `grid_sample` stays the "
        "`impl=\"auto\"` choice in PyTorch when it is the faster one here. Ratios above 1 mean `gather` is slower.", "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="markdown file; only this benchmark's section is replaced")
    ap.add_argument("--quick", action="store_true", help="a small shape for a smoke run (numbers are not meaningful)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dims = dict(b=2, q=64, h=4, dh=16, levels=2, side=8, points=2) if args.quick else dict(b=8, q=576, h=16, dh=64, levels=4, side=24, points=4)
    repeats = 1 if args.quick else args.repeats
    shape = "B={b}, Q={q}, H={h}, Dh={dh}, L={levels} levels of {side}x{side}, P={points}".format(**dims)
    runs = measure(make_inputs(**dims, device=args.device), repeats, args.device)
    section = render(command(), shape, args.device, runs, repeats)
    write_section(args.out, SECTION, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
