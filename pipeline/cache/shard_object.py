"""One zarr v3 shard object of a feature array, encoded whole in the calling thread.

zarr-python writes a shard through its asyncio pipeline: an event-loop thread hands every inner chunk (450 per
ViT-L/14-336 shard) to a pool of executor threads. Beside a PyTorch forward on the same cores those short bursts of
many threads keep preempting the forward's OpenMP team, which then waits at its barriers. Measured on 2 cores with a
thread writing one 18-row ViT-L/14-336 shard beside a 6-image forward: through zarr the forward ran at 1662-1861 ms
per image (1400-1531 alone) and the write took 3.0-3.9 s; encoded and written (fsync'd) in one thread, as here,
1461-1584 ms per image and 1.1-1.4 s (BENCHMARKS.md "Extraction"). So the writer threads encode the shard objects of
the feature arrays themselves:

    shard object = the encoded inner chunks (C order of the chunk grid) + index [*chunks_per_shard, 2] uint64
                   (offset, nbytes; 2**64-1 twice for a chunk that is not stored) little endian + its CRC-32C

which is zarr v3's `sharding_indexed` codec with index_location "end" and index codecs bytes(little) + crc32c, inner
codecs bytes [+ zstd]: exactly what `CacheWriter.create` declares for the feature arrays, so zarr (and any zarr v3
reader) reads these objects as its own. An array declared any other way (blosc codecs, another index layout) is not
handled here: `ShardObject.of` returns None and the caller writes through zarr.
"""

from __future__ import annotations

from dataclasses import dataclass

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from layerfuse.pipeline.cache.integrity import crc32c

NOT_STORED = np.uint64(2**64 - 1)  # an index entry of a chunk the shard does not store


@dataclass(frozen=True)
class ShardObject:
    """How one sharded array stores a shard: shard shape, inner chunk shape, little-endian dtype, zstd level (None:
    raw chunks)."""

    shard: tuple[int, ...]
    chunk: tuple[int, ...]
    dtype: np.dtype
    zstd_level: int | None

    @classmethod
    def of(cls, array: zarr.Array) -> "ShardObject | None":
        """The layout of `array` when it is sharded as `CacheWriter.create` shards feature arrays, else None."""
        meta = array.metadata
        codecs = tuple(getattr(meta, "codecs", ()))
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        if sharding.index_location != ShardingCodecIndexLocation.end:
            return None
        index = sharding.index_codecs
        if len(index) != 2 or not isinstance(index[0], BytesCodec) or not isinstance(index[1], Crc32cCodec) or index[0].endian.value != "little":
            return None
        inner = sharding.codecs
        if not inner or not isinstance(inner[0], BytesCodec) or (inner[0].endian is not None and inner[0].endian.value != "little"):
            return None
        if len(inner) == 1:
            level = None
        elif len(inner) == 2 and isinstance(inner[1], ZstdCodec) and not inner[1].checksum:
            level = inner[1].level
        else:
            return None
        if float(np.asarray(array.fill_value).astype(np.float64)) != 0.0:
            return None
        return cls(tuple(meta.chunk_grid.chunk_shape), tuple(sharding.chunk_shape), np.dtype(array.dtype).newbyteorder("<"), level)

    def encode(self, data: np.ndarray) -> list[bytes | memoryview]:
        """data [r, *shard[1:]], the shard's rows inside the array (r <= shard[0]; the last shard of an array may
        have fewer) -> the pieces of the shard object, in order: every stored inner chunk, then the index. Inner
        chunks beyond row r are not stored; one that straddles it is stored with zeros (the fill value) after r."""
        if data.shape[1:] != self.shard[1:] or data.shape[0] > self.shard[0]:
            raise ValueError(f"a shard of {self.shard} cannot hold data of shape {data.shape}")
        data = np.asarray(data).astype(self.dtype, copy=False)  # [r, ...] as stored (little endian)
        grid = tuple(s // c for s, c in zip(self.shard, self.chunk))
        index = np.full((*grid, 2), NOT_STORED, dtype="<u8")
        zstd = numcodecs.Zstd(level=self.zstd_level, checksum=False) if self.zstd_level is not None else None
        pieces: list[bytes | memoryview] = []
        offset = 0
        for pos in np.ndindex(*grid):
            lo = [p * c for p, c in zip(pos, self.chunk)]
            if lo[0] >= data.shape[0]:
                continue  # beyond the array's rows: not stored
            region = data[tuple(slice(a, a + c) for a, c in zip(lo, self.chunk))]
            if region.shape != self.chunk:  # straddles the array's last row
                full = np.zeros(self.chunk, self.dtype)
                full[: region.shape[0]] = region
                region = full
            raw = np.ascontiguousarray(region)
            piece = zstd.encode(raw) if zstd is not None else memoryview(raw).cast("B")
            index[pos] = (offset, len(piece))
            offset += len(piece)
            pieces.append(piece)
        table = index.tobytes()
        pieces.append(table + crc32c(table).to_bytes(4, "little"))
        return pieces
