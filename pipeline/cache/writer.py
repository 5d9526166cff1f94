"""Writing a cache: layout creation, per-shard writes with completion markers, and finalisation.

Crash safety (docs/cache-format.md, "Writing protocol"):
1. `create` writes every array (empty) and the per-sample tables, then sets `planned` in the root attributes.
2. Each output shard k (storage rows [k*S, (k+1)*S)) is written whole by exactly one process, then its marker
   `progress/shard-<k>.json` is written. A shard without a readable marker is redone from scratch.
3. `finalize` gathers the markers into the status/checksum/issue arrays and sets `complete`.
Every step is idempotent, so a process killed at any moment is resumed by running the same command again.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import LocalStore

from layerfuse.core.atomic import replacing, write_bytes
from layerfuse.pipeline.cache.encoding import FEATURES, QUANT_KEY, FeatureEncoding
from layerfuse.pipeline.cache.integrity import MANIFEST_KEY, block_checksums, build_manifest, parts_checksums, text_checksums
from layerfuse.pipeline.cache.quantize import ErrorStats
from layerfuse.pipeline.cache.shard_object import ShardObject
from layerfuse.pipeline.cache.reader import (
    ATTRS_KEY,
    DIGESTED_TABLES,
    FEATURE_CHECKSUMS,
    FORMAT,
    FORMAT_VERSION,
    ISSUE_FIELDS,
    OK,
    PENDING,
    ROW_CHECKSUMS,
    SAMPLE_FIELDS,
    SKIPPED,
    TEXT_ONLY,
    CacheError,
    cache_arrays,
    open_group,
    split_url,
)
from layerfuse.pipeline.data.records import SampleIssue, SampleRecord

TABLE_CHUNK = 16384


def put_file(fs, path: str, data: bytes) -> None:
    """Write a small object whole: on local disks atomically (core/atomic.py), elsewhere by one PUT (object stores
    replace objects atomically)."""
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        write_bytes(path, data)
    else:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)


Codec = Literal["zstd", "blosc-zstd", "blosc-lz4", "none"]
DEFAULT_CODEC: Codec = "zstd"
LEGACY_CODEC: Codec = "blosc-zstd"  # a cache whose storage record names no codec was written with this one


def compressor(codec: Codec, level: int) -> BytesBytesCodec | None:
    """The chunk compressor of a cache (BENCHMARKS.md "Codecs", one core, chunks shaped like the cache's):
    zstd level 1 (the default) stores fp16 hidden states at 0.92 of raw at 633 MB/s encode per core, int8 at 0.90;
    blosc zstd-3 with byte shuffle (the default before, recorded as "blosc-zstd") stores the same bytes at 398 MB/s
    (blosc level c runs zstd at 2c-1); blosc lz4 bitshuffle is faster (968 MB/s) but saves less and varies with the
    data; "none" stores raw chunks. At 500 images/s of CLIP ViT-L/14-336, zstd-1 needs 23 cores, blosc zstd-3 37."""
    if codec == "zstd":
        return ZstdCodec(level=level)
    if codec == "blosc-zstd":
        return BloscCodec(cname="zstd", clevel=level, shuffle="shuffle")
    if codec == "blosc-lz4":
        return BloscCodec(cname="lz4", clevel=level, shuffle="bitshuffle")
    if codec == "none":
        return None
    raise ValueError(f"unknown codec {codec!r}")


def compressor_name(codec: Codec, level: int) -> str:
    return {"zstd": f"zstd-{level}", "blosc-zstd": f"blosc-zstd-{level}-shuffle", "blosc-lz4": f"blosc-lz4-{level}-bitshuffle",
            "none": "none"}[codec]


@dataclass
class ShardResult:
    """Everything one output shard contributes; rows are storage rows [start, stop)."""

    index: int
    start: int
    stop: int
    features: np.ndarray  # [n, K, T, D] storage dtype (int8 codes, float8 bits as uint8), the K stored hidden states + views
    text_turns: np.ndarray  # [n, M, d_s] float32
    text_mean: np.ndarray  # [n, d_s] float32
    num_turns: np.ndarray  # [n] int16
    status: np.ndarray  # [n] uint8
    image_size: np.ndarray  # [n, 2] int32
    errors: list[dict[str, Any]] = field(default_factory=list)  # {"row", "id", "reason", "where"}
    quant: dict[str, np.ndarray] = field(default_factory=dict)  # quantised dtypes: quant/scale [n, K, T], quant/outliers [n, K, T, n_o]
    quant_error: ErrorStats | None = None  # quantised dtypes: the error sums of this shard's images

    def parts(self) -> dict[str, np.ndarray]:
        """Every stored part of the features, in checksum order (features, then quant/scale, quant/outliers)."""
        return {FEATURES: self.features, **self.quant}

    def marker(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "shard": self.index,
            "rows": [self.start, self.stop],
            "status": self.status.tolist(),
            "image_size": self.image_size.tolist(),
            "num_turns": self.num_turns.tolist(),
            "crc_features": parts_checksums(list(self.parts().values()), axes=2).tolist(),  # [n][K]
            "crc_turns": block_checksums(self.text_turns).tolist(),
            "crc_mean": block_checksums(self.text_mean).tolist(),
            "errors": self.errors,
            **({"quant_error": self.quant_error.to_json()} if self.quant_error is not None else {}),
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


class CacheWriter:
    """Writes one cache; several processes may hold writers on the same cache, each on its own shards."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url)
        self.storage_options = storage_options
        self.fs, self.root = split_url(url, storage_options)
        self.group = open_group(url, "r+", storage_options)
        self.meta: dict[str, Any] = dict(self.group.attrs[ATTRS_KEY])
        self._shard_objects: dict[str, tuple[ShardObject, zarr.Array] | None] = {}

    # --- layout -------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        url: str,
        meta: dict[str, Any],
        records: Sequence[SampleRecord],
        plan_issues: Sequence[SampleIssue],
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> "CacheWriter":
        """Create (overwriting) the cache layout and write the per-sample tables of the plan.

        meta must hold encoder.num_layers (L), encoder.num_tokens (T), encoder.hidden_size (D), text.dim,
        text.max_turns, storage.dtype, storage.shard_samples, storage.chunk_samples, storage.codec and storage.clevel; storage.layers
        (the K stored hidden-state indices) when not all L+1 are stored, storage.views (V group means) when any.
        """
        n = len(records)
        enc, text, storage = meta["encoder"], meta["text"], meta["storage"]
        n_layers = len(storage.get("layers", range(enc["num_layers"] + 1))) + len(storage.get("views", []))  # K + V
        tokens, hidden = enc["num_tokens"], enc["hidden_size"]
        s, c = int(storage["shard_samples"]), int(storage["chunk_samples"])
        codec = compressor(storage.get("codec", LEGACY_CODEC), int(storage["clevel"]))
        if s % c:
            raise ValueError(f"shard_samples {s} is not a multiple of chunk_samples {c}")
        encoding = FeatureEncoding.from_storage(storage)
        dtypes = encoding.part_dtypes()  # bfloat16 as uint16 bit patterns, float8 as uint8
        g = open_group(url, "w", storage_options)
        for path, shape in encoding.part_shapes(tokens, hidden).items():  # features, and the scales/outliers of a quantised dtype
            g.create_array(
                path,
                shape=(n, n_layers, *shape),
                chunks=(c, 1, *shape),
                shards=(s, n_layers, *shape),
                dtype=dtypes[path].name,
                compressors=codec,
                fill_value=0,
                dimension_names=("sample", "layer", "token", "channel")[: 2 + len(shape)],
            )
        m, d = int(text["max_turns"]), int(text["dim"])
        g.create_array("text/turns", shape=(n, m, d), chunks=(s, m, d), dtype="float32", compressors=codec, fill_value=0)
        g.create_array("text/mean", shape=(n, d), chunks=(s, d), dtype="float32", compressors=codec, fill_value=0)
        tchunk = max(1, min(n, TABLE_CHUNK))
        columns = {f: [] for f in SAMPLE_FIELDS}
        for r in records:
            columns["id"].append(r.id)
            columns["source"].append(r.source)
            columns["category"].append(r.category)
            columns["split"].append(r.split)
            columns["image_ref"].append(r.image_ref)
            columns["conversations"].append(json.dumps(r.conversations, ensure_ascii=False))
            columns["locator"].append(json.dumps(r.locator, sort_keys=True))
        for f, values in columns.items():
            a = g.create_array(f"samples/{f}", shape=(n,), chunks=(tchunk,), dtype=str, compressors=codec)
            if n:
                a[:] = np.array(values, dtype=object)
        g.create_array(ROW_CHECKSUMS["samples/conversations"], data=text_checksums(columns["conversations"]), chunks=(tchunk,))
        meta = {
            **meta,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "num_samples_planned": n,
            "num_shards": (n + s - 1) // s,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "complete": False,
            "planned": False,
        }
        g.attrs[ATTRS_KEY] = meta
        fs, root = split_url(url, storage_options)
        put_file(fs, f"{root}/progress/plan-issues.json", json.dumps([i.to_json() for i in plan_issues]).encode())
        meta["planned"] = True  # last: a plan interrupted before this line is redone from scratch
        g.attrs[ATTRS_KEY] = meta
        return cls(url, storage_options)

    @property
    def num_rows(self) -> int:
        return int(self.meta["num_samples_planned"])

    @property
    def shard_samples(self) -> int:
        return int(self.meta["storage"]["shard_samples"])

    @property
    def num_shards(self) -> int:
        return int(self.meta["num_shards"])

    def shard_rows(self, k: int) -> tuple[int, int]:
        return k * self.shard_samples, min(self.num_rows, (k + 1) * self.shard_samples)

    def records(self) -> list[SampleRecord]:
        """The planned records, read back from the cache (so every rank works from the same plan)."""
        cols = {f: self.group[f"samples/{f}"][:] if self.num_rows else [] for f in SAMPLE_FIELDS}
        out = []
        for i in range(self.num_rows):
            loc = json.loads(str(cols["locator"][i]))
            out.append(
                SampleRecord(
                    id=str(cols["id"][i]),
                    source=str(cols["source"][i]),
                    locator=loc,
                    conversations=json.loads(str(cols["conversations"][i])),
                    has_image=bool(loc),
                    category=str(cols["category"][i]),
                    split=str(cols["split"][i]),
                    image_ref=str(cols["image_ref"][i]),
                )
            )
        return out

    # --- shards -----------------------------------------------------------------------------------------------
    def _marker_path(self, k: int) -> str:
        return f"{self.root}/progress/shard-{k:06d}.json"

    def read_marker(self, k: int) -> dict[str, Any] | None:
        """The shard's marker, or None when absent or torn (then the shard is redone)."""
        try:
            m = json.loads(self.fs.cat_file(self._marker_path(k)))
        except (FileNotFoundError, ValueError):
            return None
        ok = m.get("format_version") == FORMAT_VERSION and m.get("shard") == k and len(m.get("status", [])) == m["rows"][1] - m["rows"][0]
        return m if ok else None

    def pending_shards(self, rank: int = 0, world: int = 1) -> list[int]:
        return [k for k in range(rank, self.num_shards, world) if self.read_marker(k) is None]

    def write_shard(self, res: ShardResult) -> None:
        """Write one whole shard (one object per array), then its marker."""
        if (res.start, res.stop) != self.shard_rows(res.index):
            raise ValueError(f"shard {res.index} covers rows {self.shard_rows(res.index)}, got {res.start, res.stop}")
        sl = slice(res.start, res.stop)
        for path, data in res.parts().items():
            if not self._write_shard_object(path, res.index, data):
                self._write_through_zarr(path, sl, data)
        self._write_through_zarr("text/turns", sl, res.text_turns)
        self._write_through_zarr("text/mean", sl, res.text_mean)
        put_file(self.fs, self._marker_path(res.index), json.dumps(res.marker()).encode())

    def _write_shard_object(self, path: str, k: int, data: np.ndarray) -> bool:
        """Shard k of the feature array `path`, encoded in this thread (shard_object.py: zarr's per-chunk threads slow
        a concurrent forward several times more than the compression itself) and written atomically, when the array
        is on a local disk and laid out as `create` lays out feature arrays; False (nothing written) otherwise."""
        if path not in self._shard_objects:
            array = self.group[path]
            layout = ShardObject.of(array)
            local = isinstance(array.store_path.store, LocalStore) and layout is not None and layout.shard[0] == self.shard_samples
            self._shard_objects[path] = (layout, array) if local else None
        found = self._shard_objects[path]
        if found is None:
            return False
        layout, array = found
        key = array.metadata.encode_chunk_key((k,) + (0,) * (data.ndim - 1))
        with replacing(f"{array.store_path.store.root}/{array.path}/{key}") as tmp, open(tmp, "wb") as f:
            for piece in layout.encode(data):
                f.write(piece)
        return True

    def _write_through_zarr(self, path: str, rows: slice, data: np.ndarray) -> None:
        # every chunk is stored, zeros too: zarr's default compares each chunk with the fill value first, an extra
        # pass over the data (measured: 13 ms of 76 per image of CPU for a ViT-L/14-336 shard, zstd-1, on tmpfs)
        self.group[path].with_config({"write_empty_chunks": True})[rows] = data

    # --- finalisation ---------------------------------------------------------------------------------------
    def finalize(self) -> dict[str, Any]:
        """Gather all shard markers into the status/checksum/issue arrays and mark the cache complete."""
        n = self.num_rows
        status = np.full(n, PENDING, np.uint8)
        size = np.full((n, 2), -1, np.int32)
        turns = np.zeros(n, np.int16)
        crc_f = np.zeros((n, int(self.group["features"].shape[1])), np.uint32)  # [N, K]
        crc_turns = np.zeros(n, np.uint32)
        crc_mean = np.zeros(n, np.uint32)
        issues: list[dict[str, Any]] = [
            {**i, "row": -1} for i in json.loads(self.fs.cat_file(f"{self.root}/progress/plan-issues.json"))
        ]
        missing = []
        quant_error: ErrorStats | None = None
        for k in range(self.num_shards):
            m = self.read_marker(k)
            if m is None:
                missing.append(k)
                continue
            a, b = m["rows"]
            status[a:b] = m["status"]
            size[a:b] = np.asarray(m["image_size"], np.int32).reshape(b - a, 2)
            turns[a:b] = m["num_turns"]
            crc_f[a:b] = m["crc_features"]
            crc_turns[a:b] = m["crc_turns"]
            crc_mean[a:b] = m["crc_mean"]
            if "quant_error" in m:
                shard_error = ErrorStats.from_json(m["quant_error"])
                if quant_error is None:
                    quant_error = shard_error
                else:
                    quant_error.merge(shard_error)
            issues += [{"row": e["row"], "id": e["id"], "stage": e.get("stage", "image"), "reason": e["reason"], "where": e.get("where", "")} for e in m["errors"]]
        if missing:
            raise CacheError(f"cannot finalise '{self.url}': shards {missing[:10]}{'...' if len(missing) > 10 else ''} are not written")
        issues.sort(key=lambda i: (i["row"] if i["row"] >= 0 else -1, i["id"]))
        g = self.group
        chunk = max(1, min(n, TABLE_CHUNK))
        g.create_array("samples/status", data=status, chunks=(chunk,), overwrite=True)
        g.create_array("samples/image_size", data=size, chunks=(chunk, 2), overwrite=True)
        g.create_array("text/num_turns", data=turns, chunks=(chunk,), overwrite=True)
        g.create_array(FEATURE_CHECKSUMS, data=crc_f, chunks=(chunk, 1), overwrite=True)  # a column per layer
        g.create_array(ROW_CHECKSUMS["text/turns"], data=crc_turns, chunks=(chunk,), overwrite=True)
        g.create_array(ROW_CHECKSUMS["text/mean"], data=crc_mean, chunks=(chunk,), overwrite=True)
        ichunk = max(1, min(len(issues), TABLE_CHUNK))
        for f in ISSUE_FIELDS:
            if f == "row":
                data = np.array([i["row"] for i in issues], dtype=np.int64)
                g.create_array("issues/row", data=data, chunks=(ichunk,), overwrite=True)
            else:
                a = g.create_array(f"issues/{f}", shape=(len(issues),), chunks=(ichunk,), dtype=str, overwrite=True)
                if issues:
                    a[:] = np.array([str(i[f]) for i in issues], dtype=object)
        summary = {
            "ok": int((status == OK).sum()),
            "text_only": int((status == TEXT_ONLY).sum()),
            "skipped": int((status == SKIPPED).sum()),
            "refused": sum(1 for i in issues if i["stage"] == "encoder"),  # of the skipped: the encoder's output not storable
            "plan_skipped": sum(1 for i in issues if i["stage"] == "plan"),
            "notes": sum(1 for i in issues if i["stage"] == "note"),
        }
        meta = {**self.meta, "summary": summary, "complete": True, "completed": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if QUANT_KEY in meta["storage"]:  # the quantisation error over every stored image, per stored layer / view
            errors = [] if quant_error is None else [e.as_dict() for e in quant_error.per_layer()]
            meta["storage"] = {**meta["storage"], QUANT_KEY: {**meta["storage"][QUANT_KEY], "errors": errors}}
        meta["num_samples"] = summary["ok"] + summary["text_only"]
        meta.pop(MANIFEST_KEY, None)
        tables = {p: np.asarray(g[p][:]) for p in DIGESTED_TABLES}
        meta[MANIFEST_KEY] = build_manifest(self.fs, self.root, meta, cache_arrays(meta["storage"]), tables)  # last: it pins everything above
        g.attrs[ATTRS_KEY] = meta
        self.meta = meta
        return summary


class ShardWriterPool:
    """Writes whole shards (zarr compression, I/O, then the marker) in `threads` background threads, overlapped with the
    caller's work (extraction's forward, derive's reading of the next shard). Memory is bounded: at most `depth` full
    shards wait and `threads` are being written; `submit` blocks beyond that. The first error stops writing and is
    raised in the calling thread by `submit` or `close`."""

    def __init__(self, writer: CacheWriter, depth: int = 2, threads: int = 1,
                 done: Callable[[dict[str, np.ndarray]], None] | None = None):
        self.writer, self.done = writer, done  # done(parts): a written shard's feature parts, free to be reused
        self.q: queue.Queue[ShardResult | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, name=f"layerfuse-cache-writer-{i}", daemon=True) for i in range(max(1, threads))]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while (res := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_shard(res)
                    if self.done is not None:
                        self.done(res.parts())
                    with self._lock:
                        self.written += 1
                except BaseException as e:  # surfaced in the main thread by submit/close
                    self.error = e

    def submit(self, res: ShardResult) -> None:
        if self.error:
            raise self.error
        self.q.put(res)

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()
        if self.error:
            raise self.error


class FeaturePool:
    """Recycled feature buffers of whole output shards (pinned host memory when the encoder runs on CUDA), for
    extraction and derive: a buffer is taken for a shard, filled, handed to a `ShardWriterPool` whose `done` gives it
    back once the shard is written.

    A shard of a ViT-L/14-336 cache is about 0.5 GB; writing into fresh memory costs the kernel's page faults (measured
    70 ms per image here, with transparent huge pages compacting), more than the image's forward on a GPU. Buffers come
    back after their shard is written, so a run allocates only as many as are ever alive at once (the writer queue's
    depth + the writer threads + the shard being filled)."""

    def __init__(self, encoding: FeatureEncoding, feat_shape: tuple[int, int, int], pin: bool):
        self.encoding, self.feat_shape, self.pin = encoding, feat_shape, pin
        self._free: list[dict[str, np.ndarray]] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> dict[str, np.ndarray]:
        """Parts of n rows [n, K+V, ...]; their values are whatever the last shard left (every image row gets
        written, `blank` zeroes the others)."""
        with self._lock:
            for i, parts in enumerate(self._free):
                if len(parts[FEATURES]) == n:
                    return self._free.pop(i)
        k, t, d = self.feat_shape
        dt = self.encoding.part_dtypes()
        return {p: torch.empty((n, k, *shape), dtype=torch.from_numpy(np.empty(0, dt[p])).dtype, pin_memory=self.pin).numpy()
                for p, shape in self.encoding.part_shapes(t, d).items()}

    def give(self, parts: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._free.append(parts)

    @staticmethod
    def blank(parts: dict[str, np.ndarray], status: np.ndarray) -> None:
        """Zero the rows of a shard's parts [n, ...] that have no image (status [n] not OK): the cache stores them as
        zeros, and a recycled buffer still holds the last shard's values there."""
        for values in parts.values():
            values[status != OK] = 0
