"""Extraction end to end: cached features equal the encoder's hidden states, text embeddings, metadata, errors."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from layerfuse.pipeline.cache.extract import ExtractError, run_extract
from layerfuse.pipeline.cache.reader import (
    OK,
    SKIPPED,
    TEXT_ONLY,
    CacheError,
    FeatureCache,
)
from layerfuse.pipeline.cache.verify import cache_info, verify_cache
from layerfuse.pipeline.data.access import load_image
from layerfuse.pipeline.data.synthetic import synthetic_plan
from layerfuse.pipeline.models.encoder import load_vision_encoder
from layerfuse.pipeline.models.text import human_turns
from PIL import Image

from tests.support import extract_config, layerfuse_cmd


def direct_hidden_states(vision_dir, records, rows, pad_to_square=False) -> torch.Tensor:
    """hs computed by the encoder directly, batched exactly as extraction batches them."""
    enc = load_vision_encoder(str(vision_dir))
    pre = enc.preprocessor(pad_to_square)
    pix = torch.from_numpy(np.stack([pre(load_image(records[r], max_pixels=10**8)) for r in rows]))
    return enc(pix)


def test_fp32_cache_equals_hidden_states_exactly(fp32_cache, vision_dir):
    cache = FeatureCache(fp32_cache)
    assert len(cache) == 24 and cache.num_layers == 25 and cache.num_tokens == 65 and cache.has_cls
    records = synthetic_plan(24, 3).records
    rows = [4, 5, 6, 7]  # one extraction batch (batch_size=4, shard 0)
    ref = direct_hidden_states(vision_dir, records, rows)  # [4, 25, 65, 64]
    for k in (0, 3, 18, 23, 24):
        got = cache.features(rows, [k])[:, 0]
        assert got.dtype == torch.float32
        assert torch.equal(got, ref[:, k]), f"layer {k} differs"
    assert cache.ids == [r.id for r in records]


def test_fp16_and_bf16_within_rounding(tmp_path, vision_dir, fp32_cache):
    ref = FeatureCache(fp32_cache).features(slice(0, 8), [0, 12, 24])
    for dtype, torch_dtype, rel in (("float16", torch.float16, 2**-11), ("bfloat16", torch.bfloat16, 2**-8)):
        out = tmp_path / dtype
        run_extract(extract_config(str(out), vision_dir, dtype=dtype, builtin=8))
        got = FeatureCache(out).features(slice(0, 8), [0, 12, 24])
        assert got.dtype == torch_dtype
        assert torch.equal(got, ref.to(torch_dtype)), f"{dtype}: stored values are not the rounded fp32 features"
        assert (got.float() - ref).abs().max() <= rel * ref.abs().max()


def test_layer_selection_order_and_negative_indices(fp32_cache):
    cache = FeatureCache(fp32_cache)
    full = cache.features([2, 0, 2], None)
    assert full.shape == (3, 25, 65, 64)
    sel = cache.features([2, 0, 2], [23, 3, -1])
    assert torch.equal(sel, full[:, [23, 3, 24]])
    assert torch.equal(sel[0], sel[2])
    with pytest.raises(CacheError, match="layer 25 is not in cache"):
        cache.features([0], [25])


def test_text_embeddings_match_sentence_model(fp32_cache, embedder):
    cache = FeatureCache(fp32_cache)
    convs = cache.conversations([0, 1, 2])
    turns, num = cache.text_embeddings([0, 1, 2], per_turn=True)
    mean = cache.text_embeddings([0, 1, 2])
    assert mean.shape == (3, 384) and cache.text_dim == 384
    for i, conv in enumerate(convs):
        texts = human_turns(conv)
        assert num[i] == len(texts) >= 1
        assert all("<image>" not in t and "single word" not in t for t in texts)
        ref = embedder.model.encode(texts, convert_to_numpy=True)
        np.testing.assert_allclose(turns[i, : len(texts)].numpy(), ref, atol=1e-5)
        np.testing.assert_allclose(mean[i].numpy(), ref.mean(0), atol=1e-5)


def test_metadata_and_conversations_stored(fp32_cache, vision_dir):
    cache = FeatureCache(fp32_cache)
    m = cache.meta
    records = synthetic_plan(24, 3).records
    assert cache.conversations([5])[0] == records[5].conversations
    assert list(cache.categories) == [r.category for r in records]
    assert list(cache.splits) == [r.split for r in records]
    assert (cache.image_sizes == 96).all()
    assert m["encoder"]["num_layers"] == 24 and m["encoder"]["hidden_size"] == 64 and m["encoder"]["grid"] == [8, 8]
    assert len(m["encoder"]["config_hash"]) == 16 and m["encoder"]["path"] == str(vision_dir)
    assert m["processor"]["crop_size"] == {"height": 96, "width": 96} and m["processor"]["pad_to_square"] is False
    assert m["storage"]["dtype"] == "float32" and m["text"]["dim"] == 384 and m["text"]["model"] == "all-MiniLM-L6-v2"
    for key in ("layerfuse_version", "created", "completed", "config_hash"):
        assert m[key]
    assert verify_cache(fp32_cache, progress=False).ok


def test_memory_url_roundtrip(vision_dir, fp32_cache):
    url = "memory://layerfuse-test/cache"
    run_extract(extract_config(url, vision_dir, dtype="float32"))
    mem, disk = FeatureCache(url), FeatureCache(fp32_cache)
    assert mem.ids == disk.ids
    assert torch.equal(mem.features([1, 9, 17], [0, 24]), disk.features([1, 9, 17], [0, 24]))
    assert verify_cache(url, progress=False).ok


def test_layer_reads_touch_only_their_chunks(fp32_cache, monkeypatch):
    """Reading 3 of 25 layers fetches 3/25 of the feature bytes (chunk = one sample-layer)."""
    import zarr.storage

    cache = FeatureCache(fp32_cache)
    fetched: list[int] = []
    real_get = zarr.storage.LocalStore.get

    async def counting_get(self, key, prototype, byte_range=None):
        buf = await real_get(self, key, prototype, byte_range)
        if key.startswith("features/c/") and buf is not None:
            fetched.append(len(buf))
        return buf

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    cache.features(slice(0, 8), [3, 18, 23])
    three = sum(fetched)
    fetched.clear()
    cache.features(slice(0, 8), None)
    full = sum(fetched)
    assert 0 < three / full < 3 / 25 + 0.02


def test_bad_images_are_skipped_and_recorded(tmp_path, vision_dir):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "good.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(root / "cmyk.jpg")
    (root / "empty.png").write_bytes(b"")
    good = (root / "good.png").read_bytes()
    (root / "cut.png").write_bytes(good[: len(good) // 2])
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    recs = [
        {"id": "a", "image": "good.png", "conversations": conv},
        {"id": "b", "image": "missing.png", "conversations": conv},
        {"id": "c", "image": "empty.png", "conversations": conv},
        {"id": "d", "image": "cut.png", "conversations": conv},
        {"id": "e", "image": "cmyk.jpg", "conversations": conv},
        {"id": "f", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "g", "image": "good.png", "conversations": [{"from": "human", "value": "No token"}, {"from": "gpt", "value": "x"}]},
        {"id": "h", "image": "good.png"},
    ]
    js = tmp_path / "data.json"
    js.write_text(json.dumps(recs))
    out = tmp_path / "cache"
    res = run_extract(extract_config(str(out), vision_dir, builtin=None, llava=str(js), image_root=str(root), shard_samples=3))
    assert res.summary == {"ok": 3, "text_only": 1, "skipped": 3, "refused": 0, "plan_skipped": 1, "notes": 1}
    cache = FeatureCache(out)
    assert cache.ids == ["a", "e", "f", "g"]
    assert list(cache.has_image) == [True, True, False, True]
    assert cache.num_turns([2])[0] == 0 and not cache.text_embeddings([2]).any()  # text-only: marked empty
    assert not cache.features([2], [0]).any()
    assert "<image>" in cache.conversations([3])[0][0]["value"]  # repaired
    reasons = {i["id"]: (i["stage"], i["reason"]) for i in cache.issues()}
    assert reasons["b"][0] == "image" and "not found" in reasons["b"][1]
    assert reasons["c"][0] == "image" and "empty" in reasons["c"][1]
    assert reasons["d"][0] == "image" and "truncated" in reasons["d"][1].lower()
    assert reasons["h"][0] == "plan" and reasons["g"][0] == "note"
    info = cache_info(str(out))
    assert {i["id"] for i in info["skipped"]} == {"b", "c", "d", "h"}
    assert verify_cache(str(out), progress=False).ok
    status = np.asarray(cache.group["samples/status"][:])
    assert list(status) == [OK, SKIPPED, SKIPPED, SKIPPED, OK, TEXT_ONLY, OK]

    # --strict stops at the first problem: a malformed record while planning, else a repair, else the first bad image
    with pytest.raises(ExtractError, match=r"--strict: sample h .*no 'conversations'"):
        run_extract(extract_config(str(tmp_path / "strict"), vision_dir, builtin=None, llava=str(js), image_root=str(root), strict=True, shard_samples=3))
    js.write_text(json.dumps(recs[:-1]))
    with pytest.raises(ExtractError, match=r"--strict: sample g .*no <image> token.*--strict refuses repairs"):
        run_extract(extract_config(str(tmp_path / "strict2"), vision_dir, builtin=None, llava=str(js), image_root=str(root), strict=True, shard_samples=3))
    js.write_text(json.dumps(recs[:-2]))
    with pytest.raises(ExtractError, match=r"--strict: sample b .*not found"):
        run_extract(extract_config(str(tmp_path / "strict3"), vision_dir, builtin=None, llava=str(js), image_root=str(root), strict=True, shard_samples=3))


def test_resume_refuses_other_settings(tmp_path, vision_dir):
    out = tmp_path / "c"
    run_extract(extract_config(str(out), vision_dir, builtin=8))
    again = run_extract(extract_config(str(out), vision_dir, builtin=8))
    assert again.already_complete
    with pytest.raises(ExtractError, match="differs in: dtype"):
        run_extract(extract_config(str(out), vision_dir, builtin=8, dtype="float32"))
    run_extract(extract_config(str(out), vision_dir, builtin=8, dtype="float32", overwrite=True))
    assert FeatureCache(out).storage_dtype == "float32"


def test_verify_detects_corruption(tmp_path, vision_dir):
    out = tmp_path / "c"
    run_extract(extract_config(str(out), vision_dir, builtin=8))
    cache = FeatureCache(out)
    arr = cache.group["features"]
    x = np.asarray(arr[3:4])
    x[0, 5, 7, 9] = np.float16(np.nan)
    import zarr

    zarr.open_array(str(out / "features"), mode="r+")[3:4] = x
    rep = verify_cache(str(out), progress=False)
    assert not rep.ok
    joined = " ".join(rep.problems)
    assert "row 3" in joined and "fails its checksum" in joined and "NaN" in joined
    r = subprocess.run(layerfuse_cmd("cache", "verify", str(out), "--quiet"), capture_output=True, text=True)
    assert r.returncode == 1 and "FAILED" in r.stderr


def test_incomplete_cache_is_refused(tmp_path, vision_dir):
    out = tmp_path / "c"
    run_extract(extract_config(str(out), vision_dir, builtin=8))
    import zarr

    g = zarr.open_group(str(out), mode="r+")
    meta = dict(g.attrs["layerfuse"])
    meta["complete"] = False
    g.attrs["layerfuse"] = meta
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache(out)
    assert not verify_cache(str(out), progress=False).ok


def test_random_rows_and_layers_match_full_array(fp32_cache):
    """Span/run reads agree with plain indexing for scattered, repeated, unsorted rows across chunks."""
    cache = FeatureCache(fp32_cache)
    assert cache.group["features"].chunks[0] == 8  # several samples per chunk: spans must cut them correctly
    full = torch.from_numpy(np.asarray(cache.group["features"][:]))
    rng = np.random.default_rng(0)
    for _ in range(5):
        rows = rng.integers(0, 24, size=rng.integers(1, 12))
        layers = rng.choice(25, size=rng.integers(1, 6), replace=False).tolist()
        assert torch.equal(cache.features(rows, layers), full[rows][:, layers])
