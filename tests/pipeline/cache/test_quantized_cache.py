"""Quantised caches (--dtype int8 / float8_e4m3fn): extraction, layout, checksums, error records, resume, derive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import zarr
from PIL import Image

from layerfuse.pipeline.cache import derive as derive_module
from layerfuse.pipeline.cache.derive import derive_cache
from layerfuse.core.dtypes import StorageDtype
from layerfuse.pipeline.cache.encoding import FEATURES, OUTLIERS, SCALE, FeatureEncoding, running_absmax
from layerfuse.pipeline.cache.extract import _ShardBuffer, _Storer, run_extract, storage_layout
from layerfuse.pipeline.cache.plan import encoder_shape, plan_cache
from layerfuse.pipeline.cache.quantize import ErrorStats
from layerfuse.pipeline.cache.reader import OK, SKIPPED, TEXT_ONLY, CorruptRowsError, FeatureCache
from layerfuse.pipeline.cache.verify import cache_info, format_info, verify_cache
from layerfuse.pipeline.cache.writer import CacheWriter, FeaturePool
from tests.support import extract_config

OUTLIER_CHANNELS = (5, 17)


@pytest.fixture(scope="module")
def outlier_tower(tmp_path_factory, vision_dir):
    """The test tower with two channels of its position embeddings raised: like trained ViTs, every hidden state then
    has a few channels far above the rest."""
    model = transformers.CLIPVisionModel.from_pretrained(vision_dir)
    with torch.no_grad():
        emb = next(m for name, m in model.named_modules() if name.endswith("embeddings.position_embedding"))
        emb.weight[:, list(OUTLIER_CHANNELS)] += 40.0
    out = tmp_path_factory.mktemp("outlier-tower")
    model.save_pretrained(out)
    transformers.AutoImageProcessor.from_pretrained(vision_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory, outlier_tower):
    """The same 24 samples in float16, int8 and float8_e4m3fn."""
    root = tmp_path_factory.mktemp("quantised")
    out = {}
    for dtype in ("float16", "int8", "float8_e4m3fn"):
        out[dtype] = str(root / dtype)
        run_extract(extract_config(out[dtype], outlier_tower, dtype=dtype))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype,bound", [("int8", 0.012), ("float8_e4m3fn", 0.04)])
def test_quantised_extraction_reads_back_close_to_float16(caches, dtype, bound):
    ref, q = FeatureCache(caches["float16"]), FeatureCache(caches[dtype])
    assert q.storage_dtype == dtype and q.feature_dtype == "float16"
    x, y = q.features(slice(None)), ref.features(slice(None))
    assert x.dtype == torch.float16 and x.shape == y.shape
    assert _rel(x, y) < bound
    # a subset of layers reads the same values as the whole
    assert torch.equal(q.features([3, 0, 7], [20, 2]), x[[3, 0, 7]][:, [20, 2]])
    # rows and layers repeated, out of order, in a span with gaps, or contiguous (read without reordering copies)
    assert torch.equal(q.features([5, 1, 5, 2, 3], [3, 3, 0]), x[[5, 1, 5, 2, 3]][:, [3, 3, 0]])
    assert torch.equal(q.features([2, 4, 9]), x[[2, 4, 9]]) and torch.equal(q.features(slice(6, 19), [4, 5, 6]), x[6:19, 4:7])
    # rows without an image are exact zeros, as in a float cache
    assert torch.equal(x[~torch.from_numpy(q.has_image)].float().abs().sum(), torch.tensor(0.0))
    assert verify_cache(caches[dtype], progress=False).ok


def test_int8_keeps_the_outlier_channels_exact_to_float16(caches):
    q, ref = FeatureCache(caches["int8"]), FeatureCache(caches["float16"])
    quant = q.meta["storage"]["quant"]
    assert quant["scheme"] == "token+outliers" and quant["inputs"] == 25
    assert all(set(OUTLIER_CHANNELS) <= set(ch) for ch in quant["outlier_channels"])
    n = len(quant["outlier_channels"][0])
    assert q.group[OUTLIERS].shape == (24, 25, q.num_tokens, n) and q.group[SCALE].shape == (24, 25, q.num_tokens)
    assert q.group["features"].dtype == np.int8
    rows = np.flatnonzero(q.has_image)
    x, y = q.features(rows), ref.features(rows)
    assert torch.equal(x[..., list(OUTLIER_CHANNELS)], y[..., list(OUTLIER_CHANNELS)])  # fp16 in, fp16 out
    # with the outliers out of the way, the per-token scale serves the ordinary channels: the error stays at int8's
    assert _rel(x, y) < 0.012
    plain = FeatureEncoding.calibrate("int8", None, 25)  # no outlier channels: the outliers set every token's scale
    block = y.float()
    assert _rel(plain.decode(plain.encode(block)), block) > 3 * _rel(x, y)


def test_recorded_error_is_the_error_a_reader_sees(caches):
    for dtype in ("int8", "float8_e4m3fn"):
        q, ref = FeatureCache(caches[dtype]), FeatureCache(caches["float16"])
        errors = q.meta["storage"]["quant"]["errors"]
        assert len(errors) == 25
        rows = np.flatnonzero(q.has_image)
        for layer in (0, 12, 24):
            got = _rel(q.features(rows, [layer]), ref.features(rows, [layer]))
            # recorded against the tower's float32 output, measured here against its float16 copy
            assert errors[layer]["rel_rms"] == pytest.approx(got, rel=0.1, abs=2e-4)
            assert 0.99 < errors[layer]["cosine"] <= 1.0 and errors[layer]["clip_rate"] == 0.0
        text = format_info(cache_info(caches[dtype]))
        assert "quantisation error per stored input" in text and "hs[24]" in text


def test_checksums_cover_scales_and_outliers(tmp_path, caches):
    import shutil

    for part in (SCALE, OUTLIERS):
        copy = tmp_path / part.replace("/", "-")
        shutil.copytree(caches["int8"], copy)
        arr = zarr.open_array(str(copy / part), mode="r+")
        row = int(np.flatnonzero(FeatureCache(str(copy)).has_image)[2])
        values = np.asarray(arr[row, 4])
        arr[row, 4] = values * 2 + 1  # a rewritten scale/outlier: valid zarr, wrong values
        cache = FeatureCache(str(copy))
        assert torch.equal(cache.features([0], [4]), FeatureCache(caches["int8"]).features([0], [4]))  # other rows fine
        with pytest.raises(CorruptRowsError, match="layer 4 of the features fails its checksum") as e:
            cache.features([row], [4])
        assert list(e.value.storage_rows) == [row]
        assert not verify_cache(str(copy), progress=False).ok


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn", "float16", "bfloat16"])
def test_storer_writes_runs_of_rows_into_a_recycled_shard_buffer(dtype):
    """_Storer.write puts a batch's images into their shard rows (a skipped image between them: two runs) equal to
    encoding the images alone, adds the same error to the shard's stats, and `result` zeroes the rows without an image
    that a recycled buffer still holds values in."""
    storage = {"dtype": dtype, "layers": [0, 2], "views": [[1, 2]]}
    enc = FeatureEncoding.calibrate(dtype, None, 3) if dtype == "int8" else FeatureEncoding(StorageDtype(dtype))
    storer = _Storer(storage, 2, torch.device("cpu"), enc)
    pool = FeaturePool(enc, (3, 7, 16), pin=False)
    stale = pool.take(6)
    for v in stale.values():
        v[...] = 1  # what a previous shard left
    pool.give(stale)
    buf = _ShardBuffer(0, 0, 6, pool, 1, 4, torch.device("cpu"))
    assert buf.parts[FEATURES] is stale[FEATURES]  # recycled, not allocated again
    hs = torch.randn(4, 3, 7, 16, generator=torch.Generator().manual_seed(0))
    rows = np.array([0, 1, 3, 4])  # row 2: a skipped image; row 5: text only
    storer.write(hs, buf, rows)
    buf.status[:] = [OK, OK, SKIPPED, OK, OK, TEXT_ONLY]
    res = buf.result()
    alone = ErrorStats(3) if enc.scheme is not None else None
    want = enc.encode(storer.block(hs), alone)
    for name, values in res.parts().items():
        assert np.array_equal(values[rows], want[name]), name
        assert not values[[2, 5]].any(), name
    if alone is not None:  # two runs' float64 sums against one sum over the batch: equal up to their rounding
        got = res.quant_error.to_json()
        for name, v in alone.to_json().items():
            np.testing.assert_allclose(got[name], v, rtol=1e-12, err_msg=name)
    assert torch.allclose(storer.block(hs)[:, 2], hs[:, 1:3].mean(1))


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_quantised_parts_staged_apart_equal_those_written_in_place(dtype):
    """Off the CPU, encode_into quantises a block into buffers of its own (on the device) and copies each part to the
    host once; on the CPU into the host rows directly. quantize_into fills either the same: here the staged buffers
    are fresh CPU tensors, the direct ones rows of a bigger shard buffer."""
    x = torch.randn(5, 3, 7, 16, generator=torch.Generator().manual_seed(1))
    x[..., 4] *= 30  # an outlier channel for int8
    x[2] = 0  # a row without an image
    enc = FeatureEncoding.calibrate(dtype, running_absmax(None, x), 3)
    direct = {p: np.full((8, *v.shape[1:]), 3, v.dtype) for p, v in enc.encode(x).items()}  # rows 2..6 of a shard of 8
    direct_stats, staged_stats = ErrorStats(3), ErrorStats(3)
    enc.encode_into(x, {p: v[2:7] for p, v in direct.items()}, direct_stats)
    want = enc.encode(x)
    staged = {p: torch.empty(v.shape, dtype=torch.from_numpy(v).dtype) for p, v in want.items()}
    if dtype == "float8_e4m3fn":
        staged[FEATURES] = torch.empty(want[FEATURES].shape, dtype=torch.float8_e4m3fn)
    enc.quantize_into(x, staged, staged_stats)
    for p, v in want.items():
        assert np.array_equal(direct[p][2:7], v), p
        assert not (direct[p][[0, 1, 7]] != 3).any(), p  # the rows around are untouched
        got = staged[p].view(torch.uint8) if staged[p].dtype == torch.float8_e4m3fn else staged[p]
        assert np.array_equal(got.numpy(), v), p
    assert direct_stats.to_json() == staged_stats.to_json()


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_a_checked_block_is_quantised_without_waiting_for_its_device(dtype):
    """Extraction checks each image once (`_Storer.check`) and passes `valid`: then no stored layer's quantisation
    reads a value on the host (the finiteness test, the zero-scale test), which on a GPU would be a sync per layer. The
    meta device has shapes and no values, so any such read fails there; without `valid` the finiteness test reads."""
    x = torch.randn(5, 3, 7, 16, generator=torch.Generator().manual_seed(2))
    x[..., 4] *= 30
    enc = FeatureEncoding.calibrate(dtype, running_absmax(None, x), 3)
    dtypes = {p: torch.from_numpy(v).dtype for p, v in enc.encode(x).items()}
    out = {p: torch.empty((5, *v.shape[1:]), dtype=dtypes[p], device="meta") for p, v in enc.encode(x).items()}
    stats = ErrorStats(3, "meta")
    enc.quantize_into(x.to("meta"), out, stats, torch.ones(5, dtype=torch.bool, device="meta"))
    assert all(getattr(stats, f).device.type == "meta" for f in ErrorStats.FIELDS)
    with pytest.raises((RuntimeError, NotImplementedError)):
        enc.quantize_into(x.to("meta"), out, ErrorStats(3, "meta"))


def test_rows_extraction_did_not_store_count_in_no_error_sum():
    """A row `valid` marks False (an image the check refused, zeroed) adds nothing to the error sums, its values
    included: the clip rate is over stored values."""
    x = torch.randn(5, 3, 7, 16, generator=torch.Generator().manual_seed(3))
    x[0, 1, 2, 3] = 1e7  # beyond int8's float16 scales: clips
    x[2] = 0
    enc = FeatureEncoding.calibrate("int8", running_absmax(None, x), 3)
    kept = torch.tensor([True, True, False, True, True])
    with_valid, alone = ErrorStats(3), ErrorStats(3)
    enc.encode_into(x, enc.encode(x), with_valid, kept)
    enc.encode(x[kept], alone)
    for name, v in alone.to_json().items():
        np.testing.assert_allclose(with_valid.to_json()[name], v, rtol=1e-12, err_msg=name)
    assert with_valid.values.tolist() == [4 * 7 * 16] * 3 and with_valid.clips[1] > 0


def test_killed_extraction_resumes_to_the_same_cache_and_errors(tmp_path, monkeypatch, outlier_tower, caches):
    out = str(tmp_path / "int8")
    real = CacheWriter.write_shard
    written = []

    def dies_after_one(self, res):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(res.index)
        real(self, res)

    monkeypatch.setattr(CacheWriter, "write_shard", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_extract(extract_config(out, outlier_tower, dtype="int8"))
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    res = run_extract(extract_config(out, outlier_tower, dtype="int8"))
    assert res.shards_written == 2  # the first shard was kept
    a, b = FeatureCache(out), FeatureCache(caches["int8"])
    assert torch.equal(a.features(slice(None)), b.features(slice(None)))
    qa, qb = a.meta["storage"]["quant"], b.meta["storage"]["quant"]
    assert qa["outlier_channels"] == qb["outlier_channels"]
    assert [e["rel_rms"] for e in qa["errors"]] == pytest.approx([e["rel_rms"] for e in qb["errors"]], rel=1e-9)
    assert [e["max_abs"] for e in qa["errors"]] == [e["max_abs"] for e in qb["errors"]]


def test_derive_float16_to_int8_and_int8_to_fewer_layers(tmp_path, caches):
    dst = str(tmp_path / "int8")
    res = derive_cache(caches["float16"], dst, dtype="int8", progress=False)
    assert res.shards_written == 3
    d, src = FeatureCache(dst), FeatureCache(caches["float16"])
    assert d.storage_dtype == "int8" and verify_cache(dst, progress=False).ok
    assert _rel(d.features(slice(None)), src.features(slice(None))) < 0.012
    assert set(OUTLIER_CHANNELS) <= set(d.meta["storage"]["quant"]["outlier_channels"][0])
    assert d.meta["storage"]["quant"]["errors"][3]["rel_rms"] < 0.012
    small = str(tmp_path / "small")
    derive_cache(dst, small, layers="3-18-23", progress=False)
    s = FeatureCache(small)
    assert s.stored_layers == [3, 18, 23] and s.storage_dtype == "int8"
    assert _rel(s.features(slice(None)), d.features(slice(None), [3, 18, 23])) < 0.012  # requantised: close, not equal


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_derive_fills_a_recycled_buffer_as_a_fresh_one(tmp_path, outlier_tower, dtype):
    """A derived shard in a buffer a previous shard left values in: the image rows are SRC's rows encoded, and every
    row without an image (a missing image, a text-only sample) is zero, as in a freshly zeroed buffer."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + 8 * i, 36), (60 * i, 90, 200 - 50 * i)).save(root / f"{i}.png")
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
    recs = [{"id": "a", "image": "0.png", "conversations": conv}, {"id": "b", "image": "gone.png", "conversations": conv},
            {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"id": "d", "image": "1.png", "conversations": conv}, {"id": "e", "image": "2.png", "conversations": conv}]
    (tmp_path / "data.json").write_text(json.dumps(recs))
    source = str(tmp_path / "src")
    run_extract(extract_config(source, outlier_tower, builtin=None, llava=str(tmp_path / "data.json"), image_root=str(root), shard_samples=3))
    dst = str(tmp_path / dtype)
    derive_cache(source, dst, dtype=dtype, progress=False)
    src, writer = FeatureCache(source), CacheWriter(dst)
    enc = FeatureEncoding.from_storage(writer.meta["storage"])
    inputs = [*src.stored_layers, *src.views]
    status = src.table("samples/status")
    k = next(k for k in range(writer.num_shards) if len(set(status[slice(*writer.shard_rows(k))])) == 3)  # OK, SKIPPED, TEXT_ONLY
    a, b = writer.shard_rows(k)
    pool = FeaturePool(enc, (len(inputs), src.num_tokens, src.hidden_size), pin=False)
    stale = pool.take(b - a)
    for v in stale.values():
        v[...] = 3
    pool.give(stale)
    res = derive_module._shard(src, writer, k, inputs, enc, pool, {})
    assert res.features is stale[FEATURES]  # recycled
    images = np.flatnonzero(status[a:b] == OK)
    want = enc.encode(src.features_at(np.arange(a, b)[images], inputs))
    for name, values in res.parts().items():
        assert np.array_equal(values[images], want[name]), name
        assert not values[status[a:b] != OK].any(), name
    stored = FeatureCache(dst)  # and the derive itself stored those rows
    assert torch.equal(stored.features_at(np.arange(a, b)), enc.decode({p: v for p, v in res.parts().items()}))


