"""Codec benchmark: stored bytes and single-core encode / decode speed of the cache's candidate compressors.

Chunks are shaped like the cache's `features` chunks, [c, T, D] = one layer of c samples with c = ceil(256 KiB / one
layer's bytes) (`ExtractConfig.chunk_kib`; 1 for real encoders, whose [T, D] layer is already ~1.2 MB for ViT-L/14-336
in fp16), on:

1. fp16 hidden states of the shipped pretrained default tower on built-in images ([32, 65, 64] chunks),
   all-MiniLM-L6-v2 on built-in text (bench/quantize.py's sequences, [3, 128, 384]) and a random-weight
   ViT-B/16-shaped CLIP on built-in images ([1, 197, 768]: its 302 KB layer is over 256 KiB, so c = 1 as for
   ViT-L/14-336, whose layer is 1.18 MB);
2. int8 `q` of the same features from the int8 scheme bench/quantize.py recommends (`INT8_VARIANT`), chunked by
   the same rule for 1-byte values (its per-token scales and fp16 outlier channels are small parts apart and not
   measured here).

Codecs (numcodecs, the implementations zarr's BloscCodec and ZstdCodec call): blosc zstd levels 1/3/5 with byte
shuffle (level 3 = the writer's default before this benchmark, `writer.compressor("blosc-zstd", 3)`), blosc zstd-3 with bitshuffle and without shuffle,
blosc lz4 (level 5) with byte and bit shuffle, zstd levels 1 and 3 without blosc, and no compression (a copy).
Blosc's typesize is the value size (2 for fp16, 1 for int8: byte shuffle is then a no-op). Single-threaded:
`numcodecs.blosc.use_threads = False` and `set_nthreads(1)` (zarr sets use_threads False too and runs one chunk per
thread), so MB/s (raw bytes / seconds) are per core. Every repeat times each codec's encode and decode of all chunks
of a data set, codecs interleaved within the repeat; medians over the repeats. Decoding is checked once against
the input.

    python bench/codec.py --out BENCHMARKS.md [--quick]
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
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numcodecs.blosc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from numcodecs import Blosc, Zstd  # noqa: E402
from numcodecs.abc import Codec  # noqa: E402

from layerfuse.core.benchmarks import bench_parser, command, machine, write_section  # noqa: E402
from layerfuse.pipeline.cache.quantize import calibrate  # noqa: E402
from layerfuse.pipeline.models.default_vision import SHIPPED_TOWER  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize as quantize_bench  # noqa: E402  (bench/quantize.py: the features and the schemes' variants)
from extract import build_vitb  # noqa: E402

SECTION = "## Codecs (`bench/codec.py`)"
CHUNK_BYTES = 256 << 10  # ExtractConfig.chunk_kib
INT8_VARIANT = "token+outliers k=2 n≤16"  # the int8 scheme bench/quantize.py recommends
DEFAULT = "zstd-1 (no blosc)"  # writer.compressor("zstd", 1), the writer's default since this benchmark chose it
VITL_BYTES_FP16 = 25 * 577 * 1024 * 2  # CLIP ViT-L/14-336, all 25 hidden states, per image
IMAGES_PER_S = 500
RULE = ("per codec, the mean stored / raw over the trained data sets of a kind (random weights compress differently) and the "
        "median encode and decode rates over all data sets of that kind; candidates save at least 5% (stored / raw <= 0.95); "
        "the default is the candidate that saves the most storage per core-second of encoding (encode MB/s x (1 - stored / raw)) "
        "or, among the candidates within 10% of that, the one that stores least; no candidate: no compression")
CodecFactory = Callable[[int], Codec | None]  # typesize -> codec (None: no compression)
CODECS: dict[str, CodecFactory] = {
    "none (copy)": lambda ts: None,
    "blosc zstd-1 shuffle": lambda ts: Blosc("zstd", 1, Blosc.SHUFFLE, typesize=ts),
    "blosc zstd-3 shuffle": lambda ts: Blosc("zstd", 3, Blosc.SHUFFLE, typesize=ts),
    "blosc zstd-5 shuffle": lambda ts: Blosc("zstd", 5, Blosc.SHUFFLE, typesize=ts),
    "blosc zstd-1 bitshuffle": lambda ts: Blosc("zstd", 1, Blosc.BITSHUFFLE, typesize=ts),
    "blosc zstd-3 bitshuffle": lambda ts: Blosc("zstd", 3, Blosc.BITSHUFFLE, typesize=ts),
    "blosc zstd-3 noshuffle": lambda ts: Blosc("zstd", 3, Blosc.NOSHUFFLE, typesize=ts),
    "blosc lz4 shuffle": lambda ts: Blosc("lz4", 5, Blosc.SHUFFLE, typesize=ts),
    "blosc lz4 bitshuffle": lambda ts: Blosc("lz4", 5, Blosc.BITSHUFFLE, typesize=ts),
    "zstd-1 (no blosc)": lambda ts: Zstd(level=1),
    "zstd-3 (no blosc)": lambda ts: Zstd(level=3),
}


@dataclass
class DataSet:
    """Chunks [c, T, D] of one kind of stored features."""

    label: str
    chunks: list[np.ndarray]
    kind: str  # "fp16" or "int8"
    trained: bool  # trained weights: its stored / raw counts for the defaults (random weights: for chunk size only)
    encode_s: dict[str, list[float]] = field(default_factory=dict)
    decode_s: dict[str, list[float]] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)

    @property
    def raw(self) -> int:
        return sum(c.nbytes for c in self.chunks)


def chunked(x: np.ndarray, max_chunks: int) -> list[np.ndarray]:
    """x [N, K, T, D] -> contiguous chunks [c, T, D] (one layer of c samples, c by the cache's 256 KiB rule)."""
    n, k, t, d = x.shape
    c = max(1, -(-CHUNK_BYTES // (t * d * x.itemsize)))
    out = [np.ascontiguousarray(x[s : s + c, layer]) for s in range(0, n - c + 1, c) for layer in range(k)]
    return out[:max_chunks]


def fp16_and_int8(label: str, x: torch.Tensor, n_cal: int, max_chunks: int, trained: bool) -> list[DataSet]:
    """The fp16 chunks of x [N, K, T, D] (float32) and the int8 q of its held-out samples, quantised by INT8_VARIANT
    calibrated on the first n_cal samples."""
    _, scheme_name, opts = next(v for v in quantize_bench.VARIANTS if v[0] == INT8_VARIANT)
    scheme = calibrate(scheme_name, x[:n_cal], **opts)
    held = x[n_cal:]
    q = torch.cat([scheme.quantize(held[s : s + 16])["q"] for s in range(0, len(held), 16)]).numpy()
    return [DataSet(label, chunked(held.half().numpy(), max_chunks), "fp16", trained),
            DataSet(label, chunked(q, max_chunks), "int8", trained)]


def run_round(sets: list[DataSet], order: list[str]) -> None:
    """Encode and decode every data set's chunks with each codec once, in `order`."""
    for ds in sets:
        typesize = ds.chunks[0].itemsize
        for name in order:
            codec = CODECS[name](typesize)
            t = time.perf_counter()
            enc = [bytes(memoryview(c)) if codec is None else codec.encode(c) for c in ds.chunks]
            t_enc = time.perf_counter() - t
            t = time.perf_counter()
            dec = [np.frombuffer(e, ds.chunks[0].dtype).copy() if codec is None else codec.decode(e) for e in enc]
            t_dec = time.perf_counter() - t
            if name not in ds.stored:  # first round: check and count
                assert all(np.array_equal(np.frombuffer(bytes(memoryview(o)), c.dtype).reshape(c.shape), c) for o, c in zip(dec, ds.chunks)), name
                ds.stored[name] = sum(len(e) for e in enc)
            ds.encode_s.setdefault(name, []).append(t_enc)
            ds.decode_s.setdefault(name, []).append(t_dec)


def rates(ds: DataSet, name: str) -> tuple[float, float, float]:
    """(stored / raw, encode MB/s, decode MB/s), medians."""
    mb = ds.raw / 1e6
    return ds.stored[name] / ds.raw, mb / statistics.median(ds.encode_s[name]), mb / statistics.median(ds.decode_s[name])


def table(sets: list[DataSet], kind: str) -> list[str]:
    """One row per codec: per data set of `kind` stored / raw and encode / decode MB/s per core; then, from the median
    rates over those data sets and the mean stored / raw of the trained ones, the storage saved per core-second of
    encoding, the cores ViT-L/14-336 at IMAGES_PER_S needs and the stored GB/s."""
    ds = [d for d in sets if d.kind == kind]
    need = IMAGES_PER_S * VITL_BYTES_FP16 * (0.5 if kind == "int8" else 1.0) / 1e6  # MB/s of raw features
    head = "| codec | " + " | ".join(d.label for d in ds) + f" | saved MB per core-second | cores at {IMAGES_PER_S} img/s ViT-L/14-336 (encode / decode) | stored GB/s at {IMAGES_PER_S} img/s |"
    rows = [head, "|---|" + "---|" * (len(ds) + 3)]
    for name in CODECS:
        cells = []
        for d in ds:
            ratio, enc, dec = rates(d, name)
            cells.append(f"{ratio:.3f}; {enc:.0f} / {dec:.0f}")
        enc = statistics.median(rates(d, name)[1] for d in ds)
        dec = statistics.median(rates(d, name)[2] for d in ds)
        ratio = statistics.mean(rates(d, name)[0] for d in ds if d.trained)
        cores = "— (a copy)" if name.startswith("none") else f"{need / enc:.0f} / {need / dec:.0f}"
        bold = "**" if name == DEFAULT else ""
        rows.append(f"| {bold}{name}{bold} | " + " | ".join(cells) + f" | {enc * (1 - ratio):.0f} | {cores} | {need * ratio / 1e3:.1f} |")
    return rows


def choose(sets: list[DataSet], kind: str) -> tuple[str, list[str]]:
    """The default for `kind` (by RULE) and the sentences behind it."""
    ds = [d for d in sets if d.kind == kind]
    ratio = {n: statistics.mean(rates(d, n)[0] for d in ds if d.trained) for n in CODECS}
    enc = {n: statistics.median(rates(d, n)[1] for d in ds) for n in CODECS}
    dec = {n: statistics.median(rates(d, n)[2] for d in ds) for n in CODECS}
    need = IMAGES_PER_S * VITL_BYTES_FP16 * (0.5 if kind == "int8" else 1.0) / 1e6
    cands = [n for n in CODECS if not n.startswith("none") and ratio[n] <= 0.95]
    saved = {n: enc[n] * (1 - ratio[n]) for n in CODECS}  # MB of storage saved per core-second
    best = "none (copy)"
    if cands:
        top = max(saved[n] for n in cands)
        best = min((n for n in cands if saved[n] >= 0.9 * top), key=lambda n: ratio[n])
    def desc(n: str) -> str:
        return (f"stores {ratio[n]:.3f} of raw, encodes {enc[n]:.0f} MB/s and decodes {dec[n]:.0f} MB/s per core, saving "
                f"{saved[n]:.0f} MB of storage per core-second ({need / enc[n]:.0f} cores to encode, {need / dec[n]:.0f} to decode "
                f"ViT-L/14-336 at {IMAGES_PER_S} img/s; {1e3 / (ratio[n] * enc[n]):.1f} encoding cores per GB/s the storage takes)")

    text = [f"**{kind}: `{best}`**, which " + (desc(best) if best in cands else f"no codec saves 5% (best {min(ratio.values()):.3f})") + "."]
    if best != DEFAULT:
        text.append(f"The writer's default `{DEFAULT}` {desc(DEFAULT)}.")
    smallest = min(cands or CODECS, key=lambda n: ratio[n])
    if smallest not in (best, DEFAULT):
        text.append(f"The smallest, `{smallest}`, {desc(smallest)}.")
    return best, text


def render(cmd: str, sets: list[DataSet], repeats: int, seconds: float) -> str:
    fp16, fp16_text = choose(sets, "fp16")
    int8, int8_text = choose(sets, "int8")
    need16 = IMAGES_PER_S * VITL_BYTES_FP16 / 1e9
    return "\n".join([
        SECTION, "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine()}  ",
        f"Settings: numcodecs {numcodecs.__version__}, one thread (blosc use_threads False, nthreads 1): MB/s are raw MB per second "
        f"of one core; medians of {repeats} interleaved repeats. Chunks: one layer of c samples, c = ceil(256 KiB / layer bytes) "
        f"(the cache's rule). int8 = the `q` part of bench/quantize.py's recommended scheme (`{INT8_VARIANT}`), its small "
        f"fp16 scale and outlier parts apart. Cores at {IMAGES_PER_S} img/s: ViT-L/14-336's all-layer features, "
        f"{VITL_BYTES_FP16 / 1e6:.1f} MB per image in fp16 ({need16:.1f} GB/s raw; int8: half), divided by the codec's "
        f"median single-core rate over the table's data sets (encode / decode); stored GB/s = that raw rate x the codec's mean "
        f"stored / raw over the trained data sets. c-blosc runs zstd at level 2c - 1 for its level c (blosc zstd-3 is zstd "
        f"level 5, zstd-5 is level 9); zstd without blosc runs at the level named. Total run {seconds:.0f} s.", "",
        "Each data cell: stored / raw; encode / decode MB/s per core. Data: chunk shape [c, T, D] and number of chunks; "
        "(random) = random weights, whose stored / raw is not counted for the defaults.", "",
        "fp16:", "", *table(sets, "fp16"), "",
        "int8:", "", *table(sets, "int8"), "",
        f"Defaults, by rule ({RULE}):", "", " ".join(fp16_text), "", " ".join(int8_text), "",
        "At real scale the writer is storage-bound: the storage takes S GB/s, so a codec speeds the writer up by raw / stored, "
        "provided it has S / (stored / raw) / (encode rate) cores to spare; a codec that saves a few percent more at a third of "
        "the speed costs three times the cores for that, so the default is chosen by storage saved per core-second. This only "
        "recommends; the writer's default (`writer.compressor`) is unchanged.",
    ])


def main() -> None:
    ap = bench_parser(__doc__)
    args = ap.parse_args()
    n_img, n_text, n_vitb, max_chunks, repeats = (96, 10, 4, 8, 1) if args.quick else (160, 40, 12, 100, 5)
    numcodecs.blosc.use_threads = False
    numcodecs.blosc.set_nthreads(1)
    cmd = command()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    sets: list[DataSet] = []
    tower = quantize_bench.tower_states(SHIPPED_TOWER, n_img)
    sets += fp16_and_int8("shipped default tower", tower, 32, max_chunks, True)
    del tower
    model, tok = quantize_bench.minilm()
    text = quantize_bench.minilm_states(model, tok, quantize_bench.builtin_texts(n_text))
    sets += fp16_and_int8("all-MiniLM-L6-v2", text, 4, max_chunks, True)
    del text, model
    with tempfile.TemporaryDirectory(prefix="layerfuse-bench-") as tmp:
        vitb = quantize_bench.tower_states(build_vitb(Path(tmp) / "vitb"), n_vitb, batch=4)
    sets += fp16_and_int8("ViT-B/16-shaped", vitb, 2, max_chunks, False)
    del vitb
    for ds in sets:
        ds.label += f" [{', '.join(map(str, ds.chunks[0].shape))}] x {len(ds.chunks)}" + ("" if ds.trained else " (random)")
    names = list(CODECS)
    for r in range(repeats):
        run_round(sets, names[r % len(names):] + names[: r % len(names)])  # a different codec first each round
        print(f"round {r + 1}/{repeats} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    section = render(cmd, sets, repeats, time.perf_counter() - t0)
    write_section(args.out, SECTION, section)
    print(section)


if __name__ == "__main__":
    main()
