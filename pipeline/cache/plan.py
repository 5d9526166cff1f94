"""Plan before spending: how big a cache will be, how many files it holds and what write rate it needs.

`layerfuse cache plan` prints this from the encoder's config alone (no weights are loaded); extraction can print the
same estimate when it starts, from its loaded encoder's `EncoderInfo`, and compare it with `free_bytes(out)`.

    shape = encoder_shape("/models/clip-vit-large-patch14-336")       # or a config.json, a hub id, "default"
    cfg = ExtractConfig(dtype="int8", layers="mmfuser")
    shard, chunk = storage_layout(cfg, shape)                         # extract's own rule
    plan = plan_cache(shape, 1_223_000, shard_samples=shard, chunk_samples=chunk,
                      layers=cfg.stored_layers(shape), dtype="int8")
    text = plan.format(out="/data/cache")

Per sample (K stored hidden states, T tokens, D width, M turns, d_s text width):

    features   K * T * (D * value_bytes + scale_bytes + 2 * n)  [K, T, D] in the storage dtype (+ an fp16 scale per token
                                                                and, for int8, at most n = 16 fp16 outlier channels)
    text       (M + 1) * d_s * 4                                text/turns [M, d_s] + text/mean [d_s], float32
    tables     the strings (an assumed `string_bytes`) + status, image size, turn count, 4 * K + 3 * 4 checksum bytes

Files are counted the way `CacheWriter.create` / `finalize` make them (docs/cache-format.md): one object per feature
shard and per text chunk (ceil(N/S) each), one per 16384 rows of every table (K of them for checksums/features), a
`zarr.json` per array and group, and the progress markers (plan-issues.json and one per shard).

This module must not import `extract` (extraction imports it): the shard/chunk choice is an input, made by the caller
with `extract.storage_layout`.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import fsspec
import transformers

from layerfuse.core.dtypes import StorageDtype
from layerfuse.core.errors import ConfigError, MissingError
from layerfuse.core.hub import CheckpointError, is_local, load_pretrained
from layerfuse.pipeline.cache.encoding import MAX_OUTLIERS
from layerfuse.pipeline.cache.quantize import SCALE_DTYPE
from layerfuse.pipeline.cache.reader import ARRAYS, FEATURE_CHECKSUMS, cache_arrays
from layerfuse.pipeline.cache.selection import describe_layers
from layerfuse.pipeline.cache.writer import TABLE_CHUNK
from layerfuse.pipeline.models.default_vision import DefaultVisionConfig, describe
from layerfuse.pipeline.models.encoder import DEFAULT_VISION, HAS_CLS

DEFAULT_IMAGES_PER_S = 500.0  # the extraction rate the write bandwidth is quoted at
DEFAULT_TEXT_DIM = 384  # all-MiniLM-L6-v2, the default sentence model
# An assumption, not a measurement: a LLaVA-style record's id, image path, conversation JSON and locator are of
# this order (the built-in data's are about 220 bytes); it is a rounding error next to the features either way.
DEFAULT_STRING_BYTES = 1024
TEXT_RATIO = 1.0  # float32 embeddings: assumed incompressible (the zero padding past a sample's turns compresses away)
TABLE_RATIO = 1.0  # per-sample tables: assumed incompressible (an upper bound; they are tiny)
SCALE_BYTES = SCALE_DTYPE.itemsize  # one float16 scale per (layer, token) for the quantised dtypes (and per int8 outlier)


@dataclass(frozen=True)
class StorageCost:
    """What a storage dtype costs per value, and the on-disk / raw ratio expected under the cache's compressor."""

    value_bytes: int  # bytes per stored value
    scale_bytes: int  # extra bytes per (layer, token): the fp16 scale of a quantised dtype
    outliers: int  # at most this many fp16 outlier channels per (layer, token) (int8; the cache keeps n <= this)
    ratio: float  # expected on-disk bytes / raw bytes of the features
    source: str  # where `ratio` comes from