def test_plan_matches_a_quantised_extraction(tmp_path, caches, outlier_tower):
    """The plan's feature bytes and files are those of the real int8 / float8 cache (int8: at its n outliers, the
    plan's upper bound being MAX_OUTLIERS)."""
    for dtype in ("int8", "float8_e4m3fn"):
        cache = FeatureCache(caches[dtype])
        cfg = extract_config(caches[dtype], outlier_tower, dtype=dtype)
        shape = encoder_shape(str(outlier_tower))
        shard, chunk = storage_layout(cfg, shape)
        p = plan_cache(shape, 24, shard_samples=shard, chunk_samples=chunk, dtype=dtype, string_bytes=200)
        stored = sum(int(np.prod(cache.group[path].shape[1:])) * cache.group[path].dtype.itemsize
                     for path in cache.encoding.part_shapes(1, 1))
        outliers = (16 - cache.encoding.num_outliers) * 25 * cache.num_tokens * 2 if dtype == "int8" else 0
        assert p.feature_bytes - outliers == stored
        assert p.files["feature shards"] == 3 * len(cache.encoding.part_shapes(1, 1))  # 3 shards of each part
        found = [f for f in Path(caches[dtype]).rglob("*") if f.is_file()]
        assert p.num_files == len(found), sorted(str(f.relative_to(caches[dtype])) for f in found)


