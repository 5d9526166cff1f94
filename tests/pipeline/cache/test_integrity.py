"""A damaged or edited cache is never read silently: every case issue 14 reproduced, each caught by the reader (one
clean error naming the sample, shard and cache), by `cache verify` (a report line, never a traceback) and by training."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from layerfuse.pipeline.cache.extract import ExtractError, run_extract
from layerfuse.pipeline.cache.integrity import block_checksums, crc32c, table_digest
from layerfuse.pipeline.cache.reader import CacheError, CorruptCacheError, CorruptRowsError, FeatureCache
from layerfuse.pipeline.cache.verify import verify_cache
from tests.support import extract_config, layerfuse_cmd


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, vision_dir) -> Path:
    """24 built-in samples in fp16, 3 shards of 8 rows (chunks of 8 rows)."""
    out = tmp_path_factory.mktemp("integrity") / "cache"
    run_extract(extract_config(str(out), vision_dir))
    return out


@pytest.fixture
def cache_copy(pristine, tmp_path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(pristine, out)
    return out


def shard_path(cache: Path, k: int) -> Path:
    return cache / "features" / "c" / str(k) / "0" / "0" / "0"


def edit_attrs(cache: Path, edit) -> None:
    g = zarr.open_group(str(cache), mode="r+")
    meta = json.loads(json.dumps(dict(g.attrs["layerfuse"])))
    edit(meta)
    g.attrs["layerfuse"] = meta


def verify_problems(cache: Path) -> str:
    rep = verify_cache(str(cache), progress=False)
    assert not rep.ok
    return "\n".join(rep.problems)


def test_checksum_primitives():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    a = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    got = block_checksums(a, axes=2)
    assert got.shape == (2, 3) and got[1, 2] == crc32c(a[1, 2].tobytes())
    assert block_checksums(a.astype(">f2"), axes=2).tolist() == got.tolist()  # always little-endian bytes
    assert table_digest(np.array(["a", "bc"], dtype=object)) != table_digest(np.array(["ab", "c"], dtype=object))
    assert table_digest(np.zeros(3, np.int16)) != table_digest(np.zeros(3, np.uint16))


def test_pristine_cache_reads_and_verifies(pristine):
    cache = FeatureCache(pristine)
    assert cache.meta["format_version"] == 2 and "manifest" in cache.meta
    assert cache.features(slice(0, 24), [0, 5, -1]).shape[0] == 24
    assert verify_cache(str(pristine), progress=False).ok


def test_flipped_bytes_in_a_chunk_stop_the_read(cache_copy):
    p = shard_path(cache_copy, 1)
    b = bytearray(p.read_bytes())
    for i in range(16):
        b[5000 + i] ^= 0xFF  # inside a compressed chunk: blosc decodes it without complaint
    p.write_bytes(bytes(b))
    cache = FeatureCache(cache_copy)
    with pytest.raises(CorruptRowsError, match=r"sample syn-3-\d+ \(storage row \d+, shard 1\).*fails its checksum") as e:
        cache.features(slice(0, 24), None)
    assert str(cache_copy) in str(e.value) and all(8 <= r < 16 for r in e.value.storage_rows)
    cache.features(slice(0, 8), None)  # the other shards are fine and still readable
    assert "shard 1: layer" in verify_problems(cache_copy)


def test_a_missing_shard_is_an_error_not_zeros(cache_copy):
    shard_path(cache_copy, 1).unlink()
    with pytest.raises(CorruptRowsError, match=r"shard 1.*shard file .* is missing"):
        FeatureCache(cache_copy).features([9], [3])
    assert "fails its checksum" in verify_problems(cache_copy)


@pytest.mark.parametrize("damage", ["truncate", "index"])
def test_a_truncated_shard_or_broken_index_is_a_report(cache_copy, damage):
    p = shard_path(cache_copy, 2)
    b = bytearray(p.read_bytes())
    if damage == "truncate":
        b = b[: len(b) // 2]
    else:
        for i in range(1, 30):  # the shard index sits at the end of the file
            b[-i - 8] ^= 0x55
    p.write_bytes(bytes(b))
    with pytest.raises(CorruptRowsError, match=r"shard 2\): its shard file cannot be read"):
        FeatureCache(cache_copy).features([20], [1])
    assert "shard 2: its shard file cannot be read" in verify_problems(cache_copy)
    r = subprocess.run(layerfuse_cmd("cache", "verify", str(cache_copy), "--quiet"), capture_output=True, text=True)
    assert r.returncode == 1 and "FAILED" in r.stderr and "Traceback" not in r.stderr


def test_edited_feature_dtype_in_zarr_json_is_refused(cache_copy):
    meta_path = cache_copy / "features" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    assert meta["data_type"] == "float16"
    meta["data_type"] = "uint16"
    meta_path.write_text(json.dumps(meta, indent=2))
    with pytest.raises(CorruptCacheError, match=r"metadata of array 'features'"):
        FeatureCache(cache_copy)
    assert "metadata of array 'features'" in verify_problems(cache_copy)


@pytest.mark.parametrize(
    "key, edit",
    [
        ("storage", lambda m: m["storage"].update(dtype="bfloat16")),
        ("encoder", lambda m: m["encoder"].update(has_cls=not m["encoder"]["has_cls"])),
        ("encoder", lambda m: m["encoder"].update(name="openai/clip-vit-large-patch14-336")),
        ("text", lambda m: m["text"].update(dim=m["text"]["dim"] + 1)),
    ],
)
def test_edited_attributes_are_refused(cache_copy, key, edit):
    edit_attrs(cache_copy, edit)
    with pytest.raises(CorruptCacheError, match=rf"root attributes changed since the cache was written: {key}"):
        FeatureCache(cache_copy)
    assert f"root attributes changed since the cache was written: {key}" in verify_problems(cache_copy)
    r = subprocess.run(layerfuse_cmd("cache", "info", str(cache_copy)), capture_output=True, text=True)
    assert r.returncode == 1 and "damaged" in r.stderr and "Traceback" not in r.stderr


def test_rewritten_answers_are_caught_per_row(cache_copy):
    arr = zarr.open_array(str(cache_copy / "samples" / "conversations"), mode="r+")
    convs = json.loads(str(arr[5]))
    convs[-1]["value"] = "something else"
    arr[5] = json.dumps(convs)
    cache = FeatureCache(cache_copy)
    cache.conversations([0, 1, 2])  # undamaged rows still read
    with pytest.raises(CorruptRowsError, match=r"sample syn-3-0000005 .*samples/conversations' fails its checksum"):
        cache.conversations([4, 5])
    assert "row 5 (syn-3-0000005), shard 0: 'samples/conversations' fails its checksum" in verify_problems(cache_copy)


def test_edited_splits_are_caught(cache_copy):
    arr = zarr.open_array(str(cache_copy / "samples" / "split"), mode="r+")
    arr[0] = "val" if str(arr[0]) == "train" else "train"
    cache = FeatureCache(cache_copy)
    with pytest.raises(CorruptCacheError, match=r"content of 'samples/split' changed"):
        cache.select(split="train")
    assert "content of 'samples/split' changed" in verify_problems(cache_copy)


def test_edited_text_embeddings_are_caught(cache_copy):
    arr = zarr.open_array(str(cache_copy / "text" / "mean"), mode="r+")
    x = np.asarray(arr[3])
    x[0] += 0.25
    arr[3] = x
    with pytest.raises(CorruptRowsError, match=r"text/mean' fails its checksum"):
        FeatureCache(cache_copy).text_embeddings([3])
    assert "'text/mean' fails its checksum" in verify_problems(cache_copy)


def test_format_1_cache_is_refused_with_the_way_out(cache_copy):
    edit_attrs(cache_copy, lambda m: m.update(format_version=1))
    with pytest.raises(CacheError, match=r"format 1.*--overwrite"):
        FeatureCache(cache_copy)


def test_extract_over_an_older_format(cache_copy, vision_dir):
    """A finished format-1 cache is not silently kept (nor destroyed): --overwrite is asked for; an unfinished one
    is extracted again in format 2."""
    cfg = extract_config(str(cache_copy), vision_dir)
    edit_attrs(cache_copy, lambda m: m.update(format_version=1))
    with pytest.raises(ExtractError, match=r"finished cache of format 1.*--overwrite"):
        run_extract(cfg)
    edit_attrs(cache_copy, lambda m: m.update(format_version=1, complete=False))
    res = run_extract(cfg)
    assert not res.already_complete and res.shards_written == 3
    assert FeatureCache(cache_copy).meta["format_version"] == 2 and verify_cache(str(cache_copy), progress=False).ok
