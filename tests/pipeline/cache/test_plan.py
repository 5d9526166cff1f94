"""`layerfuse cache plan`: the size, files and write rate of a cache, from the encoder's config alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner

from layerfuse.core.errors import ConfigError, MissingError
from layerfuse.core.hub import CheckpointError
from layerfuse.pipeline.cache.extract import ExtractConfig, run_extract, storage_layout
from layerfuse.pipeline.cache.plan import (
    DEFAULT_IMAGES_PER_S,
    DEFAULT_STRING_BYTES,
    DEFAULT_TEXT_DIM,
    STORAGE_COSTS,
    CachePlan,
    EncoderShape,
    encoder_shape,
    free_bytes,
    plan_cache,
)
from layerfuse.pipeline.cache.selection import stored_layers
from layerfuse.pipeline.cli import main
from layerfuse.pipeline.models.encoder import load_vision_encoder

from tests.support import extract_config

CLIP_L336 = dict(image_size=336, patch_size=14, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)  # heads: 1024 % 12 != 0


@pytest.fixture(scope="module")
def clip_l336(tmp_path_factory) -> Path:
    """A folder holding only the config.json of CLIP ViT-L/14-336's vision tower (no weights)."""
    out = tmp_path_factory.mktemp("clip-vit-large-patch14-336")
    transformers.CLIPVisionConfig(**CLIP_L336).save_pretrained(out)
    return out


def plan_for(vision: str, samples: int, dtype: str = "float16", spec: str | None = None, **kw) -> CachePlan:
    """What `cache plan` computes: the shape, extract's layout rule with the ExtractConfig defaults, the plan."""
    shape = encoder_shape(vision)
    cfg = ExtractConfig(dtype=dtype, layers=spec or "all")
    shard, chunk = storage_layout(cfg, shape)
    assert cfg.stored_layers(shape) == stored_layers(spec, shape.num_layers)
    return plan_cache(shape, samples, shard_samples=shard, chunk_samples=chunk, layers=stored_layers(spec, shape.num_layers), dtype=dtype, **kw)


def test_clip_l336_from_its_config(clip_l336):
    p = plan_for(str(clip_l336), 1_223_000)
    e = p.encoder
    assert (e.num_layers, e.num_tokens, e.hidden_size, e.has_cls, e.grid) == (24, 577, 1024, True, (24, 24))  # 24x24 + CLS
    assert p.layers == tuple(range(25))
    assert p.feature_bytes == 25 * 577 * 1024 * 2 == 29_542_400  # 29.5 MB raw fp16 per sample
    assert (p.shard_samples, p.chunk_samples) == (18, 1)  # 512 MiB // 29.5 MB; a layer of one sample is 1.18 MB
    assert p.text_bytes == 2 * 384 * 4 and p.table_bytes == DEFAULT_STRING_BYTES + 23 + 4 * 25
    assert p.num_shards == math.ceil(1_223_000 / 18)
    assert p.disk_bytes == pytest.approx(1_223_000 * (29_542_400 * STORAGE_COSTS["float16"].ratio + p.text_bytes + p.table_bytes))
    assert p.write_bytes_per_s == pytest.approx(p.sample_disk_bytes * 500)
    text = p.format()
    assert "29.5 MB raw" in text and "T=577 tokens (24x24 + CLS)" in text and "TB on disk" in text and "GB/s" in text
    # the same shape from the config file itself, and from a full CLIP config (vision_config)
    assert encoder_shape(str(clip_l336 / "config.json")) == EncoderShape(**{**vars(e), "name": str(clip_l336 / "config.json")})
    full = clip_l336.parent / "full-clip"
    transformers.CLIPConfig(vision_config=CLIP_L336).save_pretrained(full)
    assert encoder_shape(str(full)).num_tokens == 577 and encoder_shape(str(full)).model_type == "clip"


def test_siglip_has_no_cls(tmp_path):
    transformers.SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=1152, num_hidden_layers=27, num_attention_heads=16).save_pretrained(tmp_path)
    e = encoder_shape(str(tmp_path))
    assert (e.num_layers, e.num_tokens, e.hidden_size, e.has_cls) == (27, 27 * 27, 1152, False)