def test_running_absmax_is_the_block_absmax():
    x = torch.randn(6, 3, 5, 8)
    m = running_absmax(running_absmax(None, x[:2]), x[2:])
    assert torch.equal(m, x.abs().amax(dim=(0, 2)))


def _channels_from(cache: FeatureCache, images: int) -> list[list[int]]:
    """The outlier channels int8 extraction should choose: calibrated on the absmax of the first `images` images."""
    rows = np.flatnonzero(cache.table("samples/status") == 1)[:images]
    absmax = running_absmax(None, cache.features_at(rows))
    return FeatureEncoding.calibrate("int8", absmax, len(cache.inputs)).channels.tolist()


def test_calibration_uses_the_first_32_readable_images(tmp_path, outlier_tower):
    """40 built-in samples (more than 32 images): the channels are those of the first 32 images' absmax in storage
    order, computed here from a float32 extraction of the same source."""
    ref, q = str(tmp_path / "fp32"), str(tmp_path / "int8")
    run_extract(extract_config(ref, outlier_tower, builtin=40, dtype="float32"))
    run_extract(extract_config(q, outlier_tower, builtin=40, dtype="int8", layers="3-18-23"))
    fp32 = FeatureCache(ref)
    assert fp32.has_image.sum() > 32
    want = FeatureEncoding.calibrate("int8", running_absmax(None, fp32.features_at(
        np.flatnonzero(fp32.table("samples/status") == 1)[:32], [3, 18, 23])), 3).channels.tolist()
    assert FeatureCache(q).meta["storage"]["quant"]["outlier_channels"] == want


