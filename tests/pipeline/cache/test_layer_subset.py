"""Caches that store a subset of the hidden states (`extract --layers`): same values as a full cache for the layers
they hold, a clear error naming the stored layers and the command for any other, and everything downstream unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerfuse.pipeline.cache.extract import ExtractError, run_extract
from layerfuse.pipeline.cache.reader import CacheError, FeatureCache
from layerfuse.pipeline.cache.verify import cache_info, format_info, verify_cache
from tests.support import extract_config


@pytest.fixture(scope="module")
def subset(tmp_path_factory, vision_dir) -> str:
    out = tmp_path_factory.mktemp("subset") / "mmfuser"
    run_extract(extract_config(str(out), vision_dir, dtype="float32", layers="mmfuser;4,"))
    return str(out)


def test_subset_holds_exactly_the_full_cache_values(subset, fp32_cache):
    sub, full = FeatureCache(subset), FeatureCache(fp32_cache)
    assert sub.stored_layers == [3, 4, 8, 13, 18, 23] and sub.num_layers == 25
    assert sub.group["features"].shape[1] == 6 and sub.meta["config"]["layers"] == [3, 4, 8, 13, 18, 23]
    rows = np.array([5, 0, 17, 5])
    for layers in ([3, 18, 23], [23, 3], [-2, 4]):
        assert torch.equal(sub.features(rows, layers), full.features(rows, layers))
    assert torch.equal(sub.features(rows, None), full.features(rows, sub.stored_layers))
    assert verify_cache(subset, progress=False).ok
    assert "stored layers    hs[3, 4, 8, 13, 18, 23] (6 of 25)" in format_info(cache_info(subset))


def test_a_layer_the_cache_lacks_names_what_it_stores_and_how_to_add_it(subset):
    cache = FeatureCache(subset)
    with pytest.raises(CacheError, match=r"does not store hidden state\(s\) \[12\]: it stores hs\[3, 4, 8, 13, 18, 23\] "
                                         r"\(6 of 25\).*layerfuse extract --builtin 24 --seed 3 .*--layers '3,4,8,12,13,18,23'"):
        cache.features([0], [12, 18])
    with pytest.raises(CacheError, match="hidden states 0..24"):
        cache.features([0], [25])


def test_bad_layer_spec_is_an_extract_error(tmp_path, vision_dir):
    with pytest.raises(ExtractError, match="--layers: 'nonsense'"):
        run_extract(extract_config(str(tmp_path / "c"), vision_dir, layers="nonsense"))


def test_full_and_subset_caches_of_the_same_source_have_other_hashes(subset, fp32_cache):
    sub, full = FeatureCache(subset), FeatureCache(fp32_cache)
    assert sub.meta["config_hash"] != full.meta["config_hash"] and "layers" not in full.meta["config"]


@pytest.fixture(scope="module")
def mmfuser_train_cache(tmp_path_factory, vision_dir) -> str:
    """The phase-two test cache's samples and layout (tests/conftest.py train_cache), storing only MMFuser's layers."""
    out = tmp_path_factory.mktemp("subset") / "train-mmfuser"
    run_extract(extract_config(str(out), vision_dir, builtin=120, seed=5, shard_samples=16, chunk_kib=33, batch_size=16, layers="mmfuser"))
    return str(out)


def test_training_and_ablation_on_a_subset_cache(mmfuser_train_cache, tiny_llm_dir, tmp_path):
    from layerfuse.pipeline.ablation.run import AblateOptions, run_ablation
    from layerfuse.pipeline.ablation.sweep import SweepSpec
    from layerfuse.pipeline.training.train import TrainConfig, train

    base = dict(cache=mmfuser_train_cache, llm=str(tiny_llm_dir), batch_size=8, max_steps=2, max_length=256, workers=0,
                save_every=0, progress=False, tensorboard=False, buffer_rows=16, stage=1)
    res = train(TrainConfig(out=str(tmp_path / "mm"), fuser="mmfuser", **base))
    assert res.final_loss is not None and np.isfinite(res.final_loss)
    with pytest.raises(CacheError, match=r"does not store hidden state\(s\) \[1, 2, 4, .*--layers '1,2,3,"):
        train(TrainConfig(out=str(tmp_path / "igva"), fuser="igva", **base))

    spec = SweepSpec(cache=mmfuser_train_cache, fusers=["concat"], layers=["3-18-23", "former"], seeds=[0], steps=2,
                     batch_size=8, buffer_rows=16, categories=["colour", "count", "detail", "glyph", "position", "shape"]).check()
    out = tmp_path / "sweep"
    result = run_ablation(spec, AblateOptions(out=str(out), workers=0, progress=False))
    assert (result.variants, result.invalid, result.trained) == (1, 1, 1)  # valid, invalid, trained
    md = (out / "results.md").read_text()
    assert "| concat | `former` | cache" in md and "does not store hidden state(s) [1, 2," in md