def test_default_tower_matches_the_loaded_encoder(vision_dir):
    e = encoder_shape("default")
    assert (e.num_layers, e.num_tokens, e.hidden_size, e.has_cls) == (24, 65, 64, True)
    info = load_vision_encoder(str(vision_dir)).info  # the same architecture, run: what extraction records
    assert (info.num_layers, info.num_tokens, info.hidden_size, info.has_cls) == (e.num_layers, e.num_tokens, e.hidden_size, e.has_cls)
    assert encoder_shape(str(vision_dir)).num_tokens == 65
    # extraction can plan from its EncoderInfo directly
    assert plan_cache(info, 10, shard_samples=8, chunk_samples=8).feature_bytes == 25 * 65 * 64 * 2
    assert storage_layout(ExtractConfig(), e) == (256, 32)


def test_layer_subset(clip_l336):
    p = plan_for(str(clip_l336), 100_000, spec="mmfuser")
    assert p.layers == (3, 8, 13, 18, 23)
    assert p.shard_samples == (512 << 20) // (5 * 577 * 1024 * 2) == 90  # storage_layout sizes shards by the K stored layers
    assert p.feature_bytes == 5 * 577 * 1024 * 2 and p.table_bytes == DEFAULT_STRING_BYTES + 23 + 4 * 5
    all_layers = plan_for(str(clip_l336), 100_000)
    assert p.feature_bytes * 5 == all_layers.feature_bytes
    # checksums/features holds a column per stored layer, each its own chunks of 16384 rows
    assert all_layers.files["table chunks"] - p.files["table chunks"] == 20 * math.ceil(100_000 / 16384)
    assert "hs[3, 8, 13, 18, 23] (5 of 25)" in p.format()


def test_quantised_dtypes(clip_l336):
    p = plan_for(str(clip_l336), 1000, dtype="int8")
    # a byte per value + an fp16 scale per (layer, token) + at most 16 fp16 outlier channels per (layer, token)
    assert p.feature_bytes == 25 * 577 * (1024 * 1 + 2 + 16 * 2)
    assert p.feature_bytes / plan_for(str(clip_l336), 1000).feature_bytes < 0.52  # the goal: at most 0.5 (+ outliers)
    # shards and chunks sized as float16's (storage_layout): the same rows per chunk, hence the same data order in training
    assert (p.shard_samples, p.chunk_samples) == (plan_for(str(clip_l336), 1000).shard_samples, 1) == (18, 1)
    assert "at most 25 x 577 x 16 x 2 B outliers" in p.format()
    assert p.files["feature shards"] == 3 * p.num_shards  # features, quant/scale, quant/outliers
    fp8 = plan_for(str(clip_l336), 1000, dtype="float8_e4m3fn")
    assert fp8.feature_bytes == 25 * 577 * (1024 + 2) and fp8.files["feature shards"] == 2 * fp8.num_shards
    mmfuser = plan_for(str(clip_l336), 1000, dtype="int8", spec="mmfuser")
    assert mmfuser.feature_bytes / plan_for(str(clip_l336), 1000).feature_bytes < 0.11  # 5 of 25 layers in int8
    with pytest.raises(ConfigError, match="int8, float8_e4m3fn"):
        plan_for(str(clip_l336), 1000, dtype="int4")


def test_file_count_and_size_match_a_real_extraction(tmp_path, vision_dir):
    """21 built-in samples in shards of 8 (the last one partial), fp16."""
    cfg = extract_config(str(tmp_path / "cache"), vision_dir, builtin=21)
    run_extract(cfg)
    shape = encoder_shape(str(vision_dir))
    shard, chunk = storage_layout(cfg, shape)
    p = plan_cache(shape, 21, shard_samples=shard, chunk_samples=chunk, string_bytes=200)
    found = [f for f in (tmp_path / "cache").rglob("*") if f.is_file()]
    assert p.num_files == len(found), sorted(str(f.relative_to(tmp_path / "cache")) for f in found)
    assert p.files["feature shards"] == 3 == sum(1 for f in found if f.relative_to(tmp_path / "cache").as_posix().startswith("features/c/"))
    assert p.files["progress markers"] == len(list((tmp_path / "cache" / "progress").iterdir()))
    assert p.files["zarr.json"] == sum(1 for f in found if f.name == "zarr.json")
    # On-disk bytes: the plan's fp16 ratio (0.93) is the least compressible tower measured (the pretrained tiny one,
    # 0.929 per-(sample, layer) chunk under zstd-1); these random-weight features compress to about 0.92 (BENCHMARKS.md),
    # and text (estimated incompressible) and metadata are ~2% of the bytes. So the estimate errs high by a few %: the
    # lower bound 0.85 still catches a wrongly sized term (a factor K, T or the itemsize would be off by 2x or more).
    actual = sum(f.stat().st_size for f in found)
    assert 0.85 <= actual / p.disk_bytes <= 1.0, (actual, p.disk_bytes)
    features = sum(f.stat().st_size for f in found if f.relative_to(tmp_path / "cache").as_posix().startswith("features/c/"))
    assert 0.85 <= features / (21 * p.feature_bytes * p.cost.ratio) <= 1.0


