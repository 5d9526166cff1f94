"""Compression by storage dtype: on-disk / raw bytes of encoder hidden states under the cache's compressor.

The ratios `layerfuse cache plan` uses (pipeline/cache/plan.py, STORAGE_COSTS) come from here. For each tower, the
hidden states [B, L+1, T, D] of B built-in images (fp32 forward) are cast to each dtype and written to an in-memory
zarr array with the cache's own codec (`writer.compressor` with ExtractConfig's codec and level) and one chunk per
(sample, layer), [1, 1, T, D] (the layout of real encoders; the tiny tower's real chunks hold 32 samples). The ratio
is stored chunk bytes / raw bytes.

Planned storage dtypes (not written by extraction yet), quantised by pipeline/cache/quantize.py's per-token schemes
(one float16 scale per (sample, layer, token): the token's absmax over the D channels / 127 or / 448), the scales in
their own array chunked [1, L+1, T]:
    int8            scheme `token`      (q int8 [B, K, T, D], scale float16 [B, K, T])
    float8_e4m3fn   scheme `fp8+token`  (q float8_e4m3fn, stored as its uint8 bit patterns, scale float16 [B, K, T])
Their ratio counts the values and the scales: (stored values + stored scales) / (raw values + raw scales).

Towers: the shipped pretrained default tower (trained weights, toy scale) and random-weight CLIPs of the tiny, ViT-B/16
and ViT-L/14-336 shapes. No real pretrained CLIP/SigLIP is measured (the benchmark machine is offline).

    python bench/compression.py --out BENCHMARKS.md [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import zarr  # noqa: E402
from zarr.storage import MemoryStore  # noqa: E402

from layerfuse.core.benchmarks import command, machine, write_section  # noqa: E402
from layerfuse.pipeline.cache.quantize import Float8Token, TokenInt8  # noqa: E402
from layerfuse.pipeline.cache.encoding import from_torch  # noqa: E402
from layerfuse.pipeline.cache.extract import ExtractConfig  # noqa: E402
from layerfuse.pipeline.cache.writer import compressor, compressor_name  # noqa: E402
from layerfuse.pipeline.data.synthetic import render_record, synthetic_plan  # noqa: E402
from layerfuse.pipeline.models.default_vision import SHIPPED_TOWER, DefaultVisionConfig, build_default_vision  # noqa: E402
from layerfuse.pipeline.models.encoder import load_vision_encoder  # noqa: E402

SECTION = "## Compression by storage dtype (`bench/compression.py`)"
DTYPES = ("float16", "bfloat16", "float32", "int8", "float8_e4m3fn")
PLANNED = {"int8": TokenInt8, "float8_e4m3fn": Float8Token}  # planned storage dtype -> its quantize.py scheme
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


@dataclass
class Tower:
    label: str
    folder: str
    images: int


def build_clip(out: Path, **kw: int) -> str:
    """A random-weight CLIP vision tower of the given shape (seed 0) with a CLIP image processor of its size."""
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw)).save_pretrained(out)
    size = kw["image_size"]
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    return str(out)


def hidden_states(folder: str, images: int) -> torch.Tensor:
    """[B, L+1, T, D] float32 hidden states of the first `images` built-in samples (seed 3)."""
    enc = load_vision_encoder(folder)
    pre = enc.preprocessor(False)
    records = [r for r in synthetic_plan(images, 3).records if r.has_image][:images]
    pixels = torch.from_numpy(np.stack([pre(render_record(r)) for r in records]))
    return torch.cat([enc(pixels[i:i + 4]) for i in range(0, len(pixels), 4)]).float()


def stored(a: np.ndarray, chunks: tuple[int, ...]) -> int:
    """Bytes of the chunks of `a` written with the cache's compressor (metadata excluded)."""
    store = MemoryStore()
    z = zarr.create_array(store, shape=a.shape, chunks=chunks, dtype=a.dtype, compressors=compressor(ExtractConfig.codec, ExtractConfig.clevel), fill_value=0)
    z[...] = a
    return sum(len(v) for k, v in store._store_dict.items() if not k.endswith("zarr.json"))


