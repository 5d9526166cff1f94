"""The shipped default tower (pipeline/models/default_tower/): its files true to its recipe, installed instead of
pretraining (by `build_default_vision` and by `layerfuse extract`), refused when tampered with, other settings still
pretrained, and the recipe's first pretraining steps still what this code computes."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from layerfuse.pipeline.models.default_vision import (
    SHIPPED_TOWER,
    TOWER_FILES,
    DefaultVisionConfig,
    DefaultVisionError,
    build_default_vision,
    check_shipped,
    first_steps_differences,
    first_steps_fingerprint,
    read_recipe,
    record_shipped,
    shipped_differences,
)
from layerfuse.pipeline.models.encoder import load_vision_encoder

GRID = 8


def _copy_shipped(tmp_path) -> Path:
    dest = tmp_path / "shipped"
    shutil.copytree(SHIPPED_TOWER, dest)
    return dest


def test_the_shipped_files_match_their_recipe():
    recipe = read_recipe()
    assert recipe is not None, f"no {SHIPPED_TOWER}/recipe.json: the package data is missing"
    assert recipe["config"] == asdict(DefaultVisionConfig())  # it is the default's tower
    assert sorted(recipe["files"]) == sorted(TOWER_FILES)
    check_shipped(SHIPPED_TOWER, recipe)
    assert (SHIPPED_TOWER / "layerfuse_default.json").read_text() == json.dumps(
        {"note": "pretrained 2000 steps on built-in renders", **asdict(DefaultVisionConfig()),
         "pretraining": json.loads((SHIPPED_TOWER / "layerfuse_default.json").read_text())["pretraining"]}, indent=1)
    held = recipe["held_out"]
    assert held["colour_acc"] > 0.9 and held["shape_acc"] > 0.5 and held["digit_acc"] > 0.3, held  # a pretrained tower
    for key in ("commit", "torch", "threads", "cpu", "device"):
        assert recipe["built_with"][key], key
    enc = load_vision_encoder(str(SHIPPED_TOWER))
    assert enc.info.num_layers == 24 and enc.info.num_tokens == GRID * GRID + 1


def test_the_recipe_still_gives_the_same_first_steps():
    """The recipe's first pretraining steps rerun with this code give the recorded tower: bit for bit on the
    recorded torch/CPU/threads, within tolerances elsewhere (see default_vision.first_steps_differences)."""
    recipe = read_recipe()
    recorded = recipe["first_steps"]
    got = first_steps_fingerprint(DefaultVisionConfig(**recipe["config"]), recorded["steps"])
    assert first_steps_differences(recorded, got) == []
    # the comparison itself can fail: on the recorded machine any change, elsewhere a change beyond the tolerance
    name = "encoder.layers.3.mlp.fc1.weight"
    s, n = got["tensors"][name]
    moved = {**got, "sha256": "0" * 64, "tensors": {**got["tensors"], name: [s + 2e-4 * n, n]}}
    assert len(first_steps_differences(recorded, moved)) == 1
    elsewhere = {**moved, "machine": {**got["machine"], "threads": -1}}
    assert [d.split(":")[0] for d in first_steps_differences(recorded, elsewhere)] == [name]


def test_the_default_build_installs_the_shipped_tower_without_pretraining(tmp_path, monkeypatch, capsys):
    import layerfuse.pipeline.models.default_vision as dv

    def no_pretraining(*a, **kw):
        raise AssertionError("the default settings must install the shipped tower, not pretrain")

    monkeypatch.setattr(dv, "pretrain", no_pretraining)
    out = build_default_vision(tmp_path / "v", progress=True)
    recipe = read_recipe()
    assert {p.name for p in out.iterdir()} == set(TOWER_FILES)
    for name in TOWER_FILES:
        assert (out / name).read_bytes() == (SHIPPED_TOWER / name).read_bytes(), name
    said = capsys.readouterr().out
    assert recipe["files"]["model.safetensors"][:16] in said and f"colour {recipe['held_out']['colour_acc']:.3f}" in said
    assert build_default_vision(out) == out  # reused
    with pytest.raises(DefaultVisionError, match="pretrain_steps"):
        build_default_vision(out, replace(DefaultVisionConfig(), pretrain_steps=10))


def test_a_tampered_shipped_tower_is_refused(tmp_path):
    shipped = _copy_shipped(tmp_path)
    weights = bytearray((shipped / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (shipped / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(DefaultVisionError, match=r"does not match its recipe.json: .*model.safetensors"):
        build_default_vision(tmp_path / "v", shipped=shipped)
    assert not (tmp_path / "v").exists() and not list(tmp_path.glob(".v.tmp-*"))
    (shipped / "model.safetensors").unlink()
    with pytest.raises(DefaultVisionError, match="has sha256 missing"):
        build_default_vision(tmp_path / "v", shipped=shipped)


def test_other_settings_still_pretrain(tmp_path, monkeypatch):
    import layerfuse.pipeline.models.default_vision as dv

    real, runs = dv.pretrain, []
    monkeypatch.setattr(dv, "pretrain", lambda *a, **kw: runs.append(a[2]) or real(*a, **kw))
    cfg = replace(DefaultVisionConfig(), pretrain_steps=1, eval_scenes=8)  # the default tower, other steps
    out = build_default_vision(tmp_path / "v", cfg)
    assert runs == [cfg]
    assert (out / "model.safetensors").read_bytes() != (SHIPPED_TOWER / "model.safetensors").read_bytes()
    assert json.loads((out / "layerfuse_default.json").read_text())["note"] == "pretrained 1 steps on built-in renders"


def test_extract_installs_the_shipped_tower(tmp_path):
    from click.testing import CliRunner
    from layerfuse.pipeline.cache.reader import FeatureCache
    from layerfuse.pipeline.cli import main

    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["extract", "--run-dir", str(run), "--builtin", "4", "--seed", "2", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "installed the shipped one" in r.output, r.output
    meta = FeatureCache(run / "cache").meta
    assert meta["encoder"]["name"] == "default (tiny CLIP, pretrained 2000 steps on built-in renders)"
    assert (run / "vision" / "model.safetensors").read_bytes() == (SHIPPED_TOWER / "model.safetensors").read_bytes()


def test_record_and_compare_with_the_shipped_tower(tmp_path, monkeypatch):
    """`layerfuse tower record` writes the files and a recipe that installs again; `tower rebuild`'s comparison
    names the files that differ. (The first-steps rerun is stubbed: test_the_recipe_... covers it.)"""
    import layerfuse.pipeline.models.default_vision as dv

    recipe = read_recipe()
    assert shipped_differences(SHIPPED_TOWER) == []
    tampered = _copy_shipped(tmp_path)
    (tampered / "config.json").write_text((tampered / "config.json").read_text() + " ")
    assert [d.split(":")[0] for d in shipped_differences(tampered)] == ["config.json"]

    monkeypatch.setattr(dv, "first_steps_fingerprint", lambda cfg: {"steps": 0})
    recorded = record_shipped(SHIPPED_TOWER, into=tmp_path / "rec", commit="abc123")
    assert recorded["files"] == recipe["files"] and recorded["held_out"] == recipe["held_out"]
    assert recorded["built_with"]["commit"] == "abc123" and read_recipe(tmp_path / "rec") == recorded
    out = build_default_vision(tmp_path / "v", shipped=tmp_path / "rec")
    assert (out / "model.safetensors").read_bytes() == (SHIPPED_TOWER / "model.safetensors").read_bytes()
    random_tower = build_default_vision(tmp_path / "r", replace(DefaultVisionConfig(), pretrain_steps=0))
    with pytest.raises(DefaultVisionError, match="only that one ships"):
        record_shipped(random_tower, into=tmp_path / "rec2")
