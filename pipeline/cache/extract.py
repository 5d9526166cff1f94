"""Phase one: run a frozen vision tower once over a source and store every layer in a cache.

    source -> plan (records) -> DataLoader workers (load, decode, preprocess) -> batched encoder forward
           -> check (nan, inf, the storage dtype's range: a refused image is a recorded bad sample)
           -> shard buffers -> writer threads (zarr, overlapped with compute; bounded queue of shards) -> markers -> finalize
    records -> text thread (each batch's instruction embeddings, ahead of the forward) -> shard buffers

Output shard k holds storage rows [k*S, (k+1)*S). Under torchrun rank r takes shards k = r (mod world),
and batches never straddle shards, so the cache is bit-for-bit the one a single process writes.

Sources are untrusted: workers read images under `access.ImageAccess` (pipeline/data/access.py) (the image root, --allow-urls,
--max-image-bytes; see pipeline/data/access.py) and decode them under --max-pixels applied to the
preprocessing's working size (`ImagePreprocessor.working_pixels`). A refused image is a recorded bad sample.
`--strict` stops at the first plan issue or repair note, else at the first bad image, with one line.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from layerfuse.core.config import check_choices
from layerfuse.core.errors import ConfigError, StateError
from layerfuse.core.fingerprint import fingerprint, runtime
from layerfuse.core import __version__
from layerfuse.core.dtypes import StorageDtype
from layerfuse.pipeline.cache.plan import free_bytes, plan_cache
from layerfuse.pipeline.cache.selection import ALL as ALL_LAYERS, input_name, stored_layers, view_groups
from layerfuse.pipeline.cache.encoding import CALIBRATION_IMAGES, FEATURES, FeatureEncoding, running_absmax
from layerfuse.pipeline.cache.quantize import ErrorStats
from layerfuse.pipeline.cache.reader import ATTRS_KEY, FORMAT_VERSION, OK, SKIPPED, TEXT_ONLY, open_group
from layerfuse.pipeline.cache.writer import DEFAULT_CODEC, LEGACY_CODEC, CacheWriter, Codec, FeaturePool, ShardResult, ShardWriterPool, compressor_name
from layerfuse.core.distributed import DistContext
from layerfuse.pipeline.models.default_vision import DefaultVisionConfig, build_default_vision, describe
from layerfuse.pipeline.models.encoder import DEFAULT_VISION, ImagePreprocessor, VisionEncoder, load_vision_encoder
from layerfuse.pipeline.data import sources
from layerfuse.pipeline.data.records import Plan, SampleError, SampleIssue, SampleRecord
from layerfuse.pipeline.data.access import DEFAULT_MAX_IMAGE_BYTES, ImageAccess, is_remote, load_image, local_root, parse_url_schemes
from layerfuse.pipeline.data.images import decode_image
from layerfuse.pipeline.data.stream import is_pipe, read_members, spool_path
from layerfuse.pipeline.data.synthetic import synthetic_plan
from layerfuse.core.workers import worker_init_fn
from layerfuse.pipeline.models.text import DEFAULT_SUFFIXES, DEFAULT_TEXT_MODEL, InstructionEmbedder, TextBatch, max_human_turns

BUILTIN_SAMPLES = 2000  # the built-in source's size when no source is given


class ExtractError(StateError):
    """Extraction cannot proceed (bad arguments, a config clash with an existing cache, --strict failure)."""


ACCELERATOR_BATCH = 32  # images per forward on a GPU (--batch-size)
# On a CPU a forward of 18 ViT-L/14-336 images (10k tokens) beside the writer thread ran at 0.74-0.82 of its speed
# alone (its large temporaries fault in millions of fresh pages per forward, and the writer's work lands between them);
# 6 images per forward (3.5k tokens) ran at its speed alone, and alone they are as fast per image (BENCHMARKS.md
# "Extraction").
CPU_BATCH_TOKENS = 4096
CPU_WORKERS = 2  # DataLoader workers on a CPU (--workers): the forward takes the other cores
# On an accelerator the workers decode for a forward of hundreds of images/s: a 336-px image costs 3.5 ms of decode and
# preprocessing per core here (BENCHMARKS.md "Extraction"), a LLaVA-sized JPEG more, so 2 workers would cap a run near
# 300-500 images/s. They get the cores this process may use but these, kept for the main thread (forward and copies),
# the text thread and the writer threads.
ACCELERATOR_SPARE_CORES = 4
# When every one of a run's first REFUSED_PROBE encoded images is refused by the check of the encoder's output (nan,
# inf, beyond the storage dtype), the run stops: the tower or the dtypes are wrong for this data (a float16 tower that
# overflows, hidden states beyond float16), and going on would skip every image of the source.
REFUSED_PROBE = 64


@dataclass
class ExtractConfig:
    """Everything `layerfuse extract` takes. The fingerprinted fields (all but the `runtime` ones) define the cache:
    `_config_record` derives the cache's config record, whose fingerprint is the cache's, from them alone."""

    out: str = runtime(default="runs/default/cache")
    llava: str | None = None  # LLaVA JSON/JSONL path or URL
    image_root: str | None = None  # defaults to the JSON's folder
    wds: str | None = None  # WebDataset shards: paths, globs, brace patterns, URLs (comma-separated)
    builtin: int | None = None  # number of built-in synthetic samples
    seed: int = 0
    split: str = "train"  # split recorded for sources whose records carry none
    vision: str = DEFAULT_VISION
    vision_revision: str | None = None
    vision_pretrain_steps: int | None = None  # --vision default only: pretraining steps (None: the default, 0: random)
    pad_to_square: bool = False
    layers: str = ALL_LAYERS  # hidden states to store: `all`, or SPEC[;SPEC...] of fuser names and layer specs (selection.py)
    views: str | None = None  # group means to store beside them: SPEC[;SPEC...] whose group terms become views
    dtype: str = "float16"
    text_model: str = DEFAULT_TEXT_MODEL
    suffixes: tuple[str, ...] = DEFAULT_SUFFIXES
    shard_samples: int | None = None  # None: chosen from shard_mib
    shard_mib: int = 512
    chunk_kib: int = 256
    codec: Codec = DEFAULT_CODEC  # chunk compressor, chosen by measurement (writer.compressor, BENCHMARKS.md "Codecs")
    clevel: int = 1  # its level
    max_pixels: int = 89_478_485  # decoded size and preprocessing working size (pad to square, resize), pixels
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # the largest image file or tar member read
    run_dir: str = "runs/default"  # the default tower is built in RUN_DIR/vision: that path is in the cache record
    # runtime only: does not change the cache
    batch_size: int | None = runtime(default=None)  # images per forward; None: `forward_batch` chooses
    workers: int | None = runtime(default=None)  # DataLoader workers for decoding; None: `loader_workers` chooses
    device: str = runtime(default="auto")
    compute_dtype: str = runtime(default="auto")  # auto (bf16 on CUDA, fp32 on CPU) or a StorageDtype name
    text_batch_size: int = runtime(default=128)
    strict: bool = runtime(default=False)
    allow_urls: str | None = runtime(default=None)  # URL schemes image values may use, comma-separated ("s3,gs,https")
    overwrite: bool = runtime(default=False)
    force: bool = runtime(default=False)  # extract even when the target has less free space than the estimate
    spool: str = runtime(default="auto")  # where planning copies `pipe:` and remote shards (`spool_dir`): auto, none, or a folder
    progress: bool = runtime(default=True)
    storage_options: dict[str, Any] = runtime(default_factory=dict)

    def forward_batch(self, device: torch.device, num_tokens: int) -> int:
        """Images per encoder forward: --batch-size, else ACCELERATOR_BATCH on an accelerator and, on a CPU, as many
        as hold CPU_BATCH_TOKENS tokens (at most ACCELERATOR_BATCH; 32 for the embedded default, 7 for ViT-L/14-336)."""
        if self.batch_size is not None:
            return self.batch_size
        if device.type != "cpu":
            return ACCELERATOR_BATCH
        return max(1, min(ACCELERATOR_BATCH, CPU_BATCH_TOKENS // max(1, num_tokens)))

    def loader_workers(self, device: torch.device, local_world: int = 1) -> int:
        """DataLoader workers: --workers, else CPU_WORKERS on a CPU and, on an accelerator, the cores this process may
        use minus ACCELERATOR_SPARE_CORES, shared among the `local_world` ranks of a node (at least CPU_WORKERS)."""
        if self.workers is not None:
            return self.workers
        if device.type == "cpu":
            return CPU_WORKERS
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(CPU_WORKERS, (cores - ACCELERATOR_SPARE_CORES) // max(1, local_world))

    def source_spec(self) -> dict[str, Any]:
        given = [k for k in ("llava", "wds", "builtin") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ExtractError(f"give one source, not {' and '.join('--' + g for g in given)}")
        if self.llava is not None:
            return {"kind": "llava", "json": self.llava, "image_root": self.image_root or os.path.dirname(self.llava) or ".", "split": self.split}
        if self.wds is not None:
            return {"kind": "webdataset", "shards": self.wds, "split": self.split}
        return {"kind": "synthetic", "n": BUILTIN_SAMPLES if self.builtin is None else self.builtin, "seed": self.seed}

    def image_access(self) -> ImageAccess:
        """What workers may read for an image: the LLaVA image root, the --allow-urls schemes, --max-image-bytes."""
        spec = self.source_spec()
        try:
            schemes = parse_url_schemes(self.allow_urls)
        except ConfigError as e:
            raise ExtractError(str(e)) from None
        return ImageAccess(image_root=spec.get("image_root"), allow_urls=schemes, max_bytes=self.max_image_bytes)

    def stored_layers(self, enc: VisionEncoder) -> list[int]:
        """The hidden-state indices this extraction stores (`layers` resolved for the tower's depth)."""
        try:
            return stored_layers(self.layers, enc.info.num_layers)
        except ConfigError as e:
            raise ExtractError(str(e)) from None

    def view_groups(self, enc: VisionEncoder) -> list[tuple[int, ...]]:
        """The group means this extraction stores beside the layers (`views` resolved for the tower's depth)."""
        try:
            return view_groups(self.views, enc.info.num_layers)
        except ConfigError as e:
            raise ExtractError(str(e)) from None

    def default_vision(self) -> DefaultVisionConfig | None:
        """The embedded tower's settings when `vision` is the default, else None."""
        if self.vision != DEFAULT_VISION:
            return None
        base = DefaultVisionConfig()
        return base if self.vision_pretrain_steps is None else replace(base, pretrain_steps=self.vision_pretrain_steps)

    def spool_dir(self) -> Path | None:
        """Where planning copies the `pipe:` and remote (non-local fsspec) input shards it streams, so that the input
        is read once (pipeline/data/stream.py): `spool` as a folder; "auto": OUT.spool beside a local --out (the disk
        the cache is written to), RUN_DIR/spool/<fingerprint of OUT> beside a URL one; "none": no copy (commands run
        again, remote shards are planned by ranged reads of their headers)."""
        if self.spool == "none":
            return None
        if not self.spool.strip():
            raise ExtractError("--spool takes auto, none or a folder, not an empty value")
        if self.spool != "auto":
            return Path(self.spool)
        if is_remote(self.out):
            return Path(self.run_dir) / "spool" / fingerprint({"out": self.out})
        return Path(os.path.abspath(local_root(self.out).rstrip("/")) + ".spool")  # a file:// (or local://) --out: a folder

    def vision_path(self) -> str:
        """Where the tower is loaded from: RUN_DIR/vision for the embedded default, else `vision` (id or folder)."""
        return self.vision if self.default_vision() is None else str(Path(self.run_dir) / "vision")


@dataclass
class ExtractResult:
    url: str
    summary: dict[str, Any]
    shards_written: int
    seconds: float  # extraction alone: from the tower being ready to the finalised cache
    images_per_s: float
    issues: list[SampleIssue] = field(default_factory=list)
    already_complete: bool = False
    tower_seconds: float | None = None  # building (pretraining) or loading the default tower; None for a given --vision


def plan_source(spec: dict[str, Any], *, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, spool_dir: Path | None = None,
                progress: bool = False) -> Plan:
    """Turn a source spec into records (no image is decoded here; tar image members above `max_image_bytes` are
    plan issues; `pipe:` and remote shards are copied to `spool_dir`, `sources.plan_webdataset`)."""
    if spec["kind"] == "llava":
        return sources.plan_llava(spec["json"], spec["image_root"], split=spec["split"])
    if spec["kind"] == "webdataset":
        return sources.plan_webdataset(spec["shards"], split=spec["split"], max_image_bytes=max_image_bytes, spool_dir=spool_dir,
                                       progress=progress)
    return synthetic_plan(spec["n"], spec["seed"])


# --- DataLoader side: runs in worker processes ------------------------------------------------------------------
class _ImageDataset(Dataset):
    """Loads (under `access`), decodes (under max_pixels, the preprocessing's working size included) and preprocesses
    one planned record; never raises for a bad sample."""

    def __init__(self, records: Sequence[SampleRecord], rows: Sequence[int], pre: ImagePreprocessor, max_pixels: int,
                 access: ImageAccess):
        self.records, self.rows, self.pre, self.max_pixels, self.access = records, list(rows), pre, max_pixels, access

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        rec = self.records[row]
        load = partial(load_image, rec, max_pixels=self.max_pixels, access=self.access, working_pixels=self.pre.working_pixels)
        return _image_item(row, load if rec.has_image else None, self.pre)


def _image_item(row: int, load: Callable[[], Image.Image] | None, pre: ImagePreprocessor) -> dict[str, Any]:
    """Row `row` as the loaders yield it: the preprocessed pixels [3, H, W] and the image's size, or the reason the image
    could not be used (`load` is None for a row without an image); never raises."""
    item: dict[str, Any] = {"row": row, "pixels": None, "size": (-1, -1), "error": None}
    if load is None:
        return item
    try:
        img = load()
        item["size"] = img.size
        item["pixels"] = pre(img)
    except SampleError as e:
        item["error"] = e.reason
    except Exception as e:  # an unexpected failure still names the sample instead of killing the run
        item["error"] = f"unexpected {type(e).__name__}: {e}"
    return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [it for it in items if it["pixels"] is not None]
    pixels = torch.from_numpy(np.stack([it["pixels"] for it in ok])) if ok else None
    return {"items": items, "pixels": pixels}


def tar_batches(records: Sequence[SampleRecord], batches: Sequence[Sequence[int]]) -> list[tuple[str | None, list[int]]]:
    """The batches split where the input shard of their images changes: [(input shard or None, rows)], in order.

    A text-only row joins the batch it is in the middle of (None: a batch with no image at all). The split depends on
    the plan alone, so every run (and every resume) forms the same batches.
    """
    out: list[tuple[str | None, list[int]]] = []
    for batch in batches:
        tar: str | None = None
        run: list[int] = []
        for row in batch:
            t = records[row].locator.get("tar") if records[row].has_image else None
            if t is not None and tar is not None and t != tar:
                out.append((tar, run))
                run = []
            tar = t if t is not None else tar
            run.append(row)
        out.append((tar, run))
    return out


class _StreamDataset(IterableDataset):
    """WebDataset rows, each input shard that holds an image of them read once, in offset order
    (pipeline/data/stream.py: a local file or spool copy by offset, a stream front to back), by one DataLoader worker (input shard i goes to worker i mod workers); yields the
    `tar_batches` of that shard collated as `_collate`, a batch as soon as its last image has been read. Images are
    decoded and preprocessed under the same limits as `_ImageDataset`; never raises for a bad sample.

    Memory: a worker holds the encoded bytes of the images of its batches not yet complete: members of one sample
    stored apart (a key's image after another key's) are the only way to have more than one batch open, so this is one
    batch for a tar written the WebDataset way and at most the shard's images for any tar.
    """

    def __init__(self, records: Sequence[SampleRecord], batches: Sequence[Sequence[int]], pre: ImagePreprocessor,
                 max_pixels: int, access: ImageAccess, pipes: frozenset[str] = frozenset(), spool_dir: Path | None = None):
        self.records, self.pre, self.max_pixels, self.access = records, pre, max_pixels, access
        self.pipes = pipes  # the `pipe:` commands --wds names: no other command is run, whatever a locator says
        self.spool_dir = spool_dir  # planning's copies of `pipe:` and remote shards, read instead of the input
        self.groups: dict[str | None, list[list[int]]] = {}  # input shard -> its batches, in plan order
        for tar, rows in tar_batches(records, batches):
            self.groups.setdefault(tar, []).append(rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, (tar, batches) in enumerate(self.groups.items()):
            if i % workers == worker:
                yield from self._shard(tar, batches)

    def _item(self, row: int, data: bytes | SampleError | None) -> dict[str, Any]:
        """A streamed member's bytes (or why it could not be read; None for a row without an image) as a loader item."""
        def load() -> Image.Image:
            if isinstance(data, SampleError):
                raise data
            return decode_image(data, max_pixels=self.max_pixels, working_pixels=self.pre.working_pixels)

        return _image_item(row, None if data is None else load, self.pre)

    def _shard(self, tar: str | None, batches: list[list[int]]) -> Iterator[dict[str, Any]]:
        wanted: dict[tuple[str, int], int] = {}  # (member, data offset) -> row
        waiting: list[int] = []  # per batch: images not read yet
        batch_of: dict[int, int] = {}
        for b, rows in enumerate(batches):
            images = [r for r in rows if self.records[r].has_image]
            waiting.append(len(images))
            for r in images:
                loc = self.records[r].locator
                wanted[(loc["member"], int(loc["offset"]))] = r
                batch_of[r] = b
        got: dict[int, bytes | SampleError] = {}
        for b in [b for b, n in enumerate(waiting) if n == 0]:  # text-only batches
            yield _collate([self._item(r, None) for r in batches[b]])
        if tar is None:
            return
        if is_pipe(tar) and tar not in self.pipes:
            refused = SampleError(f"input shard {tar!r} is a command that --wds does not name; not run")
            members: Iterator[tuple[int, bytes | SampleError]] = ((row, refused) for row in wanted.values())
        else:
            spool = spool_path(self.spool_dir, tar) if self.spool_dir is not None else None
            members = read_members(tar, wanted, self.access.max_bytes, spool=spool if spool is not None and spool.is_file() else None)
        for row, data in members:
            got[row] = data
            b = batch_of[row]
            waiting[b] -= 1
            if waiting[b] == 0:
                yield _collate([self._item(r, got.pop(r, None)) for r in batches[b]])


def _loader(cfg: ExtractConfig, records: Sequence[SampleRecord], batches: list[list[int]], pre: ImagePreprocessor,
            device: torch.device, local_world: int = 1) -> DataLoader:
    """The DataLoader of `batches`: WebDataset rows streamed by input shard (`_StreamDataset`), the others by record
    (`_ImageDataset`); `cfg.loader_workers` processes."""
    workers = cfg.loader_workers(device, local_world)
    common: dict[str, Any] = dict(num_workers=workers, pin_memory=device.type == "cuda",
                                  worker_init_fn=worker_init_fn(workers), prefetch_factor=4 if workers else None)
    if cfg.source_spec()["kind"] == "webdataset":
        ds = _StreamDataset(records, batches, pre, cfg.max_pixels, cfg.image_access(), sources.pipe_shards(cfg.wds or ""),
                            cfg.spool_dir())
        return DataLoader(ds, batch_size=None, collate_fn=_as_collated, **common)
    rows = [r for b in batches for r in b]
    pos = {r: i for i, r in enumerate(rows)}
    return DataLoader(_ImageDataset(records, rows, pre, cfg.max_pixels, cfg.image_access()),
                      batch_sampler=[[pos[r] for r in b] for b in batches], collate_fn=_collate, **common)


def _as_collated(batch: dict[str, Any]) -> dict[str, Any]:
    """A `_StreamDataset` batch is collated in the worker already."""
    return batch


def shard_batches(writer: CacheWriter, shards: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Batches of storage rows that never straddle an output shard."""
    for k in shards:
        a, b = writer.shard_rows(k)
        for s in range(a, b, batch_size):
            yield list(range(s, min(b, s + batch_size)))


# --- background stages: the writer pool and the text embedder ---------------------------------------------------
WRITER_THREADS = {"cpu": 1}  # writer threads by device type (others: CUDA_WRITER_THREADS); zarr compresses a shard's chunks in parallel itself
CUDA_WRITER_THREADS = 4  # on an accelerator the host's cores encode and write while the device computes
TEXT_AHEAD = 4  # extraction batches whose instruction embeddings may wait, computed, for the image path
TEXT_THREAD = {"cpu": True}  # whether the text stage has its own thread, by device type (others: True)


class _TextStage:
    """The instruction embeddings of each extraction batch, computed ahead of the image path in a thread.

    The instructions of one output shard are embedded together, once per distinct text (`InstructionEmbedder.
    embed_texts` over the turns of the shard's image rows, all of them, by the plan), and each batch takes its rows'
    vectors from that table. A shard's table depends only on the plan and the layout, so every run, every resume (a
    shard is redone whole), every rank and inline embedding store the same bits (the sentence model's output depends on
    which texts share a padded batch). Templated data repeats its instructions across batches: the built-in data has 65
    distinct instructions in a 256-row shard against 163 over its 32-row batches, and LLaVA-Pretrain's captions use a
    handful of prompts. The thread assumes every image of a batch decodes; `get` builds a batch again in the calling
    thread when one did not, and for every batch once the loader's batches leave the planned order (streamed sources:
    any order is correct, the planned one is fast), from the same shard tables. At most `ahead` computed batches wait.
    On a CPU the sentence model runs with one intra-op thread wherever it is called (`text.TEXT_CPU_THREADS`).
    """

    def __init__(self, text: InstructionEmbedder, records: Sequence[SampleRecord], batches: Sequence[Sequence[int]], max_turns: int,
                 shard_samples: int, *, background: bool = True, ahead: int = TEXT_AHEAD, device: torch.device | None = None):
        self.text, self.records, self.max_turns, self.shard_samples = text, records, max_turns, shard_samples
        self.planned = [tuple(b) for b in batches]
        self.next = 0  # the planned batch `get` expects
        self.q: queue.Queue[Any] = queue.Queue(maxsize=max(1, ahead))
        self.stop = threading.Event()
        if not background:
            self.stop.set()  # inline: `get` embeds every batch
        self.stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None  # beside the forward's
        self.tables: dict[threading.Thread, tuple[int, dict[str, np.ndarray]]] = {}  # per thread: its last shard's table
        self.thread = threading.Thread(target=self._run, name="layerfuse-text", daemon=True)
        if background:
            self.thread.start()

    def _table(self, shard: int) -> dict[str, np.ndarray]:
        """The embedding of each distinct instruction of output shard `shard`'s image rows (kept for the next call)."""
        me = threading.current_thread()
        if (kept := self.tables.get(me)) is not None and kept[0] == shard:
            return kept[1]
        start, stop = shard * self.shard_samples, min(len(self.records), (shard + 1) * self.shard_samples)
        table = self.text.embed_texts(t for r in range(start, stop) if self.records[r].has_image
                                      for t in self.text.turns(self.records[r].conversations, self.max_turns))
        self.tables[me] = (shard, table)
        return table

    def _embed(self, rows: Sequence[int], has_image: Sequence[bool]) -> TextBatch:
        """Rows of one output shard (a batch never straddles one) -> [B, M, d], [B], [B, d]."""
        table = self._table(rows[0] // self.shard_samples) if rows else {}
        return self.text.embed([self.records[r].conversations for r in rows], list(has_image), self.max_turns, table)

    def _run(self) -> None:
        try:
            with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                for rows in self.planned:
                    if self.stop.is_set():
                        return
                    flags = [self.records[r].has_image for r in rows]
                    self._put((flags, self._embed(rows, flags)))
        except BaseException as e:  # raised in the main thread by get
            self._put(e)

    def _put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                return self.q.put(item, timeout=0.1)
            except queue.Full:
                pass

    def get(self, rows: Sequence[int], has_image: Sequence[bool]) -> TextBatch:
        """The embeddings of the loader batch `rows` (storage rows) whose images decoded as `has_image`."""
        if not self.stop.is_set() and self.next < len(self.planned) and tuple(rows) == self.planned[self.next]:
            self.next += 1
            item = self.q.get()
            if isinstance(item, BaseException):
                raise item
            flags, emb = item
            if flags == list(has_image):
                return emb
        else:
            self.stop.set()  # the loader left the planned order: embed inline from here on
        return self._embed(rows, has_image)

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


class _ShardBuffer:
    """Accumulates one output shard's rows until all are filled."""

    def __init__(self, index: int, start: int, stop: int, pool: FeaturePool, max_turns: int, text_dim: int, device: torch.device):
        n = stop - start
        self.index, self.start, self.stop, self.filled = index, start, stop, 0
        self.parts = pool.take(n)  # features [n, K+V, T, D] (+ quant/scale, quant/outliers), recycled: rows written below
        # this shard's quantisation error, summed on the extraction device (no host sync per layer)
        self.stats = ErrorStats(pool.feat_shape[0], device) if pool.encoding.scheme is not None else None
        self.turns = np.zeros((n, max_turns, text_dim), np.float32)
        self.mean = np.zeros((n, text_dim), np.float32)
        self.num_turns = np.zeros(n, np.int16)
        self.status = np.zeros(n, np.uint8)
        self.size = np.full((n, 2), -1, np.int32)
        self.errors: list[dict[str, Any]] = []

    @property
    def full(self) -> bool:
        return self.filled == self.stop - self.start

    def result(self) -> ShardResult:
        FeaturePool.blank(self.parts, self.status)
        parts = dict(self.parts)
        return ShardResult(self.index, self.start, self.stop, parts.pop(FEATURES), self.turns, self.mean, self.num_turns, self.status,
                           self.size, self.errors, parts, None if self.stats is None else self.stats.host())


class _Storer:
    """The tower's hidden states as the cache stores them: the stored layers, then the group-mean views (computed in
    float32 from the tower's output), checked, and encoded (quantised for int8/float8) on the device before the copy
    to the host.

    The check: an image whose stored inputs hold nan or inf, or values beyond what the storage dtype holds finite
    (float16: |x| >= 65520), is not stored. Its row is zeroed and recorded as skipped (issue stage "encoder"), like an
    image that does not decode: a tower computing in float16 can overflow on one image, and a million-image run should
    neither stop there nor store infinities that poison every mean a fuser takes over them."""

    def __init__(self, storage: dict[str, Any], num_layers: int, device: torch.device,
                 encoding: FeatureEncoding | None = None):
        stored = [int(i) for i in storage["layers"]]
        self.views = [torch.tensor(v, device=device) for v in storage.get("views", [])]
        self.select = None if stored == list(range(num_layers + 1)) else torch.tensor(stored, device=device)
        self.inputs = len(stored) + len(self.views)  # K + V
        self.names = [input_name(i) for i in stored] + [input_name(v) for v in storage.get("views", [])]
        self.encoding = encoding or FeatureEncoding.from_storage(storage)

    def block(self, hs: torch.Tensor) -> torch.Tensor:
        """hs [B, L+1, T, D] -> [B, K+V, T, D] (float32 when views are appended)."""
        if self.select is None and not self.views:
            return hs
        means = [hs.index_select(1, v).float().mean(1, keepdim=True) for v in self.views]  # [B, 1, T, D] each, fp32
        kept = hs if self.select is None else hs.index_select(1, self.select)  # [B, K, T, D]
        return torch.cat([kept.float(), *means], dim=1) if means else kept

    @torch.inference_mode()
    def write(self, hs: torch.Tensor, buf: _ShardBuffer, rows: np.ndarray) -> dict[int, str]:
        """The stored parts of hs [B, L+1, T, D] (images of one output shard) written into buf's rows `rows` [B]
        (shard-relative), one converting copy from the device per run of consecutive rows; the quantisation error of
        the valid images is added to buf.stats. Returns {i: why} for the images `FeatureEncoding.check` refused
        (positions in the batch), whose rows the caller records as skipped."""
        block = self.block(hs)
        absmax, valid = self.encoding.check(block)
        self.encoding.encode_rows(block, buf.parts, rows, buf.stats, valid)
        return self.encoding.refusals(absmax, valid, self.names)  # after the copies above: no wait left on the device


def _calibrate(cfg: ExtractConfig, enc: VisionEncoder, storage: dict[str, Any], records: Sequence[SampleRecord],
               device: torch.device) -> FeatureEncoding:
    """The cache's feature encoding; for int8 the outlier channels, chosen from the absmax of the first
    CALIBRATION_IMAGES readable images in storage order (so every rank and every resumed run uses the same)."""
    storer = _Storer(storage, enc.info.num_layers, device, FeatureEncoding(StorageDtype(cfg.dtype)))
    if StorageDtype(cfg.dtype) is not StorageDtype.INT8:
        return FeatureEncoding.calibrate(cfg.dtype, None, storer.inputs)
    rows = [i for i, r in enumerate(records) if r.has_image]
    pre, serial = enc.preprocessor(cfg.pad_to_square), replace(cfg, workers=0)
    absmax, start, seen = None, 0, 0
    bs = cfg.forward_batch(device, enc.info.num_tokens)
    with tqdm(total=CALIBRATION_IMAGES, unit="img", desc="calibrate int8", disable=not cfg.progress, leave=False) as bar:
        while seen < CALIBRATION_IMAGES and start < len(rows):  # the next rows, as many as images are still wanted
            window = rows[start:start + CALIBRATION_IMAGES - seen]
            start += len(window)
            batches = [window[i:i + bs] for i in range(0, len(window), bs)]
            for batch in _loader(serial, records, batches, pre, device):  # the extraction's own reading path
                if batch["pixels"] is not None:  # bad images are recorded when their shard is extracted
                    with torch.inference_mode():
                        block = storer.block(enc(batch["pixels"].to(device)))  # [b, K+V, T, D]
                        block = block[storer.encoding.check(block)[1]]  # images the cache will not store do not calibrate it
                    if len(block):
                        absmax = running_absmax(absmax, block)
                    seen += len(block)
                    bar.update(len(block))
    return FeatureEncoding.calibrate(cfg.dtype, absmax, storer.inputs)


# --- orchestration ------------------------------------------------------------------------------------------------
def _config_record(cfg: ExtractConfig, enc: VisionEncoder, vision_path: str, shard_samples: int, chunk_samples: int) -> dict[str, Any]:
    return {
        "source": cfg.source_spec(),
        "vision": {"name": cfg.vision, "path": vision_path, "revision": cfg.vision_revision, "config_hash": enc.info.config_hash,
                   **({"default": asdict(dv)} if (dv := cfg.default_vision()) else {})},
        "pad_to_square": cfg.pad_to_square,
        "dtype": cfg.dtype,
        "text_model": cfg.text_model,
        "suffixes": list(cfg.suffixes),
        "shard_samples": shard_samples,
        "chunk_samples": chunk_samples,
        "clevel": cfg.clevel,
        **({"codec": cfg.codec} if cfg.codec != LEGACY_CODEC else {}),  # the codec before it was an option: hashes as before
        "max_pixels": cfg.max_pixels,
        # recorded only when not the default, so that caches made before the option existed keep their config hash
        **({"max_image_bytes": cfg.max_image_bytes} if cfg.max_image_bytes != DEFAULT_MAX_IMAGE_BYTES else {}),
        # the resolved indices (two spellings of one set are one cache), recorded only for a subset (hashes as before)
        **({"layers": stored} if (stored := cfg.stored_layers(enc)) != list(range(enc.info.num_layers + 1)) else {}),
        **({"views": [list(v) for v in views]} if (views := cfg.view_groups(enc)) else {}),
    }


def storage_layout(cfg: ExtractConfig, enc: VisionEncoder) -> tuple[int, int]:
    """(shard_samples, chunk_samples) for this encoder and dtype.

    A chunk is [c, 1, T, D]: one layer of c samples, c chosen so a chunk holds about `chunk_kib` (1 for real
    encoders, whose single-layer slices are already ~1 MiB; more for tiny ones, where per-chunk overhead
    would dominate). A shard is [S, K, T, D] (K = the stored hidden states) with S a multiple of c, about
    `shard_mib` uncompressed.

    Sizes are counted in the dtype features are read in (float16 for int8 and float8_e4m3fn), so a quantised cache
    has the rows per chunk and shard of the float16 cache of the same source: phase two's chunk-aligned epoch plan then
    gives it the same data order for the same seed, and a training step sees the quantisation only in the values
    (BENCHMARKS.md "Storage": with twice the rows per chunk, data order alone moved category accuracy more than int8).
    """
    layer_bytes = enc.info.num_tokens * enc.info.hidden_size * StorageDtype.parse(cfg.dtype, "--dtype").read_dtype.itemsize
    stored = len(cfg.stored_layers(enc)) + len(cfg.view_groups(enc))
    shard = int(cfg.shard_samples or max(1, min(256, (cfg.shard_mib << 20) // (layer_bytes * stored))))
    want = max(1, min(shard, -(-(cfg.chunk_kib << 10) // layer_bytes)))
    chunk = max(d for d in range(1, want + 1) if shard % d == 0)
    return shard, chunk


def _check_space(cfg: ExtractConfig, enc: VisionEncoder, text_dim: int, max_turns: int, plan: Plan, shard_samples: int,
                 chunk_samples: int) -> None:
    """Print the size estimate of the cache about to be written (`layerfuse cache plan`'s) and refuse a target with
    less free space than it, unless --force."""
    estimate = plan_cache(enc.info, max(1, len(plan.records)), shard_samples=shard_samples, chunk_samples=chunk_samples,
                          layers=cfg.stored_layers(enc), views=len(cfg.view_groups(enc)), dtype=cfg.dtype, text_dim=text_dim,
                          max_turns=max_turns)
    free = free_bytes(cfg.out)
    if cfg.progress:
        tqdm.write(estimate.format(cfg.out))
    if estimate.fits(free) is False and not cfg.force:
        raise ExtractError(f"'{cfg.out}' has {free / 1e9:.2f} GB free, and the cache needs about {estimate.disk_bytes / 1e9:.2f} GB "
                           f"(`layerfuse cache plan` explains the estimate); free space, choose another --out, or pass --force")


def _spooled(cfg: ExtractConfig, records: Sequence[SampleRecord]) -> list[Path]:
    """The spool files of the input shards of `records` that exist."""
    folder = cfg.spool_dir()
    if folder is None or cfg.wds is None or not folder.is_dir():
        return []
    tars = sorted({t for r in records if (t := r.locator.get("tar"))})
    return [p for t in tars if (p := spool_path(folder, t)).is_file()]


def _report_spool(cfg: ExtractConfig, records: Sequence[SampleRecord]) -> None:
    if (files := _spooled(cfg, records)) and cfg.progress:
        tqdm.write(f"spooled {len(files)} input shard(s) (pipe: or remote), {sum(p.stat().st_size for p in files) / 1e9:.2f} GB, "
                   f"in {cfg.spool_dir()}: extraction reads these copies (removed once the cache is complete)")


def _remove_spool(cfg: ExtractConfig, records: Callable[[], Sequence[SampleRecord]]) -> None:
    """Delete this extraction's spool files (and their folder, once empty): the cache is complete. `records` is only
    called when there is a spool folder."""
    folder = cfg.spool_dir()
    if folder is None or not folder.is_dir():
        return
    for p in _spooled(cfg, records()):
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _existing_meta(cfg: ExtractConfig) -> dict[str, Any] | None:
    try:
        return dict(open_group(cfg.out, "r", cfg.storage_options or None).attrs.get(ATTRS_KEY) or {}) or None
    except (FileNotFoundError, KeyError):
        return None


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in StorageDtype.float_names():
        raise ExtractError(f"--compute-dtype must be auto or one of {', '.join(StorageDtype.float_names())}, not {name!r}")
    return StorageDtype(name).torch_dtype


def run_extract(cfg: ExtractConfig) -> ExtractResult:
    """Extract (or resume extracting) a cache. Safe to kill at any moment and run again."""
    try:
        StorageDtype.parse(cfg.dtype, "--dtype")
    except ValueError as e:
        raise ExtractError(str(e)) from None
    check_choices(cfg, name=lambda path: "--" + path.replace("_", "-"), error=ExtractError)
    spec = cfg.source_spec()
    cfg.image_access()  # a bad --allow-urls fails before any work
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork DataLoader workers after loading a tokenizer
    ctx = DistContext.from_env()
    try:
        return _run(cfg, spec, ctx)
    finally:
        ctx.close()


def _run(cfg: ExtractConfig, spec: dict[str, Any], ctx: DistContext) -> ExtractResult:
    t0 = time.perf_counter()
    device = ctx.device(cfg.device)
    vision_path = cfg.vision_path()
    default_vision = cfg.default_vision()
    tower_seconds = None
    if default_vision is not None:
        if ctx.is_main:
            build_default_vision(vision_path, default_vision, progress=cfg.progress, device=device)
        ctx.barrier()
        tower_seconds = time.perf_counter() - t0
    started = time.perf_counter()  # the extraction's own time starts with a ready tower
    enc = load_vision_encoder(vision_path, revision=cfg.vision_revision, device=device, dtype=_compute_dtype(cfg.compute_dtype, device))
    text = InstructionEmbedder(cfg.text_model, device=str(device), suffixes=cfg.suffixes, batch_size=cfg.text_batch_size)
    shard_samples, chunk_samples = storage_layout(cfg, enc)
    config = _config_record(cfg, enc, vision_path, shard_samples, chunk_samples)
    chash = fingerprint(config)

    if ctx.is_main:
        old = _existing_meta(cfg)
        fresh = cfg.overwrite or not old or not old.get("planned")
        if not fresh and old.get("format_version") != FORMAT_VERSION:
            if old.get("complete"):
                raise ExtractError(
                    f"'{cfg.out}' holds a finished cache of format {old.get('format_version')}; this layerfuse writes and reads "
                    f"format {FORMAT_VERSION} (per-layer checksums, manifest): pass --overwrite to extract it again"
                )
            fresh = True  # an unfinished cache of an older format: its shards are redone in this one
        if not fresh and old.get("config_hash") != chash:
            raise ExtractError(
                f"'{cfg.out}' holds a cache made with other settings (differs in: {', '.join(_diff(old.get('config', {}), config))}); "
                f"pass --overwrite to replace it, or choose another --out"
            )
        if fresh:
            plan = plan_source(spec, max_image_bytes=cfg.max_image_bytes, spool_dir=cfg.spool_dir(), progress=cfg.progress)
            _report_spool(cfg, plan.records)
            if cfg.strict and plan.issues:  # a malformed record first, else a repair: --strict accepts neither
                first = next((i for i in plan.issues if i.stage == "plan"), plan.issues[0])
                what = "" if first.stage == "plan" else ", repaired: --strict refuses repairs"
                raise ExtractError(f"--strict: sample {first} [{first.source}{what}]")
            max_turns = max_human_turns([r.conversations for r in plan.records])
            _check_space(cfg, enc, text.dim, max_turns, plan, shard_samples, chunk_samples)
            meta = {
                "layerfuse_version": __version__,
                "config": config,
                "config_hash": chash,
                "encoder": {
                    **{k: v for k, v in asdict(enc.info).items() if k != "processor"},
                    "name": describe(default_vision) if default_vision else cfg.vision,
                    "path": vision_path,
                },
                "processor": {**enc.info.processor, "pad_to_square": cfg.pad_to_square, "pad_fill": list(enc.preprocessor(cfg.pad_to_square).fill)},
                "storage": {"dtype": cfg.dtype, "layers": cfg.stored_layers(enc), "views": [list(v) for v in cfg.view_groups(enc)], "shard_samples": shard_samples, "chunk_samples": chunk_samples, "codec": cfg.codec, "clevel": cfg.clevel, "compressor": compressor_name(cfg.codec, cfg.clevel)},
                "text": {"model": cfg.text_model, "path": text.path, "dim": text.dim, "max_turns": max_turns, "suffixes": list(cfg.suffixes)},
            }
            encoding = _calibrate(cfg, enc, meta["storage"], plan.records, device)
            meta["storage"].update(encoding.storage_record(len(meta["storage"]["layers"]) + len(meta["storage"]["views"])))
            CacheWriter.create(cfg.out, meta, plan.records, plan.issues, storage_options=cfg.storage_options or None)
    ctx.barrier()
    writer = CacheWriter(cfg.out, cfg.storage_options or None)
    if writer.meta.get("complete") and writer.meta.get("config_hash") == chash:
        if ctx.is_main:
            _remove_spool(cfg, writer.records)
        return ExtractResult(cfg.out, writer.meta.get("summary", {}), 0, time.perf_counter() - started, 0.0, already_complete=True,
                             tower_seconds=tower_seconds)

    records = writer.records()
    shards = writer.pending_shards(ctx.rank, ctx.world)
    n_images = _process(cfg, ctx, writer, enc, text, records, shards, device)
    ctx.barrier()
    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {}
    if ctx.is_main:
        summary = writer.finalize()
        _remove_spool(cfg, lambda: records)
    ctx.barrier()
    return ExtractResult(cfg.out, summary, len(shards), elapsed, n_images / max(elapsed, 1e-9), tower_seconds=tower_seconds)


def _process(
    cfg: ExtractConfig,
    ctx: DistContext,
    writer: CacheWriter,
    enc: VisionEncoder,
    text: InstructionEmbedder,
    records: list[SampleRecord],
    shards: list[int],
    device: torch.device,
) -> int:
    """Extract this rank's pending shards; returns the number of images encoded."""
    if not shards:
        return 0
    info = enc.info
    storer = _Storer(writer.meta["storage"], info.num_layers, device)
    feat_shape = (storer.inputs, info.num_tokens, info.hidden_size)
    max_turns = int(writer.meta["text"]["max_turns"])
    batches = list(shard_batches(writer, shards, cfg.forward_batch(device, info.num_tokens)))
    rows = [r for b in batches for r in b]
    loader = _loader(cfg, records, batches, enc.preprocessor(cfg.pad_to_square), device, ctx.local_world)
    # Fork the DataLoader workers now, before the text thread runs torch code: a worker forked while another thread holds
    # a libc lock (e.g. glibc's atexit lock, taken when torch first registers a static destructor) hangs for ever.
    loaded = iter(loader)
    pool = FeaturePool(storer.encoding, feat_shape, pin=device.type == "cuda")
    sink = ShardWriterPool(writer, threads=WRITER_THREADS.get(device.type, CUDA_WRITER_THREADS), done=pool.give)
    texts = _TextStage(text, records, batches, max_turns, writer.shard_samples, background=TEXT_THREAD.get(device.type, True),
                       device=device)
    buffers: dict[int, _ShardBuffer] = {}
    n_images = n_skipped = n_encoded = 0
    bar = tqdm(
        total=len(rows),
        unit="img",
        desc="extract" if ctx.world == 1 else f"extract[rank {ctx.rank}]",
        disable=not cfg.progress,
        position=ctx.rank if ctx.world > 1 else None,
        dynamic_ncols=True,
    )
    try:
        for batch in loaded:
            items = batch["items"]
            hs = enc(batch["pixels"].to(device, non_blocking=True)) if batch["pixels"] is not None else None  # [B, L+1, T, D]
            status = []
            for it in items:
                rec = records[it["row"]]
                if it["error"] is not None:
                    status.append(SKIPPED)
                    if cfg.strict:
                        raise ExtractError(f"--strict: sample {rec.id} ({rec.image_ref or rec.locator}): {it['error']}")
                else:
                    status.append(OK if rec.has_image else TEXT_ONLY)
            emb = texts.get([it["row"] for it in items], [s == OK for s in status])  # computed ahead, in its own thread
            for it in items:
                if (k := it["row"] // writer.shard_samples) not in buffers:
                    buffers[k] = _ShardBuffer(k, *writer.shard_rows(k), pool, max_turns, text.dim, device)
            image_rows = np.asarray([it["row"] for it, st in zip(items, status) if st == OK], np.int64)
            unstored: dict[int, str] = {}  # row -> why the encoder's output of its image is not stored
            if hs is not None and len(image_rows):  # a batch never straddles an output shard (shard_batches)
                buf = buffers[int(image_rows[0]) // writer.shard_samples]
                refused = storer.write(hs, buf, image_rows - buf.start)
                unstored = {int(image_rows[i]): why for i, why in refused.items()}
                n_encoded += len(image_rows)
                if n_images == 0 and len(unstored) == len(image_rows) and n_encoded >= REFUSED_PROBE:
                    row, why = next(iter(unstored.items()))
                    raise ExtractError(
                        f"the first {n_encoded} images encoded were all refused, so none would be stored (e.g. sample "
                        f"{records[row].id}: {why}); store another --dtype (bfloat16 or int8 hold large values) or compute "
                        "in another --compute-dtype, with --overwrite")
            for i, (it, st) in enumerate(zip(items, status)):
                row = it["row"]
                k = row // writer.shard_samples
                buf = buffers[k]
                r = row - buf.start
                rec = records[row]
                stage, why = "image", it["error"]
                if row in unstored:
                    st, stage, why = SKIPPED, "encoder", unstored[row]
                    if cfg.strict:
                        raise ExtractError(f"--strict: sample {rec.id} ({rec.image_ref or rec.locator}): {why}")
                buf.status[r], buf.size[r] = st, it["size"]
                if st == SKIPPED:  # no features, no instruction embedding (as for every skipped row)
                    buf.turns[r], buf.mean[r], buf.num_turns[r] = 0, 0, 0
                    buf.errors.append({"row": row, "id": rec.id, "stage": stage, "reason": why, "where": rec.image_ref})
                    n_skipped += 1
                else:
                    buf.turns[r], buf.mean[r], buf.num_turns[r] = emb.turns[i], emb.mean[i], emb.num_turns[i]
                buf.filled += 1
                if buf.full:
                    sink.submit(buffers.pop(k).result())
            n_images += len(image_rows) - len(unstored)
            bar.update(len(items))
            if n_skipped:
                bar.set_postfix(skipped=n_skipped, refresh=False)
    finally:
        bar.close()
        texts.close()
        sink.close()
    return n_images