def test_offline_hub_id_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        encoder_shape("openai/clip-vit-large-patch14-336")
    msg = str(e.value)
    assert "\n" not in msg and "hf download openai/clip-vit-large-patch14-336 config.json --local-dir" in msg and "--vision" in msg
    r = CliRunner().invoke(main, ["cache", "plan", "--vision", "openai/clip-vit-large-patch14-336", "--samples", "10"])
    assert r.exit_code == 1 and r.output.startswith("layerfuse cache plan: cannot read the config") and r.output.count("\n") == 1


def test_bad_vision_arguments(tmp_path):
    with pytest.raises(MissingError, match="no such config file"):
        encoder_shape(str(tmp_path / "nowhere" / "config.json"))
    transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match="'vit'"):
        encoder_shape(str(tmp_path / "vit"))


def test_free_bytes(tmp_path):
    assert free_bytes(str(tmp_path / "not" / "yet" / "cache")) > 0  # the nearest existing folder's disk
    assert free_bytes(f"file://{tmp_path}") > 0
    assert free_bytes("s3://bucket/cache") is None and free_bytes("memory://cache") is None
    p = plan_for("default", 100)
    assert p.fits(None) is None and p.fits(10**15) and not p.fits(1000)
    assert "free      " in p.format(out=str(tmp_path)) and "not a local path" in p.format(out="s3://bucket/c")


def test_cli_text_json_and_defaults(clip_l336):
    run = CliRunner()
    r = run.invoke(main, ["cache", "plan", "--vision", str(clip_l336), "--samples", "1223000"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == plan_for(str(clip_l336), 1_223_000).format()
    r = run.invoke(main, ["cache", "plan", "--vision", str(clip_l336), "--samples", "1223000", "--layers", "mmfuser", "--json"])
    data = json.loads(r.output)
    assert data["layers"] == [3, 8, 13, 18, 23] and data["per_sample"]["features"] == 5 * 577 * 1024 * 2
    assert data["num_files"] == sum(data["files"].values()) and data["images_per_s"] == DEFAULT_IMAGES_PER_S
    r = run.invoke(main, ["cache", "plan", "--samples", "10", "--shard-samples", "4", "--images-per-s", "50", "--json"])
    data = json.loads(r.output)
    assert data["shard_samples"] == 4 and data["num_shards"] == 3 and data["encoder"]["num_tokens"] == 65
    # the CLI's defaults are the library's
    opts = {p.name: p.default for p in main.commands["cache"].commands["plan"].params}
    assert (opts["images_per_s"], opts["text_dim"], opts["string_bytes"]) == (DEFAULT_IMAGES_PER_S, DEFAULT_TEXT_DIM, DEFAULT_STRING_BYTES)
    help_text = run.invoke(main, ["cache", "plan", "--help"]).output
    assert "Example" in help_text and "layerfuse cache plan" in help_text


def test_extract_refuses_a_target_without_room_unless_forced(tmp_path, vision_dir, monkeypatch):
    from layerfuse.pipeline.cache import extract as extract_module
    from layerfuse.pipeline.cache.extract import ExtractError, run_extract
    from layerfuse.pipeline.cache.reader import FeatureCache
    from tests.support import extract_config

    monkeypatch.setattr(extract_module, "free_bytes", lambda url: 1000)  # a nearly full disk
    out = tmp_path / "c"
    with pytest.raises(ExtractError, match=r"has 0.00 GB free, and the cache needs about 0.00 GB .*--force"):
        run_extract(extract_config(str(out), vision_dir, builtin=8))
    run_extract(extract_config(str(out), vision_dir, builtin=8, force=True))
    assert len(FeatureCache(out)) == 8
