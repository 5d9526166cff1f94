"""The feature cache: format constants and the reader, `FeatureCache`.

The on-disk format is specified in docs/cache-format.md; this module and `cache_writer` implement it.
In short, a zarr v3 group with

    features            [N, L+1, T, D]  fp16 | bf16 (as uint16) | fp32, chunk [1, 1, T, D], shard [S, L+1, T, D]
    text/turns          [N, M, d_s]     float32, per human turn (zeros past text/num_turns)
    text/mean           [N, d_s]        float32, mean over turns
    text/num_turns      [N]             int16, 0 = marked empty (text-only sample or no instruction)
    samples/<field>     [N]             id, source, category, split, image_ref, conversations (JSON), locator (JSON)
    samples/status      [N]             uint8: 0 pending, 1 ok, 2 text-only, 3 skipped
    samples/image_size  [N, 2]          int32 (width, height) of the original image, -1 when none
    checksums/features  [N]             uint32 CRC-32 of the row's stored feature bytes
    checksums/text      [N]             uint32 CRC-32 of the row's text/turns bytes
    issues/<field>      [I]             row, id, stage, reason, where: every skipped or repaired sample

Rows are numbered in source order ("storage rows"). The reader's rows are the *usable* samples only
(status ok or text-only), numbered 0..n-1 in storage order.
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

FORMAT = "layerfuse-cache"
FORMAT_VERSION = 1
ATTRS_KEY = "layerfuse"

PENDING, OK, TEXT_ONLY, SKIPPED = 0, 1, 2, 3
STATUS_NAMES = {PENDING: "pending", OK: "ok", TEXT_ONLY: "text-only", SKIPPED: "skipped"}

SAMPLE_FIELDS = ("id", "source", "category", "split", "image_ref", "conversations", "locator")
ISSUE_FIELDS = ("row", "id", "stage", "reason", "where")


class CacheError(StateError):
    """The cache is missing, incomplete, of another format, or lacks what was asked for."""


def split_url(url: str | Path, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path for a cache URL (a local path, memory://, s3://, ...)."""
    return fsspec.core.url_to_fs(str(url), **(storage_options or {}))


def open_group(url: str | Path, mode: str, storage_options: dict[str, Any] | None = None) -> zarr.Group:
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
    if storage_options:
        kwargs["storage_options"] = storage_options
    return zarr.open_group(str(url), **kwargs)


