"""The encoder's output is checked before it is stored: an image whose hidden states hold nan or inf, or values beyond
what the storage dtype holds finite, is a recorded bad sample (issue stage "encoder"), not a crash and not infinities in
the cache. The tower is the test tower; a wrapper puts the bad value into the output of every solid-colour image."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from click.testing import CliRunner

from layerfuse.pipeline.cache.derive import derive_cache
from layerfuse.pipeline.cache.encoding import FeatureEncoding
from layerfuse.pipeline.cache.extract import REFUSED_PROBE, ExtractError, _Storer, run_extract
from layerfuse.pipeline.cache.reader import OK, SKIPPED, FeatureCache
from layerfuse.pipeline.cache.verify import cache_info, format_info, verify_cache
from layerfuse.pipeline.cli import main
from layerfuse.pipeline.models.encoder import VisionEncoder
from tests.support import extract_config

CONV = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "noise"}]
LAYER, TOKEN, CHANNEL = 5, 3, 2  # where the bad value goes
SOLID = "solid"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def source(tmp_path):
    """A LLaVA JSON of 5 noise images and one solid-colour image (the third), one shard of 8 rows."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        name = SOLID if i == 2 else f"noise{i}"
        pixels = np.full((40, 40, 3), (200, 30, 30), np.uint8) if name == SOLID else rng.integers(0, 256, (40, 40, 3), np.uint8)
        (tmp_path / f"{name}.png").write_bytes(_png(pixels))
        records.append({"id": name, "image": f"{name}.png", "conversations": CONV})
    js = tmp_path / "data.json"
    js.write_text(json.dumps(records))
    return js


def _poison(monkeypatch, value: float, every: bool = False) -> None:
    """The tower's output of every solid-colour image (or of every image) gets `value` at hs[LAYER][TOKEN, CHANNEL]."""
    real = VisionEncoder.forward

    def forward(self, pixel_values):
        hs = real(self, pixel_values)  # [B, L+1, T, D], an inference tensor
        solid = (pixel_values.flatten(2).std(-1).amax(-1) == 0) | every  # [B]
        with torch.inference_mode():
            hs[solid, LAYER, TOKEN, CHANNEL] = value
        return hs

    monkeypatch.setattr(VisionEncoder, "forward", forward)


def _extract(out, vision_dir, source, **kw):
    return run_extract(extract_config(str(out), vision_dir, builtin=None, llava=str(source), image_root=str(source.parent), **kw))


def _rows(cache: FeatureCache) -> dict[str, int]:
    """Reader row by sample id."""
    return {i: r for r, i in enumerate(cache.ids)}


@pytest.mark.parametrize("dtype", ["float16", "int8", "float8_e4m3fn"])
def test_an_image_with_non_finite_hidden_states_is_a_recorded_bad_sample(tmp_path, vision_dir, source, monkeypatch, dtype):
    clean = FeatureCache(_extract(tmp_path / "clean", vision_dir, source).url)
    _poison(monkeypatch, float("nan"))
    res = _extract(tmp_path / "bad", vision_dir, source, dtype=dtype)  # int8 and float8 used to stop here (QuantizeError)
    assert res.summary == {"ok": 5, "text_only": 0, "skipped": 1, "refused": 1, "plan_skipped": 0, "notes": 0}
    assert verify_cache(res.url).ok
    cache = FeatureCache(res.url)
    [issue] = cache.issues()
    assert (issue["id"], issue["stage"]) == (SOLID, "encoder")
    assert issue["reason"] == f"non-finite hidden states: nan or inf in hs[{LAYER}] of the vision encoder's output"
    g = cache.group
    rows = {str(i): r for r, i in enumerate(cache.table("samples/id"))}  # storage rows
    assert cache.status[rows[SOLID]] == SKIPPED and g["text/num_turns"][rows[SOLID]] == 0
    for path in ("features", "quant/scale", "quant/outliers", "text/turns", "text/mean"):
        if path in g:
            assert not np.asarray(g[path][rows[SOLID]]).any(), path  # stored as zeros
    info = cache_info(res.url)
    assert [i["id"] for i in info["skipped"]] == [SOLID] and f"{SOLID} [encoder] non-finite" in format_info(info)
    # every other image is stored as without the bad one
    want = clean.features([_rows(clean)[n] for n in cache.ids]).float()
    got = cache.features(None).float()
    assert [str(i) for i in cache.ids] == [f"noise{i}" for i in (0, 1, 3, 4, 5)]
    if dtype == "float16":
        assert torch.equal(got, want)
    else:
        assert (got - want).norm() / want.norm() < (0.01 if dtype == "int8" else 0.04)
        errors = cache.meta["storage"]["quant"]["errors"]
        assert all(np.isfinite(list(e.values())).all() for e in errors)


def test_hidden_states_beyond_float16_are_refused_there_and_stored_in_bfloat16(tmp_path, vision_dir, source, monkeypatch):
    _poison(monkeypatch, 1e5)
    fp16 = _extract(tmp_path / "fp16", vision_dir, source)
    assert fp16.summary["skipped"] == 1 and verify_cache(fp16.url).ok
    [issue] = FeatureCache(fp16.url).issues()
    assert issue["stage"] == "encoder" and issue["reason"] == (
        f"hidden states beyond float16: |x| up to 1e+05 in hs[{LAYER}], and float16 stores |x| < 65520 "
        "(--dtype bfloat16 or int8 stores them)")
    bf16 = _extract(tmp_path / "bf16", vision_dir, source, dtype="bfloat16")
    assert bf16.summary["skipped"] == 0
    cache = FeatureCache(bf16.url)
    row = _rows(cache)[SOLID]
    assert cache.status[cache.storage_rows([row])[0]] == OK
    assert float(cache.features([row], [LAYER])[0, 0, TOKEN, CHANNEL]) == float(torch.tensor(1e5).bfloat16())


