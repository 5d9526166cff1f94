"""BENCHMARKS.md and what every benchmark shares: its header and sections, the machine and command lines
(timing is core/timing.py).

Used by the repo's bench/ scripts and by the installed `layerfuse.plugins_trt.gpu_check`, so both write the file
the same way: each script owns one `## ` section and replaces only that.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shlex
import sys
from pathlib import Path

import torch
import transformers

HEADER = "# layerfuse benchmarks\n\nAll numbers are ratios (and the figures behind them) from a single run per section.\n\n"


# Random-weight CLIP vision towers of real shapes, for throughput and storage measurements (weights do not change speed)
CLIP_SHAPES: dict[str, dict[str, int]] = {
    "vit-b16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                    patch_size=16),  # 86M parameters, 197 tokens
    "vit-l14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
                        patch_size=14),  # LLaVA-1.5's tower: 304M parameters, 577 tokens
}


def random_clip(out: Path, shape: dict[str, int], device: str = "cpu") -> Path:
    """A CLIP vision tower of `shape` with random weights (seed 0), built on `device`, and a CLIP image processor of its
    image size, saved in `out` (loaded back through the real loading code by the benchmarks)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**shape))
    model.save_pretrained(out)
    size = shape["image_size"]
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    return Path(out)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError, AttributeError):
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def cpu_seconds(*, own: bool = True, children: bool = True) -> float:
    """User + system CPU seconds so far of this process (`own`) and of its reaped children (`children`: e.g. the
    DataLoader workers), both by default."""
    who = [resource.RUSAGE_SELF] * own + [resource.RUSAGE_CHILDREN] * children
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, who))


SMOKE = "tiny sizes for a smoke run (numbers are not meaningful)"


def bench_parser(doc: str, *, quick: str = SMOKE, out_required: bool = True) -> argparse.ArgumentParser:
    """The arguments every bench script takes (add its own to the parser returned): --out, the markdown file whose
    section of this benchmark it replaces (optional with `out_required=False`: without it the script only prints),
    and --quick, a smoke run described by `quick`."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    if out_required:
        ap.add_argument("--out", type=Path, required=True, help="markdown file; only this benchmark's section is replaced")
    else:
        ap.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update (prints only when omitted)")
    ap.add_argument("--quick", action="store_true", help=quick)
    return ap


def command() -> str:
    """The command line that ran this script, with the interpreter path relative when it is inside the repo."""
    exe = os.path.relpath(sys.executable)
    return shlex.join([exe if not exe.startswith("..") else "python", *sys.argv])


def write_section(path: Path, title: str, section: str) -> None:
    """Replace the section starting with `title` (up to the next `## `) in `path`, or append it."""
    if path.exists():
        old = path.read_text()
        pat = re.compile(r"^" + re.escape(title) + r".*?(?=^## |\Z)", re.S | re.M)
        new = pat.sub(lambda _: section.rstrip("\n") + "\n\n", old, count=1) if pat.search(old) else old.rstrip("\n") + "\n\n" + section
    else:
        new = HEADER + section
    path.write_text(new.rstrip("\n") + "\n")
