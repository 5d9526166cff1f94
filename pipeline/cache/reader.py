"""The feature cache: format constants and the reader, `FeatureCache`.

The on-disk format is specified in docs/cache-format.md; this module and `cache_writer` implement it.
In short, a zarr v3 group with

    features            [N, K+V, T, D]  fp16 | bf16 (as uint16) | fp32 | int8 | float8_e4m3fn (as uint8), chunk [c, 1, T, D],
                                        shard [S, K+V, T, D]: the K stored hidden states (storage.layers), then V group
                                        means (storage.views)
    quant/scale         [N, K+V, T]     float16 per-token scales (int8, float8_e4m3fn; pipeline/cache/encoding.py)
    quant/outliers      [N, K+V, T, n]  float16 outlier channels (int8 with n > 0)
    text/turns          [N, M, d_s]     float32, per human turn (zeros past text/num_turns)
    text/mean           [N, d_s]        float32, mean over turns
    text/num_turns      [N]             int16, 0 = marked empty (text-only sample or no instruction)
    samples/<field>     [N]             id, source, category, split, image_ref, conversations (JSON), locator (JSON)
    samples/status      [N]             uint8: 0 pending, 1 ok, 2 text-only, 3 skipped
    samples/image_size  [N, 2]          int32 (width, height) of the original image, -1 when none
    checksums/features  [N, K+V]        uint32 CRC-32C of each (row, layer) of features (+ its scales and outliers), as stored
    checksums/turns, checksums/mean, checksums/conversations  [N]  uint32 CRC-32C of the row's bytes
    issues/<field>      [I]             row, id, stage, reason, where: every skipped or repaired sample

and the root attribute `layerfuse.manifest` (pipeline/cache/integrity.py) pinning the attributes, every array's
metadata and the per-sample tables.

Rows are numbered in source order ("storage rows"). The reader's rows are the *usable* samples only
(status ok or text-only), numbered 0..n-1 in storage order.

Every read is checked: opening a finished cache compares its attributes and array metadata with the manifest, a
table read whole is compared with its digest, and every (row, layer) of features, every text row and every
conversation read is compared with its CRC-32C. A mismatch, a missing shard or an unreadable one raises
`CorruptCacheError` (`CorruptRowsError` naming the rows when rows are at fault); nothing damaged is returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import fsspec
import numpy as np
import torch
import zarr

from layerfuse.core.errors import StateError
from layerfuse.core.dtypes import StorageDtype
from layerfuse.pipeline.cache.encoding import FEATURES, FeatureEncoding
from layerfuse.pipeline.cache.integrity import block_checksums, layout_problems, parts_checksums, table_problem, text_checksums
from layerfuse.pipeline.cache.selection import describe_layers

FORMAT = "layerfuse-cache"
FORMAT_VERSION = 2  # 2: per-(row, layer) CRC-32C checksums and the manifest
ATTRS_KEY = "layerfuse"

PENDING, OK, TEXT_ONLY, SKIPPED = 0, 1, 2, 3
STATUS_NAMES = {PENDING: "pending", OK: "ok", TEXT_ONLY: "text-only", SKIPPED: "skipped"}

SAMPLE_FIELDS = ("id", "source", "category", "split", "image_ref", "conversations", "locator")
ISSUE_FIELDS = ("row", "id", "stage", "reason", "where")
FEATURE_CHECKSUMS = "checksums/features"
ROW_CHECKSUMS = {"text/turns": "checksums/turns", "text/mean": "checksums/mean", "samples/conversations": "checksums/conversations"}
# tables that no row checksum covers: their content is digested whole in the manifest
DIGESTED_TABLES = (
    *(f"samples/{f}" for f in SAMPLE_FIELDS if f != "conversations"), "samples/status", "samples/image_size", "text/num_turns",
    *(f"issues/{f}" for f in ISSUE_FIELDS),
)
ARRAYS = (FEATURES, *ROW_CHECKSUMS, FEATURE_CHECKSUMS, *ROW_CHECKSUMS.values(), *DIGESTED_TABLES)  # every float cache's array


def cache_arrays(storage: dict[str, Any]) -> tuple[str, ...]:
    """Every array of a finished cache with this `storage` metadata: ARRAYS, and the scale/outlier parts of a
    quantised dtype."""
    extra = [p for p in FeatureEncoding.from_storage(storage).part_shapes(1, 1) if p != FEATURES]
    return (*ARRAYS, *extra)


class CacheError(StateError):
    """The cache is missing, incomplete, of another format, or lacks what was asked for."""


class CorruptCacheError(CacheError):
    """A finished cache no longer holds what was written: damaged or missing files, or edited metadata."""


class CorruptRowsError(CorruptCacheError):
    """Rows whose stored bytes fail their checksums or cannot be read; `rows` are reader rows, `reasons` one per row."""

    def __init__(self, message: str, rows: np.ndarray, storage_rows: np.ndarray, reasons: list[str]):
        super().__init__(message)
        self.rows, self.storage_rows, self.reasons = rows, storage_rows, reasons


def split_url(url: str | Path, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path for a cache URL (a local path, memory://, s3://, ...)."""
    return fsspec.core.url_to_fs(str(url), **(storage_options or {}))


