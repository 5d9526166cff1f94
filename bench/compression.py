"""Compression by storage dtype: on-disk / raw bytes of encoder hidden states under the cache's compressor.

The ratios `layerfuse cache plan` uses (pipeline/cache/plan.py, STORAGE_COSTS) come from here. For each tower, the
hidden states [B, L+1, T, D] of B built-in images (fp32 forward) are cast to each dtype and written to an in-memory
zarr array with the cache's own codec (`writer.compressor` with ExtractConfig's codec and level) and one chunk per
(sample, layer), [1, 1, T, D] (the layout of real encoders; the tiny tower's real chunks hold 32 samples). The ratio
is stored chunk bytes / raw bytes.

The quantised dtypes are encoded as extraction encodes them (pipeline/cache/encoding.py `FeatureEncoding`, int8's
outlier channels calibrated on the same images), each part in its own array chunked like the cache's ([1, 1, T, ...]):
    int8            `token+outliers`  (codes int8 [B, K, T, D], scale float16 [B, K, T], outliers float16 [B, K, T, n])
    float8_e4m3fn   `fp8+token`       (codes as float8 bit patterns uint8 [B, K, T, D], scale float16 [B, K, T])
Their ratio counts every part: (stored parts) / (raw parts).

Towers: the shipped pretrained default tower (trained weights, toy scale) and random-weight CLIPs of the tiny, ViT-B/16
and ViT-L/14-336 shapes. No real pretrained CLIP/SigLIP is measured (the benchmark machine is offline).

    python bench/compression.py --out BENCHMARKS.md [--quick]
"""

from __future__ import annotations

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

from layerfuse.core.benchmarks import bench_parser, CLIP_SHAPES, command, machine, random_clip, write_section  # noqa: E402
from layerfuse.pipeline.cache.encoding import FeatureEncoding, from_torch, running_absmax  # noqa: E402
from layerfuse.core.dtypes import StorageDtype  # noqa: E402
from layerfuse.pipeline.cache.extract import ExtractConfig  # noqa: E402
from layerfuse.pipeline.cache.writer import compressor, compressor_name  # noqa: E402
from layerfuse.pipeline.data.synthetic import render_record, synthetic_plan  # noqa: E402
from layerfuse.pipeline.models.default_vision import SHIPPED_TOWER, DefaultVisionConfig, build_default_vision  # noqa: E402
from layerfuse.pipeline.models.encoder import load_vision_encoder  # noqa: E402

SECTION = "## Compression by storage dtype (`bench/compression.py`)"
DTYPES = ("float16", "bfloat16", "float32", "int8", "float8_e4m3fn")
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


@dataclass
class Tower:
    label: str
    folder: str
    images: int


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


def ratios(hs: torch.Tensor) -> dict[str, float]:
    """Stored / raw bytes for each of DTYPES (every stored part of the quantised ones)."""
    out = {}
    for name in DTYPES:
        if StorageDtype(name).quantized:
            parts = FeatureEncoding.calibrate(name, running_absmax(None, hs), hs.shape[1]).encode(hs)
            out[name] = sum(stored(a, (1, 1, *a.shape[2:])) for a in parts.values()) / sum(a.nbytes for a in parts.values())
        else:
            a = from_torch(hs, name)
            out[name] = stored(a, (1, 1, *a.shape[2:])) / a.nbytes
    return out


def render(cmd: str, rows: list[tuple[Tower, tuple[int, ...], dict[str, float]]]) -> str:
    head = "| Tower (images) | shape [L+1, T, D] | " + " | ".join(DTYPES) + " |"
    lines = [
        SECTION, "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine()}  ",
        f"Settings: on-disk / raw bytes of the hidden states of built-in images, "
        f"{compressor_name(ExtractConfig.codec, ExtractConfig.clevel)} (the cache's compressor), one chunk per (sample, layer); int8 and float8_e4m3fn "
        "encoded as extraction encodes them (pipeline/cache/encoding.py: int8 `token+outliers` with its outlier channels "
        "calibrated on the same images, float8 `fp8+token`; codes, scales and outliers counted). Used by `layerfuse cache plan` "
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
        "bfloat16 compresses best of the 2-byte types: its high byte (sign and 7 exponent bits) takes few values, while float16 "
        "spreads the exponent over both bytes. int8 codes compress least (a per-token scale spreads every token over the "
        "whole code range), which is why int8 stores about half of float16's bytes, not less.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = bench_parser(__doc__, quick="the tiny towers only, few images (a smoke test)", out_required=False)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        random_tiny = str(build_default_vision(root / "tiny", DefaultVisionConfig(pretrain_steps=0)))
        towers = [Tower("default tiny CLIP, shipped pretrained", str(SHIPPED_TOWER), 16 if args.quick else 64),
                  Tower("tiny CLIP, random", random_tiny, 16 if args.quick else 64)]
        if not args.quick:
            towers += [
                Tower("ViT-B/16-shaped CLIP, random", str(random_clip(root / "vitb", CLIP_SHAPES["vit-b16"])), 8),
                Tower("ViT-L/14-336-shaped CLIP, random", str(random_clip(root / "vitl", CLIP_SHAPES["vit-l14-336"])), 4),
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