# Ratios: the largest (least compressible) measurement per dtype in BENCHMARKS.md "Compression by storage dtype"
# (bench/compression.py: the shipped pretrained tiny tower, and random-weight CLIPs of the tiny, ViT-B/16 and ViT-L/14-336
# shapes; the cache's default compressor, zstd level 1; one chunk per (sample, layer); int8 and float8 encoded as
# extraction encodes them), rounded up to the next hundredth. Real pretrained CLIP/SigLIP weights are not measured
# (offline); trained weights compressed worse than random ones on the tiny tower (the largest value of every column),
# which is why the largest is used.
STORAGE_COSTS: dict[str, StorageCost] = {
    "float16": StorageCost(2, 0, 0, 0.93, "measured 0.918-0.929 under zstd-1 (BENCHMARKS.md: Compression by storage dtype)"),
    "bfloat16": StorageCost(2, 0, 0, 0.79, "measured 0.779-0.789 under zstd-1 (BENCHMARKS.md: Compression by storage dtype)"),
    "float32": StorageCost(4, 0, 0, 0.93, "measured 0.924-0.928 under zstd-1 (BENCHMARKS.md: Compression by storage dtype)"),
    # quantised (pipeline/cache/encoding.py): a byte per value + an fp16 scale per (layer, token); int8 also keeps at
    # most MAX_OUTLIERS channels per token in fp16 (counted in full here: an upper bound)
    "int8": StorageCost(1, SCALE_BYTES, MAX_OUTLIERS, 0.98, "measured 0.916-0.971 under zstd-1, codes + scales + outliers (BENCHMARKS.md: Compression by storage dtype)"),
    "float8_e4m3fn": StorageCost(1, SCALE_BYTES, 0, 0.85, "measured 0.790-0.842 under zstd-1, codes + scales (BENCHMARKS.md: Compression by storage dtype)"),
}


def storage_cost(dtype: str) -> StorageCost:
    """The cost entry of `dtype`; a ConfigError naming the known dtypes otherwise."""
    if dtype not in STORAGE_COSTS:
        raise ConfigError(f"--dtype must be one of {', '.join(StorageDtype.names())}, not {dtype!r}")
    return STORAGE_COSTS[dtype]


# --- the encoder's shape --------------------------------------------------------------------------------------------
class ShapeLike(Protocol):
    """What a plan needs of an encoder: an `EncoderInfo` (pipeline/models/encoder.py) or an `EncoderShape`."""

    num_layers: int
    num_tokens: int
    hidden_size: int


@dataclass(frozen=True)
class EncoderShape:
    """An encoder's shape, read from its config. Its `info` is itself, so `extract.storage_layout(cfg, shape)` takes
    it where it takes a loaded `VisionEncoder`."""

    name: str
    model_type: str
    num_layers: int  # L (blocks); L+1 hidden states
    num_tokens: int  # T, CLS included where the model has one
    hidden_size: int  # D
    has_cls: bool
    grid: tuple[int, int]  # (h, w) of the patch grid

    @property
    def info(self) -> EncoderShape:
        return self

    @classmethod
    def of(cls, shape: ShapeLike) -> EncoderShape:
        """An EncoderInfo (or anything with num_layers, num_tokens, hidden_size) as an EncoderShape."""
        if isinstance(shape, EncoderShape):
            return shape
        t = int(shape.num_tokens)
        has_cls = bool(getattr(shape, "has_cls", False))
        side = math.isqrt(t - int(has_cls))
        return cls(name=str(getattr(shape, "name", "?")), model_type=str(getattr(shape, "model_type", "?")),
                   num_layers=int(shape.num_layers), num_tokens=t, hidden_size=int(shape.hidden_size), has_cls=has_cls,
                   grid=tuple(getattr(shape, "grid", (side, side))))  # type: ignore[arg-type]


def default_shape(cfg: DefaultVisionConfig | None = None) -> EncoderShape:
    """The embedded default tower's shape (pipeline/models/default_vision.py): a CLIP, so CLS + grid x grid tokens."""
    cfg = cfg or DefaultVisionConfig()
    return EncoderShape(name=describe(cfg), model_type="clip_vision_model", num_layers=cfg.num_layers,
                        num_tokens=cfg.grid * cfg.grid + 1, hidden_size=cfg.hidden_size, has_cls=True, grid=(cfg.grid, cfg.grid))


