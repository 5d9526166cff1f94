"""ONNX export benchmark: onnxruntime CPU latency of the exported front end against PyTorch eager CPU.

Per fuser (single, concat, mmfuser, igva) at the embedded tiny default's shapes (24 blocks, D=64, 8x8 patches +
CLS, instruction embedding 384-d, LLM width 128; each fuser's default options), and concat, igva and MMFuser at a
ViT-L/14-336 shape (D=1024, 24x24 patches + CLS, LLM width 4096). Batch 1 and 8, for each `--threads` count
(torch and onnxruntime both get that many intra-op threads). The front end is exported with
`layerfuse.export.onnx.export_onnx` (`--msda gather`, the default) and run by `layerfuse.export.onnx.ort_session`
(onnxruntime CPU, all graph optimisations, non-spinning intra-op threads); eager is the fuser in eval mode under
`torch.inference_mode`. MMFuser's eager `impl="auto"` measures grid_sample against the sparse gather once per
process and dtype: the bench forgets that choice before each row (each row's shape and thread count pick their
own) and prints the pick per row. Median of N runs after a warm-up, eager and onnxruntime interleaved so drift of
a shared machine hits both alike.

    python bench/export.py --out BENCHMARKS.md [--quick] [--repeats N] [--threads 1,2] [--only concat,igva]
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
import torch

from layerfuse.export.onnx import FrontEnd, export_onnx, ort_session
from layerfuse.fusion import LLMSpec, VisionSpec, build_fuser
from layerfuse.fusion.msda import MSDeformAttn, auto_choices, reset_auto
from layerfuse.core.benchmarks import bench_parser, command, machine, write_section
from layerfuse.core.timing import time_once

SECTION = "## ONNX export (bench/export.py)"
TINY = VisionSpec(num_layers=24, hidden_size=64, grid=(8, 8), has_cls=True, text_dim=384)
VIT_L = VisionSpec(num_layers=24, hidden_size=1024, grid=(24, 24), has_cls=True, text_dim=384)


@dataclass(frozen=True)
class Case:
    fuser: str
    shape: str  # label for the table
    vision: VisionSpec
    llm_width: int
    options: tuple[tuple[str, object], ...] = ()


CASES = [
    Case("single", "tiny", TINY, 128),
    Case("concat", "tiny", TINY, 128, (("layers", "3-18-23"),)),
    Case("mmfuser", "tiny", TINY, 128),
    Case("igva", "tiny", TINY, 128),
    Case("concat", "ViT-L/14-336", VIT_L, 4096, (("layers", "3-18-23"),)),
    Case("igva", "ViT-L/14-336", VIT_L, 4096),
    Case("mmfuser", "ViT-L/14-336", VIT_L, 4096),
]
QUICK_CASES = [Case("single", "tiny", TINY, 128), Case("mmfuser", "tiny", TINY, 128, (("heads", 4),))]


@dataclass
class Row:
    case: Case
    batch: int
    eager: list[float]
    onnx: list[float]
    export_s: float
    threads: int
    eager_msda: str  # what MMFuser's impl="auto" ran eagerly ("-" without MSDeformAttn)
    grid: list[float] = field(default_factory=list)  # onnxruntime on the `--msda grid_sample` export (MSDeformAttn fusers)


def measure(case: Case, batches: list[int], repeats: int, workdir: Path, threads: int) -> list[Row]:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    reset_auto()  # eager MSDeformAttn: this case's shape and thread count pick grid_sample or gather
    fuser = build_fuser(case.fuser, case.vision, LLMSpec(case.llm_width), **dict(case.options)).eval()
    t = time.perf_counter()
    path = export_onnx(fuser, workdir / f"{case.fuser}-{case.vision.hidden_size}.onnx")
    export_s = time.perf_counter() - t
    session = ort_session(path, threads)
    has_msda = any(isinstance(m, MSDeformAttn) for m in fuser.modules())
    grid = ort_session(export_onnx(fuser, workdir / f"{case.fuser}-{case.vision.hidden_size}-grid.onnx", msda="grid_sample"), threads) if has_msda else None
    front = FrontEnd(fuser).eval()
    rows = []
    for batch in batches:
        reset_auto()
        inputs = front.example_inputs(batch)
        feeds = {n: x.numpy() for n, x in zip(front.signature.inputs, inputs)}

        def eager() -> None:
            with torch.inference_mode():
                front(*inputs)

        def onnx() -> None:
            session.run(None, feeds)

        def onnx_grid() -> None:
            grid.run(None, feeds)

        eager(), onnx()  # warm-up (and impl="auto"'s measurement)
        picks = sorted({choice for choice, _ in auto_choices().values()})
        row = Row(case, batch, [], [], export_s, threads, "/".join(picks) or "-")
        timed = [(eager, row.eager), (onnx, row.onnx)] + ([(onnx_grid, row.grid)] if grid is not None else [])
        if grid is not None:
            onnx_grid()  # warm-up
        for _ in range(repeats):
            for fn, times in timed:
                times.append(time_once(fn))
        rows.append(row)
    return rows


def render(cmd: str, rows: list[Row]) -> str:
    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    rng = lambda v: f"{min(v) * 1e3:.2f}–{max(v) * 1e3:.2f}"  # noqa: E731
    lines = []
    for r in rows:
        v = r.case.vision
        e, o = statistics.median(r.eager), statistics.median(r.onnx)
        shape = f"{r.case.shape}: D={v.hidden_size}, {v.grid[0]}x{v.grid[1]}+CLS, d={r.case.llm_width}"
        g = statistics.median(r.grid) if r.grid else None
        grid = f"{ms(g)} ({rng(r.grid)}) | **{g / e:.2f}**" if g is not None else "- | -"
        lines.append(f"| {r.case.fuser} | {shape} | {r.batch} | {r.threads} | {ms(e)} ({rng(r.eager)}) | {r.eager_msda} "
                     f"| {ms(o)} ({rng(r.onnx)}) | **{o / e:.2f}** | {grid} | {len(r.eager)} | {r.export_s:.1f} s |")
    return "\n".join([
        SECTION, "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine()}; onnxruntime {ort.__version__} (CPU EP, `ort_session`: ORT_ENABLE_ALL, sequential, "
        f"intra-op threads = torch's, no spinning); load average at the end {os.getloadavg()[0]:.1f}  ",
        "Front end: fuser + projector from `layers` [B, k, T, D] (random weights, each fuser's default options), "
        "fp32, exported with `--msda gather`; median of the runs after a warm-up (range in brackets)", "",
        "| Fuser | Shape | Batch | Threads | PyTorch eager | Eager MSDeformAttn | onnxruntime | onnxruntime / eager time "
        "| onnxruntime, `--msda grid_sample` | its / eager time | Runs | Export time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *lines, "",
        "Ratios below 1 mean onnxruntime is faster than PyTorch eager on the same number of CPU threads. MMFuser's "
        "onnxruntime graph samples with one Gather per MSDeformAttn call (the ONNX-portable path); eager runs what "
        "`impl=\"auto\"` measured faster for that row (column Eager MSDeformAttn: grid_sample, or the sparse CSR "
        "`gather`). The `--msda grid_sample` column is the same front end exported with one standard GridSample per "
        "level instead of the Gather body (MSDeformAttn fusers only).", "",
        "Threads: on a machine shared with other jobs, torch's OpenMP threads wait at every parallel region for a "
        "descheduled partner, so eager rows with more than 1 thread swing by 10-100x with the load (load average in "
        "the header); onnxruntime's non-spinning pool does not. The 1-thread rows are the comparison that holds on a "
        "loaded machine.", "",
    ])


def main() -> None:
    ap = bench_parser(__doc__, quick="tiny single + mmfuser, batch 1 and 2, one run (numbers are not meaningful)")
    ap.add_argument("--repeats", type=int, default=20, help="runs per row (a quarter, at least 3, for the ViT-L shape)")
    ap.add_argument("--threads", default=str(torch.get_num_threads()),
                    help="comma-separated intra-op thread counts, each for torch and onnxruntime alike (default torch's)")
    ap.add_argument("--only", default="", help="comma-separated fusers to run (default all)")
    args = ap.parse_args()
    cases, batches = (QUICK_CASES, [1, 2]) if args.quick else (CASES, [1, 8])
    if args.only:
        cases = [c for c in cases if c.fuser in args.only.split(",")]
    repeats = 1 if args.quick else args.repeats
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            big = case.vision.hidden_size >= 1024
            for threads in (int(t) for t in args.threads.split(",")):
                rows += measure(case, batches, max(3, repeats // 4) if big and not args.quick else repeats, Path(tmp), threads)
    section = render(command(), rows)
    write_section(args.out, SECTION, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