def open_group(url: str | Path, mode: str, storage_options: dict[str, Any] | None = None) -> zarr.Group:
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
    if storage_options:
        kwargs["storage_options"] = storage_options
    return zarr.open_group(str(url), **kwargs)


class FeatureCache:
    """Read access to a finished cache.

    >>> cache = FeatureCache("runs/default/cache")
    >>> x = cache.features([0, 1], layers=[3, 18, 23])   # [2, 3, T, D]
    """

    def __init__(self, url: str | Path, storage_options: dict[str, Any] | None = None, *, allow_incomplete: bool = False):
        self.url = str(url)
        self.fs, self.root = split_url(url, storage_options)
        try:
            self.group = open_group(url, "r", storage_options)
        except FileNotFoundError as e:
            raise CacheError(f"no layerfuse cache at '{url}'") from e
        except Exception as e:  # noqa: BLE001 - a damaged zarr.json raises many types
            raise CorruptCacheError(f"cache '{url}' cannot be opened: {_describe(e)}") from None
        meta = self.group.attrs.get(ATTRS_KEY)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CacheError(f"'{url}' is a zarr group but not a layerfuse cache (no '{ATTRS_KEY}' attributes)")
        version = meta.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CacheError(f"'{url}' has cache format {version}; this layerfuse reads up to {FORMAT_VERSION}")
        if not meta.get("complete") and not allow_incomplete:
            raise CacheError(f"cache '{url}' is incomplete: rerun the same `layerfuse extract` command to finish it")
        self.meta: dict[str, Any] = meta
        self.complete = bool(meta.get("complete"))
        if self.complete and version < FORMAT_VERSION:
            raise CacheError(
                f"cache '{url}' has format {version}, written before per-layer checksums and the manifest (format "
                f"{FORMAT_VERSION}); extract it again with the same command and --overwrite"
            )
        self._tables: dict[str, np.ndarray] = {}
        self._crc_layers: dict[int, np.ndarray] = {}
        try:
            self.storage_dtype: str = StorageDtype(meta["storage"]["dtype"]).value
            self.encoding = FeatureEncoding.from_storage(meta["storage"])
            arrays = cache_arrays(meta["storage"])
        except Exception as e:  # noqa: BLE001 - an edited storage record
            raise CorruptCacheError(self._damaged(f"its storage record cannot be read: {_describe(e)}")) from None
        if self.complete and (problems := layout_problems(self.fs, self.root, meta, arrays)):
            raise CorruptCacheError(self._damaged("; ".join(problems)))
        try:
            self._parts = {p: self.group[p] for p in self.encoding.part_shapes(1, 1)}  # features (+ quant/scale, quant/outliers)
            self._features = self._parts[FEATURES]
        except Exception as e:  # noqa: BLE001
            raise CorruptCacheError(self._damaged(f"features cannot be opened: {_describe(e)}")) from None
        self.status = self.table("samples/status") if self.complete else np.zeros(self._features.shape[0], np.uint8)
        self._rows = np.flatnonzero((self.status == OK) | (self.status == TEXT_ONLY)) if self.complete else np.arange(len(self.status))

    def _damaged(self, what: str) -> str:
        return f"cache '{self.url}' is damaged: {what}. `layerfuse cache verify {self.url}` reports everything; extract it again (or restore a copy)"

    # --- shape facts -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """L+1: the encoder's hidden states hs[0..L] (hs[0] = embeddings, hs[L] = last block). The cache stores all of
        them or the subset `stored_layers` (extract --layers)."""
        return int(self.meta["encoder"]["num_layers"]) + 1

    @property
    def stored_layers(self) -> list[int]:
        """The hidden-state indices stored, in storage order (features[:, k] is hs[stored_layers[k]])."""
        return [int(i) for i in self.meta["storage"].get("layers", range(self.num_layers))]

    @property
    def views(self) -> list[tuple[int, ...]]:
        """Stored group means (extract --views), each named by its hidden states; stored after the layers."""
        return [tuple(int(i) for i in v) for v in self.meta["storage"].get("views", [])]

    @property
    def inputs(self) -> list[int | tuple[int, ...]]:
        """Everything stored along the layer axis, in order: the hidden states, then the group means."""
        return [*self.stored_layers, *self.views]

    @property
    def feature_dtype(self) -> str:
        """The dtype `features` returns: the stored dtype, float16 for the quantised int8 and float8_e4m3fn."""
        return self.encoding.read_dtype

    @property
    def num_tokens(self) -> int:
        return int(self._features.shape[2])

    @property
    def hidden_size(self) -> int:
        return int(self._features.shape[3])

    @property
    def text_dim(self) -> int:
        return int(self.meta["text"]["dim"])

    @property
    def has_cls(self) -> bool:
        return bool(self.meta["encoder"]["has_cls"])

    @property
    def chunk_rows(self) -> int:
        """Samples per feature chunk (one layer of that many samples is decompressed at once)."""
        return int(self._features.chunks[0])

    @property
    def shard_rows(self) -> int:
        """Samples per storage shard (one file on disk / one object in a store)."""
        shards = getattr(self._features, "shards", None)
        return int((shards or self._features.chunks)[0])

    def storage_rows(self, rows: Sequence[int] | np.ndarray | slice | None = None) -> np.ndarray:
        """Storage-row numbers (positions in the arrays on disk) of the given reader rows."""
        return self._storage_rows(rows)

    def __len__(self) -> int:
        return len(self._rows)

    # --- per-sample tables ----------------------------------------------------------------------------------
    def table(self, path: str) -> np.ndarray:
        """A per-sample table (by array path, indexed by storage row) read whole once, checked against the manifest's
        digest when it is one of DIGESTED_TABLES."""
        if path not in self._tables:
            try:
                values = np.asarray(self.group[path][:])
            except Exception as e:  # noqa: BLE001 - zarr raises many types for damaged chunks
                raise CorruptCacheError(self._damaged(f"'{path}' cannot be read: {_describe(e)}")) from None
            if self.complete and path in DIGESTED_TABLES and (problem := table_problem(self.meta, path, values)):
                raise CorruptCacheError(self._damaged(problem))
            self._tables[path] = values
        return self._tables[path]

    def _column(self, name: str) -> np.ndarray:
        return self.table(f"samples/{name}")

    def _storage_rows(self, rows: Sequence[int] | np.ndarray | slice | None) -> np.ndarray:
        if rows is None:
            return self._rows
        if isinstance(rows, slice):
            return self._rows[rows]
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self._rows) or idx.max() >= len(self._rows)):
            raise IndexError(f"row out of range for a cache of {len(self._rows)} samples")
        return self._rows[idx]

    @property
    def ids(self) -> list[str]:
        return [str(x) for x in self._column("id")[self._rows]]

    def sample_ids(self, rows: Sequence[int] | np.ndarray | slice | None = None) -> np.ndarray:
        """Sample ids of the given reader rows (str array)."""
        return self._column("id")[self._storage_rows(rows)]

    @property
    def categories(self) -> np.ndarray:
        return self._column("category")[self._rows]

    @property
    def splits(self) -> np.ndarray:
        return self._column("split")[self._rows]

    @property
    def sources(self) -> np.ndarray:
        return self._column("source")[self._rows]

    @property
    def has_image(self) -> np.ndarray:
        return self.status[self._rows] == OK

    @property
    def image_sizes(self) -> np.ndarray:
        """[n, 2] (width, height) of each original image; -1 for text-only samples."""
        return self.table("samples/image_size")[self._rows]

    def select(self, *, split: str | None = None, category: str | None = None, has_image: bool | None = None) -> np.ndarray:
        """Reader rows matching all given filters."""
        keep = np.ones(len(self._rows), bool)
        if split is not None:
            keep &= self.splits == split
        if category is not None:
            keep &= self.categories == category
        if has_image is not None:
            keep &= self.has_image == has_image
        return np.flatnonzero(keep)

    def conversations(self, rows: Sequence[int] | np.ndarray | slice | None = None) -> list[list[dict[str, str]]]:
        srows = self._storage_rows(rows)
        values = self.checked_rows("samples/conversations", srows)
        return [json.loads(str(s)) for s in values]

    # --- arrays -----------------------------------------------------------------------------------------------
    def resolve_layers(self, layers: Sequence[int | tuple[int, ...]] | None) -> list[int | tuple[int, ...]]:
        """Hidden-state indices (negative counts from the end of hs[0..L]) and stored group means (tuples, see
        `views`); None = everything stored. A layer outside the encoder, or one this cache does not store, is a
        CacheError naming what it stores and how to add it."""
        n = self.num_layers
        if layers is None:
            return self.inputs
        out: list[int | tuple[int, ...]] = []
        for layer in layers:
            if isinstance(layer, (tuple, list)):
                if tuple(layer) not in self.views:
                    raise CacheError(f"cache '{self.url}' stores no group mean of hidden states {list(layer)} "
                                     f"(its views: {[list(v) for v in self.views] or 'none'})")
                out.append(tuple(int(i) for i in layer))
                continue
            i = int(layer) + n if int(layer) < 0 else int(layer)
            if not 0 <= i < n:
                raise CacheError(
                    f"layer {layer} is not in cache '{self.url}', whose encoder has hidden states 0..{n - 1} "
                    f"(encoder {self.meta['encoder']['name']} with {n - 1} blocks)"
                )
            out.append(i)
        missing = sorted(set(i for i in out if isinstance(i, int)) - set(self.stored_layers))
        if missing:
            raise CacheError(self.missing_layers_message(missing))
        return out

    def missing_layers_message(self, missing: Sequence[int]) -> str:
        """Why hidden states `missing` cannot be read from this cache, and the extract command that would store them."""
        subset = self.meta.get("config", {}).get("layers")
        union = sorted(set(subset) | set(missing)) if subset else None
        add = "all" if union is None else ",".join(str(i) for i in union) + ("," if len(union) == 1 else "")
        return (f"cache '{self.url}' does not store hidden state(s) {list(missing)}: it stores "
                f"{describe_layers(self.stored_layers, self.num_layers - 1)}. Extract a cache that has them, e.g. "
                f"`layerfuse extract {_source_args(self.meta.get('config', {}))} --layers '{add}' --out NEW_CACHE`")

    def _positions(self, inputs: Sequence[int | tuple[int, ...]]) -> list[int]:
        """Storage positions (axis 1 of features) of resolved inputs (hidden-state indices, group-mean tuples)."""
        where = {x: k for k, x in enumerate(self.inputs)}
        return [where[i] for i in inputs]

    def features(self, rows: Sequence[int] | np.ndarray | slice | None, layers: Sequence[int | tuple[int, ...]] | None = None) -> torch.Tensor:
        """Hidden states (and stored group means, named by tuples) of the given reader rows: [n, k, T, D] in
        `feature_dtype` (quantised caches are dequantised here, in the process that reads: the loader's workers).

        Only the chunks holding the asked-for (row, layer) pairs are read and decompressed: rows are merged
        into spans of neighbouring chunks (cut at shard boundaries) and layers into runs, and each span x run is one
        slice read (much faster in zarr than orthogonal integer indexing). Every (row, layer) read is checked against
        its CRC-32C; damaged or unreadable rows raise `CorruptRowsError` naming them.
        """
        return self.features_at(self._storage_rows(rows), layers)

    def features_at(self, srows: np.ndarray, layers: Sequence[int | tuple[int, ...]] | None = None, *, check: bool = True) -> torch.Tensor:
        """`features` by storage rows (any status; rows without an image are zeros). check=False skips the checksums
        (for `cache verify`, to look at the values of rows it already reported)."""
        lay = np.asarray(self._positions(self.resolve_layers(layers)), dtype=np.int64)  # storage positions
        uniq, rinv = np.unique(srows, return_inverse=True)
        ulay, linv = np.unique(lay, return_inverse=True)
        blocks = {p: np.empty((len(uniq), len(ulay), *a.shape[2:]), a.dtype) for p, a in self._parts.items()}
        bad: dict[int, str] = {}
        for r0, r1 in self._spans(uniq):
            rsel = slice(int(np.searchsorted(uniq, r0)), int(np.searchsorted(uniq, r1, side="right")))
            for l0, l1 in _runs(ulay, gap=1):
                lsel = slice(int(np.searchsorted(ulay, l0)), int(np.searchsorted(ulay, l1, side="right")))
                picked = uniq[rsel] - r0  # the rows wanted of the span; every row of it when contiguous (no copy then)
                try:
                    data = [np.asarray(a[r0 : r1 + 1, l0 : l1 + 1]) for a in self._parts.values()]
                    if len(picked) != r1 - r0 + 1:
                        data = [d[picked] for d in data]
                except Exception as e:  # noqa: BLE001 - a truncated shard or a broken shard index
                    why = f"its shard file cannot be read (truncated, or its index damaged): {_describe(e)}"
                    bad.update((int(r), why) for r in uniq[rsel])
                    continue
                for block, d in zip(blocks.values(), data):
                    block[rsel, lsel] = d
                if check and self.complete:
                    want = np.stack([self._layer_checksums(int(k))[uniq[rsel]] for k in ulay[lsel]], axis=1)
                    for i, j in zip(*np.nonzero(parts_checksums(data, axes=2) != want)):
                        slot = self.inputs[int(ulay[lsel][j])]
                        what = f"layer {slot}" if isinstance(slot, int) else f"the group mean of layers {list(slot)}"
                        bad.setdefault(int(uniq[rsel][i]), f"{what} of the features fails its checksum")
        if bad:
            raise self._corrupt_rows(bad, "features")
        if not _is_identity(rinv):  # rows asked in another order or more than once (sorted unique rows: no copy)
            blocks = {p: b[rinv] for p, b in blocks.items()}
        if not _is_identity(linv):
            blocks = {p: b[:, linv] for p, b in blocks.items()}
        return self.encoding.decode(blocks, lay)

    def _spans(self, uniq: np.ndarray) -> list[tuple[int, int]]:
        """Inclusive storage-row spans of `uniq` (sorted) that merge neighbouring chunks and never cross a shard."""
        shard = self.shard_rows
        out: list[tuple[int, int]] = []
        for r0, r1 in _runs(uniq, gap=self.chunk_rows):
            if r0 // shard == r1 // shard:
                out.append((r0, r1))
                continue
            part = uniq[(uniq >= r0) & (uniq <= r1)]
            for k in np.unique(part // shard):
                v = part[part // shard == k]
                out.append((int(v[0]), int(v[-1])))
        return out

    def _layer_checksums(self, layer: int) -> np.ndarray:
        """checksums/features[:, layer] for storage position `layer` (each column is stored as its own chunks)."""
        if layer not in self._crc_layers:
            try:
                self._crc_layers[layer] = np.asarray(self.group[FEATURE_CHECKSUMS][:, layer])
            except Exception as e:  # noqa: BLE001
                raise CorruptCacheError(self._damaged(f"'{FEATURE_CHECKSUMS}' cannot be read: {_describe(e)}")) from None
        return self._crc_layers[layer]

    def checked_rows(self, path: str, srows: np.ndarray) -> np.ndarray:
        """path[srows] for a row-checksummed array (text/turns, text/mean, samples/conversations), checked per row."""
        try:
            values = _take(self.group[path], srows)
        except Exception as e:  # noqa: BLE001
            raise self._corrupt_rows({int(r): f"'{path}' cannot be read: {_describe(e)}" for r in srows}, path) from None
        if self.complete and srows.size:
            got = text_checksums(values) if path == "samples/conversations" else block_checksums(values)
            want = self.table(ROW_CHECKSUMS[path])[srows]
            if (wrong := np.flatnonzero(got != want)).size:
                raise self._corrupt_rows({int(srows[i]): f"'{path}' fails its checksum" for i in wrong}, path)
        return values

    def shard_file(self, shard: int) -> str:
        """Where storage shard `shard` of the features lives (a file under the cache folder, or an object key)."""
        return f"{self.root}/features/{self._features.metadata.encode_chunk_key((shard, 0, 0, 0))}"

    def _corrupt_rows(self, bad: dict[int, str], what: str) -> CorruptRowsError:
        srows = np.asarray(sorted(bad), np.int64)
        r = int(srows[0])
        shard = r // self.shard_rows
        reason = bad[r]
        if what == "features" and not self.fs.exists(self.shard_file(shard)):
            reason += f" (its shard file {self.shard_file(shard)} is missing; zarr would have returned zeros)"
        more = f" ({len(srows) - 1} more damaged rows read with it)" if len(srows) > 1 else ""
        sample = str(self._column("id")[r]) if self.complete else "?"
        message = self._damaged(f"sample {sample} (storage row {r}, shard {shard}): {reason}{more}")
        pos = np.minimum(np.searchsorted(self._rows, srows), max(len(self._rows) - 1, 0))
        reader_rows = np.where(self._rows[pos] == srows, pos, -1) if len(self._rows) else np.full(len(srows), -1)
        return CorruptRowsError(message, reader_rows, srows, [bad[int(x)] for x in srows])

    def text_embeddings(self, rows: Sequence[int] | np.ndarray | slice | None = None, *, per_turn: bool = False):
        """Instruction embeddings: mean [n, d_s], or (turns [n, M, d_s], num_turns [n]) with per_turn=True.

        Marked-empty samples (num_turns == 0) are all zeros.
        """
        srows = self._storage_rows(rows)
        if per_turn:
            turns = self.checked_rows("text/turns", srows)
            return torch.from_numpy(np.asarray(turns)), torch.from_numpy(self.table("text/num_turns")[srows].astype(np.int64))
        return torch.from_numpy(np.asarray(self.checked_rows("text/mean", srows)))

    def num_turns(self, rows: Sequence[int] | np.ndarray | slice | None = None) -> np.ndarray:
        return self.table("text/num_turns")[self._storage_rows(rows)]

    def issues(self) -> list[dict[str, Any]]:
        """Every recorded issue (skipped or repaired samples) with row, id, stage, reason, where."""
        cols = {f: self.table(f"issues/{f}") for f in ISSUE_FIELDS}
        return [{f: (int(cols[f][i]) if f == "row" else str(cols[f][i])) for f in ISSUE_FIELDS} for i in range(len(cols["id"]))]

    def __repr__(self) -> str:
        return (
            f"FeatureCache('{self.url}', samples={len(self)}, layers={self.num_layers}, tokens={self.num_tokens}, "
            f"hidden={self.hidden_size}, dtype={self.storage_dtype})"
        )


def _is_identity(inverse: np.ndarray) -> bool:
    """Whether np.unique's inverse indices are 0, 1, 2, ... (the input was sorted and unique)."""
    return bool(np.array_equal(inverse, np.arange(len(inverse))))


def _runs(sorted_values: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """Inclusive (first, last) runs of sorted values whose neighbours are at most `gap` apart."""
    if sorted_values.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_values) > gap)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [sorted_values.size - 1]])
    return [(int(sorted_values[a]), int(sorted_values[b])) for a, b in zip(starts, ends)]


def _source_args(config: dict[str, Any]) -> str:
    """The extract options that name a cache's source and tower, from its config record (for messages)."""
    src, vision = config.get("source", {}), config.get("vision", {}).get("name", "default")
    if src.get("kind") == "llava":
        args = f"--llava {src.get('json')} --image-root {src.get('image_root')}"
    elif src.get("kind") == "webdataset":
        args = f"--wds '{src.get('shards')}'"
    else:
        args = f"--builtin {src.get('n')} --seed {src.get('seed')}"
    return f"{args} --vision {vision}"


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _take(arr: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """arr[rows] along axis 0 for arbitrary (unsorted, repeated) rows, reading each chunk once."""
    if rows.size == 0:
        return np.asarray(arr[0:0])
    uniq, inverse = np.unique(rows, return_inverse=True)
    return np.asarray(arr.oindex[uniq])[inverse]