def config_shape(config: Any, name: str) -> EncoderShape:
    """The shape of a transformers config (a full CLIP/SigLIP config: its `vision_config`), as load_vision_encoder
    finds it by running the tower: T = (image_size // patch_size)^2, + 1 where the model has a CLS token."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in HAS_CLS:
        raise ConfigError(
            f"--vision {name}: cannot tell the tokens of a {model_type or 'model'!r} tower from its config alone "
            f"(`cache plan` knows {', '.join(sorted(HAS_CLS))}); extract a few samples and read `layerfuse cache info` instead"
        )
    vcfg = getattr(config, "vision_config", None) or config
    side = int(vcfg.image_size) // int(vcfg.patch_size)
    has_cls = HAS_CLS[model_type]
    return EncoderShape(name=name, model_type=model_type, num_layers=int(vcfg.num_hidden_layers),
                        num_tokens=side * side + int(has_cls), hidden_size=int(vcfg.hidden_size), has_cls=has_cls, grid=(side, side))


def encoder_shape(vision: str, *, revision: str | None = None) -> EncoderShape:
    """The shape of `vision` without loading weights: "default" (the embedded tower), a local folder holding a
    config.json, a config.json file, or a hub id (its config is fetched; offline, a CheckpointError saying what to
    download)."""
    if vision == DEFAULT_VISION:
        return default_shape()
    path = Path(os.path.expanduser(vision))
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise MissingError(f"--vision {vision}: no such config file")
        try:
            return config_shape(transformers.AutoConfig.from_pretrained(str(path)), vision)
        except (OSError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"--vision {vision}: not a transformers model config: {str(e).splitlines()[0]}") from e
    try:
        config = load_pretrained("vision config", vision, transformers.AutoConfig.from_pretrained, revision=revision)
    except CheckpointError as e:
        if is_local(vision) or vision.startswith((".", "/", "~")):
            raise
        leaf = vision.rstrip("/").split("/")[-1]
        c = e.__cause__
        cause = f" ({type(c).__name__}: {str(c).splitlines()[0][:160]})" if c is not None and str(c) else ""
        raise CheckpointError(
            f"cannot read the config of {vision!r}: it is not a local folder and it could not be fetched from the Hugging "
            f"Face hub{cause}. `cache plan` needs only its config.json: where there is network, run `hf download {vision} "
            f"config.json --local-dir {leaf}`, copy the folder here and pass --vision {leaf}"
        ) from e
    return config_shape(config, vision)


# --- the plan -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachePlan:
    """The estimated size, file count and write rate of a cache of `samples` rows.

    Assumes every sample has an image and an embedded instruction, no recorded issues, and a non-empty value in every
    table chunk (the built-in data; a LLaVA JSON without categories writes one file fewer per 16384 samples)."""

    encoder: EncoderShape
    samples: int  # N
    layers: tuple[int, ...]  # the stored hidden states, K = len(layers)
    dtype: str
    shard_samples: int  # S: a shard is [S, K, T, D], one object
    chunk_samples: int  # c: a chunk is [c, 1, T, D]
    max_turns: int = 1  # M
    text_dim: int = DEFAULT_TEXT_DIM  # d_s
    string_bytes: int = DEFAULT_STRING_BYTES
    images_per_s: float = DEFAULT_IMAGES_PER_S
    views: int = 0  # V: group means stored after the layers (extract --views)

    # --- per sample ---
    @property
    def cost(self) -> StorageCost:
        return storage_cost(self.dtype)

    @property
    def num_stored(self) -> int:
        """K + V: tensors per sample along the layer axis (hidden states, then group means)."""
        return len(self.layers) + self.views

    @property
    def feature_bytes(self) -> int:
        """Raw feature bytes per sample: K x T x (D x value bytes + scale bytes + fp16 outliers); for int8 an upper bound
        (the cache keeps the outlier channels calibration finds, at most MAX_OUTLIERS)."""
        e, c = self.encoder, self.cost
        return self.num_stored * e.num_tokens * (e.hidden_size * c.value_bytes + c.scale_bytes + c.outliers * SCALE_BYTES)

    @property
    def text_bytes(self) -> int:
        """text/turns [M, d_s] + text/mean [d_s], float32, per sample."""
        return (self.max_turns + 1) * self.text_dim * 4

    @property
    def table_bytes(self) -> int:
        """The per-sample tables: strings, status (1), image size (8), turn count (2), checksums (4 x K + 3 x 4)."""
        return self.string_bytes + 1 + 8 + 2 + 4 * self.num_stored + 3 * 4

    @property
    def sample_bytes(self) -> int:
        """Raw bytes per sample."""
        return self.feature_bytes + self.text_bytes + self.table_bytes

    @property
    def sample_disk_bytes(self) -> float:
        """Expected on-disk bytes per sample."""
        return self.feature_bytes * self.cost.ratio + self.text_bytes * TEXT_RATIO + self.table_bytes * TABLE_RATIO

    # --- totals ---
    @property
    def raw_bytes(self) -> int:
        return self.samples * self.sample_bytes

    @property
    def disk_bytes(self) -> float:
        return self.samples * self.sample_disk_bytes

    @property
    def num_shards(self) -> int:
        return -(-self.samples // self.shard_samples)

    @property
    def shard_bytes(self) -> int:
        """Raw bytes of one full feature shard (the largest object written)."""
        return self.shard_samples * self.feature_bytes

    @property
    def files(self) -> dict[str, int]:
        """Files (objects) the finished cache holds, by kind."""
        table_chunks = -(-self.samples // TABLE_CHUNK)
        chunks = {"feature shards": self.num_shards, "text chunks": 0, "table chunks": 0}
        for path in self.arrays:
            if path in ("features", "quant/scale", "quant/outliers"):  # in the feature shards' count
                continue
            if path in ("text/turns", "text/mean"):  # chunked by shard: [S, M, d_s], [S, d_s]
                chunks["text chunks"] += self.num_shards
            elif path == FEATURE_CHECKSUMS:  # [16384, 1]: a column per stored layer
                chunks["table chunks"] += table_chunks * self.num_stored
            elif not path.startswith("issues/"):  # no issues assumed: the issue arrays are empty
                chunks["table chunks"] += table_chunks
        chunks["feature shards"] *= len(self.arrays) - len(ARRAYS) + 1  # quant/scale (and quant/outliers) are sharded alike
        groups = {p.rsplit("/", 1)[0] for p in self.arrays if "/" in p}
        return {**chunks, "zarr.json": 1 + len(groups) + len(self.arrays), "progress markers": 1 + self.num_shards}

    @property
    def arrays(self) -> tuple[str, ...]:
        """The arrays of the finished cache (reader.cache_arrays): int8 counted with outliers (an upper bound)."""
        storage: dict[str, Any] = {"dtype": self.dtype}
        if self.cost.scale_bytes:
            storage["quant"] = {"inputs": self.num_stored, "outlier_channels": [list(range(self.cost.outliers))] * self.num_stored}
        return cache_arrays(storage)

    @property
    def num_files(self) -> int:
        return sum(self.files.values())

    @property
    def write_bytes_per_s(self) -> float:
        """On-disk bytes per second at `images_per_s`."""
        return self.sample_disk_bytes * self.images_per_s

    def fits(self, free: int | None) -> bool | None:
        """Whether the expected on-disk size fits in `free` bytes (None when unknown)."""
        return None if free is None else self.disk_bytes <= free

    # --- output ---
    def to_json(self, out: str | None = None) -> dict[str, Any]:
        """Settings, per-sample and total bytes, files and write rate; with `out`, its free bytes and whether it fits."""
        data: dict[str, Any] = {
            "encoder": asdict(self.encoder),
            "samples": self.samples,
            "layers": list(self.layers),
            "views": self.views,
            "dtype": self.dtype,
            "compression_ratio": self.cost.ratio,
            "ratio_source": self.cost.source,
            "shard_samples": self.shard_samples,
            "chunk_samples": self.chunk_samples,
            "max_turns": self.max_turns,
            "text_dim": self.text_dim,
            "string_bytes": self.string_bytes,
            "per_sample": {"features": self.feature_bytes, "text": self.text_bytes, "tables": self.table_bytes,
                           "raw": self.sample_bytes, "disk": round(self.sample_disk_bytes)},
            "raw_bytes": self.raw_bytes,
            "disk_bytes": round(self.disk_bytes),
            "shard_bytes": self.shard_bytes,
            "num_shards": self.num_shards,
            "files": self.files,
            "num_files": self.num_files,
            "images_per_s": self.images_per_s,
            "write_bytes_per_s": round(self.write_bytes_per_s),
        }
        if out is not None:
            free = free_bytes(out)
            data.update(out=out, free_bytes=free, fits=self.fits(free))
        return data

    def format(self, out: str | None = None) -> str:
        """The plan as a few lines of text; with `out`, also its free space."""
        e, c, n = self.encoder, self.cost, self.samples
        cls = " + CLS" if e.has_cls else ", no CLS"
        ratio = f"x {c.ratio:.2f}"
        files = ", ".join(f"{v:,} {k}" for k, v in self.files.items())
        lines = [
            f"encoder   {e.name} ({e.model_type}): L={e.num_layers} blocks, T={e.num_tokens} tokens "
            f"({e.grid[0]}x{e.grid[1]}{cls}), D={e.hidden_size}",
            f"stores    {describe_layers(list(self.layers), e.num_layers)}"
            + (f" + {self.views} group mean(s)" if self.views else "") + f" in {self.dtype}",
            f"layout    {self.num_shards:,} shards [{self.shard_samples}, {self.num_stored}, {e.num_tokens}, {e.hidden_size}] "
            f"of {_si(self.shard_bytes)} raw, chunks [{self.chunk_samples}, 1, {e.num_tokens}, {e.hidden_size}]",
            "per sample",
            f"  features  {_si(self.feature_bytes):>9} raw  ({self.num_stored} x {e.num_tokens} x {e.hidden_size} x {c.value_bytes} B"
            + (f" + {self.num_stored} x {e.num_tokens} x {c.scale_bytes} B scales" if c.scale_bytes else "")
            + (f" + at most {self.num_stored} x {e.num_tokens} x {c.outliers} x {SCALE_BYTES} B outliers" if c.outliers else "")
            + f"), {_si(self.feature_bytes * c.ratio)} on disk {ratio}",
            f"  text      {_si(self.text_bytes):>9}      ({self.max_turns} turn(s) + mean, {self.text_dim} float32 each)",
            f"  tables    {_si(self.table_bytes):>9}      ({self.string_bytes} B of strings assumed, checksums, status)",
            f"  total     {_si(self.sample_bytes):>9} raw, {_si(self.sample_disk_bytes)} on disk",
            f"{n:,} samples: {_si(self.disk_bytes)} on disk ({_si(self.raw_bytes)} raw), {self.num_files:,} files ({files})",
            f"at {self.images_per_s:g} images/s: writes {self.write_bytes_per_s / 1e9:.2f} GB/s to disk "
            f"(compresses {self.sample_bytes * self.images_per_s / 1e9:.2f} GB/s); "
            f"{_duration(n / self.images_per_s)} for all samples",
        ]
        if out is not None:
            free = free_bytes(out)
            if free is None:
                lines.append(f"free      unknown at {out} (not a local path)")
            else:
                verdict = "enough" if self.fits(free) else f"NOT enough: about {_si(self.disk_bytes - free)} short"
                lines.append(f"free      {_si(free)} at {out}: {verdict}")
        return "\n".join(lines)


def plan_cache(
    shape: ShapeLike,
    samples: int,
    *,
    shard_samples: int,
    chunk_samples: int,
    layers: Sequence[int] | None = None,
    dtype: str = StorageDtype.FLOAT16.value,
    max_turns: int = 1,
    text_dim: int = DEFAULT_TEXT_DIM,
    string_bytes: int = DEFAULT_STRING_BYTES,
    images_per_s: float = DEFAULT_IMAGES_PER_S,
    views: int = 0,
) -> CachePlan:
    """The plan of a cache of `samples` rows of `shape` (an EncoderInfo or EncoderShape), storing hidden states
    `layers` (None: all L+1; see selection.stored_layers) and `views` group means in `dtype`, laid out as
    `extract.storage_layout` chose."""
    enc = EncoderShape.of(shape)
    storage_cost(dtype)
    stored = tuple(range(enc.num_layers + 1)) if layers is None else tuple(sorted({int(i) for i in layers}))
    if not stored or stored[0] < 0 or stored[-1] > enc.num_layers:
        raise ConfigError(f"stored layers must be hidden states within 0..{enc.num_layers}, not {list(stored)}")
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, not {samples}")
    if shard_samples < 1 or chunk_samples < 1 or shard_samples % chunk_samples:
        raise ConfigError(f"shard_samples {shard_samples} must be a positive multiple of chunk_samples {chunk_samples}")
    if max_turns < 0 or text_dim < 1 or string_bytes < 0 or images_per_s <= 0:
        raise ConfigError(f"max_turns {max_turns}, text_dim {text_dim}, string_bytes {string_bytes}, images_per_s {images_per_s}: "
                          f"need max_turns >= 0, text_dim >= 1, string_bytes >= 0, images_per_s > 0")
    return CachePlan(enc, int(samples), stored, dtype, int(shard_samples), int(chunk_samples), int(max_turns), int(text_dim),
                     int(string_bytes), float(images_per_s), int(views))


def free_bytes(url: str) -> int | None:
    """Free bytes on the disk a local cache path (or file:// URL) would go to, from its nearest existing folder;
    None for other fsspec URLs (s3://, gs://, memory://, ...)."""
    protocol, path = fsspec.core.split_protocol(str(url))
    if protocol not in (None, "file", "local"):
        return None
    p = Path(os.path.expanduser(path)).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _si(n: float) -> str:
    """Bytes in decimal units: 29.5 MB, 36.1 TB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size * 0.9995:  # 999.6 kB would print as 1,000 kB
            v = n / size
            return f"{v:,.{max(0, 2 - int(math.log10(abs(v))))}f} {unit}"  # 3 significant digits, or whole units
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    """17.4 h, 3.2 min, 12 s."""
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