def to_torch(a: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """A stored feature array as a torch tensor of its logical dtype (bf16 bit patterns re-viewed)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if StorageDtype(storage_dtype) is StorageDtype.BFLOAT16 else t


def from_torch(t: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """A feature tensor as the numpy array that is stored (bf16 as its uint16 bit pattern)."""
    dtype = StorageDtype(storage_dtype)
    t = t.detach().to("cpu", dtype.torch_dtype).contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype is StorageDtype.BFLOAT16 else t.numpy()


class FeatureCache:
    """Read access to a finished cache.

    >>> cache = FeatureCache("runs/default/cache")
    >>> x = cache.features([0, 1], layers=[3, 18, 23])   # [2, 3, T, D]
    """

    def __init__(self, url: str | Path, storage_options: dict[str, Any] | None = None, *, allow_incomplete: bool = False):
        self.url = str(url)
        try:
            self.group = open_group(url, "r", storage_options)
        except FileNotFoundError as e:
            raise CacheError(f"no layerfuse cache at '{url}'") from e
        meta = self.group.attrs.get(ATTRS_KEY)
        if not meta or meta.get("format") != FORMAT:
            raise CacheError(f"'{url}' is a zarr group but not a layerfuse cache (no '{ATTRS_KEY}' attributes)")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise CacheError(f"'{url}' has cache format {meta['format_version']}; this layerfuse reads up to {FORMAT_VERSION}")
        if not meta.get("complete") and not allow_incomplete:
            raise CacheError(f"cache '{url}' is incomplete: rerun the same `layerfuse extract` command to finish it")
        self.meta: dict[str, Any] = meta
        self.storage_dtype: str = meta["storage"]["dtype"]
        self._features = self.group["features"]
        status = self.group["samples/status"][:] if meta.get("complete") else np.zeros(self._features.shape[0], np.uint8)
        self.status = np.asarray(status)
        self._rows = np.flatnonzero((self.status == OK) | (self.status == TEXT_ONLY)) if meta.get("complete") else np.arange(len(status))
        self._columns: dict[str, np.ndarray] = {}

    # --- shape facts -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Number of stored hidden states, L+1 (hs[0] = embeddings, hs[L] = last block)."""
        return int(self._features.shape[1])

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
    def _column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            self._columns[name] = np.asarray(self.group[f"samples/{name}"][:])
        return self._columns[name]

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
        return np.asarray(self.group["samples/image_size"][:])[self._rows]

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
        arr = self.group["samples/conversations"]
        return [json.loads(str(s)) for s in _take(arr, srows)]

    # --- arrays -----------------------------------------------------------------------------------------------
    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        """Layer indices into hs (negative counts from the end); a missing layer is a CacheError."""
        n = self.num_layers
        if layers is None:
            return list(range(n))
        out = []
        for layer in layers:
            i = int(layer) + n if int(layer) < 0 else int(layer)
            if not 0 <= i < n:
                raise CacheError(
                    f"layer {layer} is not in cache '{self.url}', which stores hidden states 0..{n - 1} "
                    f"(encoder {self.meta['encoder']['name']} with {n - 1} blocks)"
                )
            out.append(i)
        return out

    def features(self, rows: Sequence[int] | np.ndarray | slice | None, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Hidden states of the given reader rows and layers: [n, k, T, D] in the stored dtype.

        Only the chunks holding the asked-for (row, layer) pairs are read and decompressed: rows are merged
        into spans of neighbouring chunks and layers into runs, and each span x run is one slice read
        (much faster in zarr than orthogonal integer indexing).
        """
        srows = self._storage_rows(rows)
        lay = np.asarray(self.resolve_layers(layers), dtype=np.int64)
        uniq, rinv = np.unique(srows, return_inverse=True)
        ulay, linv = np.unique(lay, return_inverse=True)
        block = np.empty((len(uniq), len(ulay), self.num_tokens, self.hidden_size), self._features.dtype)
        chunk = int(self._features.chunks[0])
        for r0, r1 in _runs(uniq, gap=chunk):
            rsel = slice(int(np.searchsorted(uniq, r0)), int(np.searchsorted(uniq, r1, side="right")))
            for l0, l1 in _runs(ulay, gap=1):
                lsel = slice(int(np.searchsorted(ulay, l0)), int(np.searchsorted(ulay, l1, side="right")))
                data = np.asarray(self._features[r0 : r1 + 1, l0 : l1 + 1])
                block[rsel, lsel] = data[uniq[rsel] - r0]
        return to_torch(block[rinv][:, linv], self.storage_dtype)

    def text_embeddings(self, rows: Sequence[int] | np.ndarray | slice | None = None, *, per_turn: bool = False):
        """Instruction embeddings: mean [n, d_s], or (turns [n, M, d_s], num_turns [n]) with per_turn=True.

        Marked-empty samples (num_turns == 0) are all zeros.
        """
        srows = self._storage_rows(rows)
        if per_turn:
            turns = _take(self.group["text/turns"], srows)
            num = _take(self.group["text/num_turns"], srows)
            return torch.from_numpy(np.asarray(turns)), torch.from_numpy(np.asarray(num).astype(np.int64))
        return torch.from_numpy(np.asarray(_take(self.group["text/mean"], srows)))

    def num_turns(self, rows: Sequence[int] | np.ndarray | slice | None = None) -> np.ndarray:
        return np.asarray(_take(self.group["text/num_turns"], self._storage_rows(rows)))

    def issues(self) -> list[dict[str, Any]]:
        """Every recorded issue (skipped or repaired samples) with row, id, stage, reason, where."""
        cols = {f: self.group[f"issues/{f}"][:] for f in ISSUE_FIELDS}
        return [{f: (int(cols[f][i]) if f == "row" else str(cols[f][i])) for f in ISSUE_FIELDS} for i in range(len(cols["id"]))]

    def __repr__(self) -> str:
        return (
            f"FeatureCache('{self.url}', samples={len(self)}, layers={self.num_layers}, tokens={self.num_tokens}, "
            f"hidden={self.hidden_size}, dtype={self.storage_dtype})"
        )


def _runs(sorted_values: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """Inclusive (first, last) runs of sorted values whose neighbours are at most `gap` apart."""
    if sorted_values.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_values) > gap)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [sorted_values.size - 1]])
    return [(int(sorted_values[a]), int(sorted_values[b])) for a, b in zip(starts, ends)]


def _take(arr: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """arr[rows] along axis 0 for arbitrary (unsorted, repeated) rows, reading each chunk once."""
    if rows.size == 0:
        return np.asarray(arr[0:0])
    uniq, inverse = np.unique(rows, return_inverse=True)
    return np.asarray(arr.oindex[uniq])[inverse]
