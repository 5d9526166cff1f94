"""Shard objects encoded in the writer thread (shard_object.py) are zarr v3 shards: zarr reads them back exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from layerfuse.core.atomic import replacing
from layerfuse.pipeline.cache.extract import run_extract
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.cache.shard_object import NOT_STORED, ShardObject
from layerfuse.pipeline.cache.verify import verify_cache
from layerfuse.pipeline.cache.writer import compressor
from tests.support import extract_config


def _array(root: Path, codec: str, dtype: str, n: int, **kw) -> zarr.Array:
    g = zarr.open_group(str(root), mode="w")
    return g.create_array("f", shape=(n, 3, 4, 5), chunks=(3, 1, 4, 5), shards=(6, 3, 4, 5), dtype=dtype,
                          compressors=compressor(codec, 1) if codec != "blosc-zstd" else compressor(codec, 3), fill_value=0, **kw)


@pytest.mark.parametrize("codec", ["zstd", "none"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "uint16", "int8", "uint8"])
def test_zarr_reads_shard_objects_as_its_own(tmp_path, codec, dtype):
    n = 10  # shard 1 holds rows 6..9: one inner chunk straddles the array's end (9..11), none lies beyond it
    a = _array(tmp_path, codec, dtype, n)
    layout = ShardObject.of(a)
    assert layout == ShardObject((6, 3, 4, 5), (3, 1, 4, 5), np.dtype(dtype).newbyteorder("<"), 1 if codec == "zstd" else None)
    data = (np.random.default_rng(0).standard_normal((n, 3, 4, 5)) * 40).astype(dtype)
    for k in range(2):
        key = a.metadata.encode_chunk_key((k, 0, 0, 0))
        with replacing(f"{a.store_path.store.root}/{a.path}/{key}") as tmp, open(tmp, "wb") as f:
            for piece in layout.encode(data[6 * k : 6 * (k + 1)]):
                f.write(piece)
    back = zarr.open_group(str(tmp_path), mode="r")["f"]
    assert np.array_equal(back[:], data)
    assert np.array_equal(back[7:9, 1], data[7:9, 1])  # a partial read goes through the index


def test_chunks_beyond_the_array_are_not_stored(tmp_path):
    a = _array(tmp_path, "zstd", "float16", 8)  # shard 1: rows 6, 7 -> inner chunk rows 6..8 stored, 9..11 not
    pieces = ShardObject.of(a).encode(np.ones((2, 3, 4, 5), np.float16))
    index = np.frombuffer(pieces[-1][:-4], "<u8").reshape(2, 3, 1, 1, 2)
    assert len(pieces) == 3 + 1 and (index[1] == NOT_STORED).all() and (index[0] != NOT_STORED).all()


def test_other_layouts_are_left_to_zarr(tmp_path):
    assert ShardObject.of(_array(tmp_path / "blosc", "blosc-zstd", "float16", 8)) is None
    g = zarr.open_group(str(tmp_path / "plain"), mode="w")
    assert ShardObject.of(g.create_array("t", shape=(8, 4), chunks=(4, 4), dtype="float32", fill_value=0)) is None
    with pytest.raises(ValueError, match="cannot hold"):
        ShardObject.of(_array(tmp_path / "z", "zstd", "float16", 8)).encode(np.zeros((7, 3, 4, 5), np.float16))


def test_extraction_writes_feature_shards_through_shard_objects(vision_dir, tmp_path, monkeypatch):
    """A local cache's feature shards go through ShardObject (once per shard, int8 codes and scales too), and the
    cache they make verifies and reads like one zarr wrote."""
    calls: list[tuple[int, ...]] = []
    encode = ShardObject.encode

    def counted(self, data):
        calls.append(data.shape)
        return encode(self, data)

    monkeypatch.setattr(ShardObject, "encode", counted)
    out = tmp_path / "c"
    run_extract(extract_config(str(out), vision_dir, builtin=20, shard_samples=8, dtype="int8"))
    assert sorted(c[0] for c in calls) == [4, 4, 8, 8, 8, 8]  # 3 shards x (codes, scales); this tower has no outlier channels
    assert verify_cache(str(out), progress=False).ok
    monkeypatch.setattr(ShardObject, "of", classmethod(lambda cls, array: None))  # the same extraction through zarr
    ref = tmp_path / "ref"
    run_extract(extract_config(str(ref), vision_dir, builtin=20, shard_samples=8, dtype="int8"))
    assert len(calls) == 6  # none added
    a, b = FeatureCache(str(out)), FeatureCache(str(ref))
    assert np.array_equal(a.features(slice(None), None).numpy(), b.features(slice(None), None).numpy())