def test_the_extract_summary_counts_the_refused_images_apart(tmp_path, vision_dir, source, monkeypatch):
    _poison(monkeypatch, float("nan"))
    r = CliRunner().invoke(main, ["extract", "--llava", str(source), "--out", str(tmp_path / "c"), "--vision", str(vision_dir),
                                  "--workers", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "5 images, 0 text-only, 0 skipped at decode, 1 refused after the encoder (nan, inf or out of the dtype's range)" in r.output
    assert f"skipped: {SOLID}: non-finite hidden states" in r.output  # and named below it


def test_strict_stops_at_the_first_image_whose_hidden_states_cannot_be_stored(tmp_path, vision_dir, source, monkeypatch):
    _poison(monkeypatch, float("inf"))
    with pytest.raises(ExtractError, match=rf"--strict: sample {SOLID} \(.*solid.png\): non-finite hidden states: nan or inf in hs\[{LAYER}\]"):
        _extract(tmp_path / "c", vision_dir, source, strict=True)


def test_a_run_whose_first_images_are_all_refused_stops(tmp_path, vision_dir, monkeypatch):
    """A tower or dtype wrong for the data would skip every image of a million-image run: after REFUSED_PROBE
    encoded images and none stored, the run stops with one clear error."""
    _poison(monkeypatch, 1e6, every=True)
    with pytest.raises(ExtractError) as e:
        run_extract(extract_config(str(tmp_path / "c"), vision_dir, builtin=120, batch_size=8, shard_samples=16))
    m = re.fullmatch(r"the first (\d+) images encoded were all refused, so none would be stored \(e\.g\. sample \S+: "
                     r"hidden states beyond float16: \|x\| up to 1e\+06 in hs\[5\], .*\); store another --dtype .*", str(e.value))
    assert m and REFUSED_PROBE <= int(m[1]) < REFUSED_PROBE + 8, str(e.value)  # stopped at the batch that reached the probe


def test_refusals_name_only_the_refused_samples():
    enc = FeatureEncoding.calibrate("float16", None, 2)
    x = torch.zeros(4, 2, 3, 5)
    x[1, 1, 0, 0], x[3, 0, 2, 4] = float("nan"), 7e4
    absmax, valid = enc.check(x)
    assert enc.refusals(absmax, valid, ["hs[3]", "hs[7]"]) == {
        1: "non-finite hidden states: nan or inf in hs[7] of the vision encoder's output",
        3: "hidden states beyond float16: |x| up to 7e+04 in hs[3], and float16 stores |x| < 65520 (--dtype bfloat16 or int8 stores them)"}


def test_the_check_waits_for_no_device():
    """On a GPU the check runs with the forward's stream: no host read of a value. The meta device has shapes and no
    values, so any such read fails there."""
    storer = _Storer({"layers": [0, 1, 2], "views": [[1, 2]]}, 2, torch.device("meta"), FeatureEncoding.calibrate("float16", None, 4))
    block = storer.block(torch.empty(3, 3, 5, 8, device="meta"))
    absmax, valid = storer.encoding.check(block)
    assert absmax.shape == (3, 4) and valid.shape == (3,) and valid.device.type == "meta"
    FeatureEncoding.calibrate("float8_e4m3fn", None, 4).check(block)  # quantised: the refused rows zeroed, unconditionally
    assert storer.names == ["hs[0]", "hs[1]", "hs[2]", "mean(hs[1..2])"]
    assert storer.encoding.refusal(np.asarray([1.0, 7e4, np.nan, 1.0], np.float32), storer.names) == (
        "non-finite hidden states: nan or inf in hs[2] and 1 more stored input(s) of the vision encoder's output")


def test_derive_refuses_rows_its_dtype_cannot_hold_as_extraction_would(tmp_path, vision_dir, source, monkeypatch):
    """A float32 cache holding 1e5 derived to float16: that row is skipped with the same `encoder` issue as an
    extraction in float16 gives it, and every other row equals the float16 extraction; derived to bfloat16 it stays."""
    _poison(monkeypatch, 1e5)
    fp32 = _extract(tmp_path / "fp32", vision_dir, source, dtype="float32")
    fp16 = FeatureCache(_extract(tmp_path / "fp16", vision_dir, source).url)
    res = derive_cache(fp32.url, str(tmp_path / "derived"), dtype="float16", progress=False)
    assert res.summary == fp16.meta["summary"] and verify_cache(res.url).ok
    derived = FeatureCache(res.url)
    assert derived.issues() == fp16.issues()
    assert derived.ids == fp16.ids and torch.equal(derived.features(None), fp16.features(None))
    assert torch.equal(derived.text_embeddings(None), fp16.text_embeddings(None))
    kept = derive_cache(fp32.url, str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    assert kept.summary["skipped"] == 0 and SOLID in FeatureCache(kept.url).ids