def test_int8_from_webdataset_calibrates_through_the_stream(tmp_path, outlier_tower):
    """A WebDataset source: calibration reads its images through the same streaming path as extraction."""
    from tests.pipeline.data.test_stream import _shards

    shards = _shards(tmp_path, 2, 5)
    ref, q = str(tmp_path / "fp32"), str(tmp_path / "int8")
    run_extract(extract_config(ref, outlier_tower, builtin=None, wds=",".join(shards), dtype="float32"))
    run_extract(extract_config(q, outlier_tower, builtin=None, wds=",".join(shards), dtype="int8"))
    cache = FeatureCache(q)
    assert cache.meta["summary"]["ok"] == 10
    assert cache.meta["storage"]["quant"]["outlier_channels"] == _channels_from(FeatureCache(ref), 32)
    assert set(OUTLIER_CHANNELS) <= set(cache.meta["storage"]["quant"]["outlier_channels"][0])
    assert _rel(cache.features(slice(None)), FeatureCache(ref).features(slice(None))) < 0.012


def test_quantised_caches_have_the_float16_layout(caches, outlier_tower):
    """Same rows per chunk and shard as the float16 cache of the same source (storage_layout counts float16 bytes for
    the quantised dtypes), so training sees the same data order; the tiny tower's defaults would otherwise give 1-byte
    dtypes twice the rows per chunk."""
    shape = encoder_shape(str(outlier_tower))
    layouts = {d: storage_layout(extract_config("x", outlier_tower, dtype=d, shard_samples=None), shape)
               for d in ("float16", "int8", "float8_e4m3fn")}
    assert layouts["int8"] == layouts["float8_e4m3fn"] == layouts["float16"] == (256, 32)
    ref = FeatureCache(caches["float16"])
    for dtype in ("int8", "float8_e4m3fn"):
        q = FeatureCache(caches[dtype])
        assert (q.chunk_rows, q.shard_rows) == (ref.chunk_rows, ref.shard_rows)
