"""The fingerprints of the pipeline's configs (core/fingerprint.py's rule, declared on their fields) keep the values
that existing caches, runs and sweeps hold: a change here would refuse or silently restart what was made before.

The pinned values were computed by the code before the rule moved to field metadata (sha256 copies per module,
RUNTIME_FIELDS, "fields above batch_size", keys popped by hand)."""

from __future__ import annotations

from dataclasses import fields, replace
from types import SimpleNamespace

import pytest
import transformers

from layerfuse.core.fingerprint import enters_fingerprint, fingerprint
from layerfuse.fusion import LLMSpec, VisionSpec
from layerfuse.pipeline.ablation.sweep import SweepSpec, expand_sweep
from layerfuse.pipeline.cache.extract import ExtractConfig, _config_record, storage_layout
from layerfuse.pipeline.models.encoder import config_hash
from layerfuse.pipeline.training.train import TrainConfig

VISION = VisionSpec(num_layers=24, hidden_size=64, grid=(8, 8), has_cls=True, text_dim=384)
# what _config_record and storage_layout read of a loaded encoder: the embedded default's sizes
ENCODER = SimpleNamespace(info=SimpleNamespace(num_tokens=65, hidden_size=64, num_layers=24, config_hash="abc"))


def test_train_fingerprints_keep_their_values():
    assert TrainConfig(cache="c", out="o").hash() == "e3b0ec9148e2e9a6"
    stage2 = TrainConfig(cache="c", out="o", stage=2, template="v1", categories=["a"], fuser_options={"projector_depth": 1}).resolved()
    assert stage2.hash() == "09a9715114f27ea8"  # computed by the code before the rule moved
    runtime = dict(out="x", workers=0, prefetch=9, progress=False, log_every=1, save_every=0, device="cpu", tensorboard=False,
                   on_corrupt="skip", compile=True)
    assert TrainConfig(cache="c", **runtime).hash() == "e3b0ec9148e2e9a6"
    assert sorted(f.name for f in fields(TrainConfig) if not enters_fingerprint(f, stage2)) == sorted(runtime)


def test_sweep_settings_and_variant_keys_keep_their_values():
    probe = SweepSpec(cache="c", fusers=["concat", "igva"], layers=["3-18-23"], seeds=[0, 1])
    assert probe.settings_hash() == "91b87c8551d42fb4"
    assert [v.key for v in expand_sweep(probe, VISION, LLMSpec(128, 4, 4))] == [
        "befc5a6d583378fe", "391d29ff11f3e8ed", "66a6ee8014d7725f", "d103d2919150a57f"]
    lm = SweepSpec(cache="c", mode="lm", probe_layers=[1, 2], fusers=["concat"], layers=["all"])
    assert lm.settings_hash() == "4d9308b96d510da9"
    assert [v.key for v in expand_sweep(lm, VISION, LLMSpec(128, 4, 4))] == ["4ba0b000fc64dbff", "cb2842b8d4a5cced", "408cb1118045e58f"]
    # the variant lists and the other mode's budget stay out of the settings
    assert "fusers" not in probe.settings() and "lm" not in probe.settings() and "probe" not in lm.settings()


def test_cache_and_encoder_fingerprints_keep_their_values():
    record = {"source": {"kind": "synthetic", "n": 2000, "seed": 0}, "vision": {"name": "default", "path": "x", "revision": None,
              "config_hash": "abc"}, "dtype": "float16", "suffixes": ["a"], "shard_samples": 4}
    assert fingerprint(record) == "e49d90e8efb84935"
    assert config_hash(transformers.CLIPVisionConfig()) == "52b883992812dd37"


def _cache_fingerprint(cfg: ExtractConfig) -> str:
    return fingerprint(_config_record(cfg, ENCODER, cfg.vision_path(), *storage_layout(cfg, ENCODER)))


# one other value per field of ExtractConfig, on a config of the source kind where the field applies
CHANGES = {
    "llava": ({"llava": "a.json"}, "b.json"), "image_root": ({"llava": "a.json"}, "images"), "split": ({"llava": "a.json"}, "val"),
    "wds": ({"wds": "a.tar"}, "b.tar"), "builtin": ({}, 10), "seed": ({}, 1), "vision": ({}, "org/tower"),
    "vision_revision": ({}, "v2"), "vision_pretrain_steps": ({}, 0), "pad_to_square": ({}, True), "dtype": ({}, "float32"),
    "text_model": ({}, "other-model"), "suffixes": ({}, ("!",)), "shard_samples": ({}, 64), "shard_mib": ({}, 1),
    "chunk_kib": ({}, 16), "clevel": ({}, 5), "codec": ({}, "blosc-lz4"), "max_pixels": ({}, 10), "max_image_bytes": ({"wds": "a.tar"}, 1024),
    "layers": ({}, "mmfuser"), "views": ({}, "igva"),
    "run_dir": ({}, "runs/other"),
    "out": ({}, "elsewhere/cache"), "batch_size": ({}, 7), "workers": ({}, 0), "device": ({}, "cpu"),
    "compute_dtype": ({}, "float32"), "text_batch_size": ({}, 3), "strict": ({}, True), "allow_urls": ({}, "s3,https"),
    "overwrite": ({}, True), "force": ({}, True), "spool": ({"wds": "pipe:cat a.tar"}, "none"), "progress": ({}, False),
    "storage_options": ({}, {"anon": True}),
}


def test_default_cache_fingerprints_keep_their_values():
    """--max-image-bytes, --layers and --views enter the cache record only when they are not the default, and --codec
    only when it is not blosc-zstd (the codec before it was an option): caches made before the options existed keep
    their fingerprint (values computed by the code before them). The default codec is now zstd level 1 (chosen by
    BENCHMARKS.md "Codecs"), so a default cache of today is another cache than a default one of before."""
    before = dict(codec="blosc-zstd", clevel=3)
    assert _cache_fingerprint(ExtractConfig(**before)) == "d084e26af440013a"
    assert _cache_fingerprint(ExtractConfig(llava="a.json", **before)) == "3a38462053c72167"
    assert _cache_fingerprint(ExtractConfig(wds="a.tar", **before)) == "b0784dfb4f4ce875"
    assert _cache_fingerprint(ExtractConfig()) not in ("d084e26af440013a", _cache_fingerprint(ExtractConfig(clevel=3)))


@pytest.mark.parametrize("name", [f.name for f in fields(ExtractConfig)])
def test_a_cache_is_defined_by_exactly_the_fingerprinted_fields_of_its_config(name):
    """The cache's fingerprint is over the record _config_record derives: a fingerprinted field changes it, a
    runtime field does not."""
    base, other = CHANGES[name]
    cfg = ExtractConfig(**base)
    changed = replace(cfg, **{name: other})
    field = next(f for f in fields(ExtractConfig) if f.name == name)
    assert (_cache_fingerprint(changed) != _cache_fingerprint(cfg)) == enters_fingerprint(field, cfg)
