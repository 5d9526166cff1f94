"""What lets a reader trust a cache: per-row checksums and the manifest (docs/cache-format.md, section 6).

Row checksums are CRC-32C (Castagnoli, the checksum zarr's shard index uses; hardware-accelerated through
`google-crc32c`, about 7 GB/s here against 1.1 GB/s for decompressing the same bytes) of the stored bytes in C order,
little endian. Features are checked per (row, layer), so a reader that reads 3 of 25 layers checks exactly what it read:

    checksums/features       [N, K]   uint32   features[i, k] (quantised caches: then quant/scale[i, k], quant/outliers[i, k])
    checksums/turns          [N]      uint32   text/turns[i]
    checksums/mean           [N]      uint32   text/mean[i]
    checksums/conversations  [N]      uint32   samples/conversations[i] as UTF-8

The manifest (root attribute `layerfuse.manifest`, written last when a cache is finalised) pins what gives the bytes
their meaning: a fingerprint of every other root attribute (encoder, storage dtype, token layout, text model, ...), of
every array's `zarr.json` (data type, shape, chunking, codecs), and a digest of the content of every per-sample table
that no row checksum covers (ids, splits, categories, status, sizes, issues). A reader compares the first two when it
opens the cache and each table's digest when it loads that table.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import google_crc32c
import numpy as np

from layerfuse.core.fingerprint import fingerprint

MANIFEST_KEY = "manifest"


def crc32c(data: bytes) -> int:
    """CRC-32C of `data`."""
    return int(google_crc32c.value(data))


def block_checksums(a: np.ndarray, axes: int = 1) -> np.ndarray:
    """CRC-32C of each block a[i] (axes=1) or a[i, j] (axes=2) of its little-endian C-order bytes: uint32 [a.shape[:axes]]."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    lead = a.shape[:axes]
    flat = a.reshape(int(np.prod(lead, dtype=np.int64)), -1)
    return np.fromiter((crc32c(r.tobytes()) for r in flat), np.uint32, count=flat.shape[0]).reshape(lead)


def parts_checksums(parts: list[np.ndarray], axes: int = 2) -> np.ndarray:
    """CRC-32C of each block over several arrays sharing their leading `axes` dims: the bytes of parts[0][i, j], then
    parts[1][i, j], ... (a quantised cache's codes, scales and outliers of one (row, layer)); equals `block_checksums`
    for one part: uint32 [lead]."""
    if len(parts) == 1:
        return block_checksums(parts[0], axes)
    lead = parts[0].shape[:axes]
    n = int(np.prod(lead, dtype=np.int64))
    flats = [np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).reshape(n, -1) for a in parts]
    out = np.empty(n, np.uint32)
    for i in range(n):
        crc = 0
        for f in flats:
            crc = google_crc32c.extend(crc, f[i].tobytes())
        out[i] = crc
    return out.reshape(lead)


def text_checksums(values: Iterable[str]) -> np.ndarray:
    """CRC-32C of each string's UTF-8 bytes: uint32 [n]."""
    return np.asarray([crc32c(str(v).encode()) for v in values], np.uint32)


def table_digest(values: np.ndarray) -> str:
    """16 hex digits of SHA-256 over a table's content: for strings each UTF-8 value with an 8-byte length prefix,
    for numbers the dtype (little endian), the shape and the C-order bytes."""
    h = hashlib.sha256()
    a = np.asarray(values)
    if a.dtype.kind in "OUT":
        for v in a.reshape(-1):
            b = str(v).encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    else:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        h.update(f"{a.dtype.str}{list(a.shape)}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def attrs_digests(meta: Mapping[str, Any]) -> dict[str, str]:
    """A fingerprint of each root attribute except the manifest itself."""
    return {k: fingerprint(v) for k, v in meta.items() if k != MANIFEST_KEY}


def array_meta_digest(fs: Any, root: str, path: str) -> str | None:
    """The fingerprint of an array's `zarr.json` as parsed JSON (so re-indenting it changes nothing); None when absent."""
    try:
        return fingerprint(json.loads(fs.cat_file(f"{root}/{path}/zarr.json")))
    except FileNotFoundError:
        return None
    except ValueError:
        return "unreadable"


def build_manifest(fs: Any, root: str, meta: Mapping[str, Any], arrays: Iterable[str], tables: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The manifest of a finished cache: `arrays` are every array path, `tables` the content of those digested whole."""
    return {
        "attrs": attrs_digests(meta),
        "arrays": {p: {"meta": array_meta_digest(fs, root, p), "data": table_digest(tables[p]) if p in tables else None} for p in arrays},
    }


def layout_problems(fs: Any, root: str, meta: Mapping[str, Any], arrays: Iterable[str]) -> list[str]:
    """What differs between a finished cache's attributes and the metadata of its `arrays` and its manifest (empty:
    nothing)."""
    manifest = meta.get(MANIFEST_KEY)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("attrs"), dict) or not isinstance(manifest.get("arrays"), dict):
        return ["the manifest (root attribute layerfuse.manifest) is missing or malformed"]
    out = []
    now, then = attrs_digests(meta), manifest["attrs"]
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if changed:
        out.append(f"root attributes changed since the cache was written: {', '.join(changed)}")
    for path in arrays:
        want, got = manifest["arrays"].get(path), array_meta_digest(fs, root, path)
        if not isinstance(want, dict):
            out.append(f"the manifest lists no array '{path}'")
        elif got is None:
            out.append(f"array '{path}' is missing")
        elif got != want.get("meta"):
            out.append(f"the metadata of array '{path}' (zarr.json: data type, shape, chunks or codecs) changed since the cache was written")
    return out


def table_problem(meta: Mapping[str, Any], path: str, values: np.ndarray) -> str | None:
    """None when `values` (a table read whole) matches the manifest's digest, else the problem."""
    want = ((meta.get(MANIFEST_KEY) or {}).get("arrays") or {}).get(path) or {}
    if not want.get("data"):
        return f"the manifest has no digest of '{path}'"
    if table_digest(values) == want["data"]:
        return None
    return f"the content of '{path}' changed since the cache was written (digest differs from the manifest)"
