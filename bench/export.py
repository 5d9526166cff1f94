"""ONNX export benchmark: onnxruntime CPU latency of the exported front end against PyTorch eager CPU.

Per fuser (single, concat, mmfuser, igva) at the embedded tiny default's shapes (24 blocks, D=64, 8x8 patches +
CLS, instruction embedding 384-d, LLM width 128; each fuser's default options), and MMFuser at a ViT-L/14-336
shape (D=1024, 24x24 patches + CLS, LLM width 4096). Batch 1 and 8. The front end is exported with
`layerfuse.export.onnx.export_onnx` (`--msda gather`, the default) and run by an onnxruntime CPU session with as
many intra-op threads as torch uses; eager is the fuser in eval mode under `torch.inference_mode` (MMFuser's
`impl="auto"` = grid_sample on CPU). Median of N runs after a warm-up, eager and onnxruntime interleaved so
drift of a shared machine hits both alike.

    python bench/export.py --out BENCHMARKS.md [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import torch

from layerfuse.export.onnx import FrontEnd, export_onnx
from layerfuse.fusion import LLMSpec, VisionSpec, build_fuser
from layerfuse.core.benchmarks import command, machine, write_section
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


def measure(case: Case, batches: list[int], repeats: int, workdir: Path) -> list[Row]:
    torch.manual_seed(0)
    fuser = build_fuser(case.fuser, case.vision, LLMSpec(case.llm_width), **dict(case.options)).eval()
    t = time.perf_counter()
    path = export_onnx(fuser, workdir / f"{case.fuser}-{case.vision.hidden_size}.onnx")
    export_s = time.perf_counter() - t
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    front = FrontEnd(fuser).eval()
    rows = []
    for batch in batches:
        inputs = front.example_inputs(batch)
        feeds = {n: x.numpy() for n, x in zip(front.signature.inputs, inputs)}

        def eager() -> None:
            with torch.inference_mode():
                front(*inputs)

        def onnx() -> None:
            session.run(None, feeds)

        eager(), onnx()  # warm-up
        row = Row(case, batch, [], [], export_s)
        for _ in range(repeats):
            for fn, times in ((eager, row.eager), (onnx, row.onnx)):
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
        lines.append(f"| {r.case.fuser} | {shape} | {r.batch} | {ms(e)} ({rng(r.eager)}) | {ms(o)} ({rng(r.onnx)}) "
                     f"| **{o / e:.2f}** | {len(r.eager)} | {r.export_s:.1f} s |")
    return "\n".join([
        SECTION, "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine()}; onnxruntime {ort.__version__} (CPU EP, {torch.get_num_threads()} intra-op threads)  ",
        "Front end: fuser + projector from `layers` [B, k, T, D] (random weights, each fuser's default options), "
        "fp32, exported with `--msda gather`; median of the runs after a warm-up (range in brackets)", "",
        "| Fuser | Shape | Batch | PyTorch eager | onnxruntime | onnxruntime / eager time | Runs | Export time |",
        "|---|---|---|---|---|---|---|---|",
        *lines, "",
        "Ratios below 1 mean onnxruntime is faster than PyTorch eager on the same CPU threads. MMFuser's onnxruntime "
        "graph samples with Gather ops (the ONNX-portable path); eager uses grid_sample.", "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="markdown file; only this benchmark's section is replaced")
    ap.add_argument("--quick", action="store_true", help="tiny single + mmfuser, batch 1 and 2, one run (numbers are not meaningful)")
    ap.add_argument("--repeats", type=int, default=20, help="runs per row (a quarter, at least 3, for the ViT-L shape)")
    args = ap.parse_args()
    cases, batches = (QUICK_CASES, [1, 2]) if args.quick else (CASES, [1, 8])
    repeats = 1 if args.quick else args.repeats
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            big = case.vision.hidden_size >= 1024
            rows += measure(case, batches, max(3, repeats // 4) if big and not args.quick else repeats, Path(tmp))
    section = render(command(), rows)
    write_section(args.out, SECTION, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