def quantise(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """x [B, K, T, D] by the per-token scheme of `dtype`: (values [B, K, T, D] int8 / uint8 bits, scales [B, K, T] float16)."""
    parts = PLANNED[dtype]().quantize(x)
    q = parts["q"] if parts["q"].dtype == torch.int8 else parts["q"].view(torch.uint8)
    return q.numpy(), parts["scale"].numpy()


def ratios(hs: torch.Tensor) -> dict[str, float]:
    """Stored / raw bytes for each of DTYPES."""
    b, k, t, d = hs.shape
    out = {}
    for name in DTYPES:
        if name in PLANNED:
            q, s = quantise(hs, name)
            out[name] = (stored(q, (1, 1, t, d)) + stored(s, (1, k, t))) / (q.nbytes + s.nbytes)
        else:
            a = from_torch(hs, name)
            out[name] = stored(a, (1, 1, t, d)) / a.nbytes
    return out


def render(cmd: str, rows: list[tuple[Tower, tuple[int, ...], dict[str, float]]]) -> str:
    head = "| Tower (images) | shape [L+1, T, D] | " + " | ".join(DTYPES) + " |"
    lines = [
        SECTION, "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine()}  ",
        f"Settings: on-disk / raw bytes of the hidden states of built-in images, "
        f"{compressor_name(ExtractConfig.codec, ExtractConfig.clevel)} (the cache's compressor), one chunk per (sample, layer); int8 and float8_e4m3fn are *planned* storage dtypes, "
        "quantised by pipeline/cache/quantize.py's `token` and `fp8+token` schemes (a float16 absmax scale per token; "
        "values + scales counted). Used by `layerfuse cache plan` "
        "(pipeline/cache/plan.py, the largest ratio per dtype, rounded up).",
        "",
        head,
        "|" + "---|" * (len(DTYPES) + 2),
    ]
    for tower, shape, r in rows:
        lines.append(f"| {tower.label} ({tower.images}) | {list(shape)} | " + " | ".join(f"{r[n]:.3f}" for n in DTYPES) + " |")
    worst = {n: max(r[n] for _, _, r in rows) for n in DTYPES}
    lines += [
        "| **largest** | | " + " | ".join(f"**{worst[n]:.3f}**" for n in DTYPES) + " |",
        "",
        "Trained weights compress worse than random ones here (the pretrained tiny tower is the least compressible in every "
        "dtype), so expect a real pretrained CLIP or SigLIP near the top of each column, if not above it; none could be measured "
        "offline. "
        "bfloat16 compresses best of the 2-byte types: byte shuffle groups its high bytes (sign and 7 exponent bits), which "
        "repeat, while float16 spreads the exponent over both bytes.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update (prints only when omitted)")
    ap.add_argument("--quick", action="store_true", help="the tiny towers only, few images (a smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        random_tiny = str(build_default_vision(root / "tiny", DefaultVisionConfig(pretrain_steps=0)))
        towers = [Tower("default tiny CLIP, shipped pretrained", str(SHIPPED_TOWER), 16 if args.quick else 64),
                  Tower("tiny CLIP, random", random_tiny, 16 if args.quick else 64)]
        if not args.quick:
            towers += [
                Tower("ViT-B/16-shaped CLIP, random", build_clip(root / "vitb", hidden_size=768, intermediate_size=3072,
                                                                 num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16), 8),
                Tower("ViT-L/14-336-shaped CLIP, random", build_clip(root / "vitl", hidden_size=1024, intermediate_size=4096,
                                                                     num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14), 4),
            ]
        rows = []
        for tower in towers:
            hs = hidden_states(tower.folder, tower.images)
            rows.append((tower, tuple(hs.shape[1:]), ratios(hs)))
            print(tower.label, {k: round(v, 3) for k, v in rows[-1][2].items()}, flush=True)
    section = render(command(), rows)
    print(section)
    if args.out is not None:
        write_section(args.out, SECTION, section)


if __name__ == "__main__":
    sys.exit(main())
