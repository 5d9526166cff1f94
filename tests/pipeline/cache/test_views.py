"""Group-mean views (`extract --views`): stored means of hidden-state groups, read by fusers instead of the layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerfuse.fusion import LLMSpec, VisionSpec, build_fuser
from layerfuse.pipeline.cache.derive import derive_cache
from layerfuse.pipeline.cache.extract import run_extract
from layerfuse.pipeline.cache.reader import CacheError, FeatureCache
from layerfuse.pipeline.cache.selection import view_groups
from layerfuse.pipeline.cache.verify import cache_info, format_info, verify_cache
from tests.support import extract_config

IGVA_GROUPS = [tuple(range(1, 7)), tuple(range(7, 13)), tuple(range(13, 19)), tuple(range(19, 25))]


@pytest.fixture(scope="module")
def igva_views(tmp_path_factory, vision_dir) -> str:
    """The fp32_cache samples storing only what IGVA needs: the base layer and the four group means (5 of 25)."""
    out = tmp_path_factory.mktemp("views") / "igva"
    run_extract(extract_config(str(out), vision_dir, dtype="float32", layers="penultimate", views="igva"))
    return str(out)


def test_view_groups():
    assert view_groups("igva", 24) == IGVA_GROUPS
    assert view_groups("all;former", 24) == [tuple(range(1, 13)), tuple(range(13, 25))]
    assert view_groups("3-18-23", 24) == [] and view_groups(None, 24) == []


def test_views_are_the_means_of_the_full_precision_layers(igva_views, fp32_cache):
    views, full = FeatureCache(igva_views), FeatureCache(fp32_cache)
    assert views.stored_layers == [23] and views.views == IGVA_GROUPS and views.group["features"].shape[1] == 5
    rows = np.array([0, 7, 23, 7])
    for g in IGVA_GROUPS:
        want = full.features(rows, list(g)).float().mean(1)
        torch.testing.assert_close(views.features(rows, [g])[:, 0], want, rtol=0, atol=1e-6)
    assert torch.equal(views.features(rows, [23]), full.features(rows, [23]))
    with pytest.raises(CacheError, match=r"stores no group mean of hidden states \[1, 2, 3\]"):
        views.features(rows, [(1, 2, 3)])
    assert verify_cache(igva_views, progress=False).ok
    assert "hs[23] (1 of 25) + group means of 1..6, 7..12, 13..18, 19..24" in format_info(cache_info(igva_views))


def test_a_fuser_reads_views_with_the_results_of_the_layers(igva_views, fp32_cache):
    views, full = FeatureCache(igva_views), FeatureCache(fp32_cache)
    vision = VisionSpec.from_cache(full)
    torch.manual_seed(0)
    fuser = build_fuser("igva", vision, LLMSpec(32), mode="allocator").eval()
    rows = np.arange(6)
    text = full.text_embeddings(rows)
    ref = fuser(full.features(rows, fuser.required_layers).float(), text).tokens
    fuser.use_views(views.views)
    assert fuser.required_inputs == [23, *IGVA_GROUPS]
    got = fuser(views.features(rows, fuser.required_inputs).float(), text).tokens
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    fuser.use_views([])  # back to layers
    assert fuser.required_inputs == fuser.required_layers


def test_training_on_a_views_cache_and_derive_keeps_views(igva_views, tiny_llm_dir, tmp_path):
    from layerfuse.pipeline.training.train import TrainConfig, train

    res = train(TrainConfig(cache=igva_views, out=str(tmp_path / "run"), llm=str(tiny_llm_dir), fuser="igva", stage=1, batch_size=8,
                            max_steps=2, max_length=256, workers=0, save_every=0, progress=False, tensorboard=False, buffer_rows=16))
    assert res.final_loss is not None and np.isfinite(res.final_loss)
    out = str(tmp_path / "half")
    derive_cache(igva_views, out, dtype="float16", progress=False)
    d = FeatureCache(out)
    assert d.views == IGVA_GROUPS and d.stored_layers == [23] and verify_cache(out, progress=False).ok
    assert torch.equal(d.features([3], [IGVA_GROUPS[1]]), FeatureCache(igva_views).features([3], [IGVA_GROUPS[1]]).half())


def test_ablation_reads_views_and_lists_what_the_cache_cannot_serve(tmp_path, vision_dir):
    from layerfuse.pipeline.ablation.run import AblateOptions, run_ablation
    from layerfuse.pipeline.ablation.sweep import SweepSpec

    cache = str(tmp_path / "cache")
    run_extract(extract_config(cache, vision_dir, builtin=120, seed=5, shard_samples=16, chunk_kib=33, batch_size=16,
                               layers="penultimate", views="igva"))
    spec = SweepSpec(cache=cache, fusers=["igva", "concat"], layers=["igva", "3-18-23"], seeds=[0], steps=2, batch_size=8,
                     buffer_rows=16, categories=["colour", "count", "detail", "glyph", "position", "shape"]).check()
    out = tmp_path / "sweep"
    res = run_ablation(spec, AblateOptions(out=str(out), workers=0, progress=False))
    assert (res.variants, res.invalid, res.trained) == (2, 2, 2)  # valid, invalid, trained: the 3-18-23 arms lack 3 and 18
    md = (out / "results.md").read_text()
    assert "| concat | `3-18-23` | cache" in md and "does not store hidden state(s) [3, 18]" in md
