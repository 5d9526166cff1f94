"""The embedded default tower: dense pretraining targets true to the pixels, a deterministic build that learns and
resumes without pickle, and a folder built with other settings refused instead of reused (the shipped tower:
test_shipped_tower.py)."""

from __future__ import annotations

import inspect
import json
import pickle
import re
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from layerfuse.pipeline.data.synthetic import (
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    dense_scene,
    make_scene,
    render,
    shape_mask,
)
from layerfuse.pipeline.models.default_vision import (
    DETAILS,
    MIN_COVER,
    PRETRAIN_SEED,
    DefaultVisionConfig,
    DefaultVisionError,
    build_default_vision,
    resume_path,
    scene_targets,
)
from layerfuse.pipeline.models.encoder import load_vision_encoder
from safetensors import safe_open
from safetensors.torch import load_file, save_file

GRID = 8
P = IMAGE_SIZE // GRID

# A small tower so that pretraining runs in seconds: the same code path as the default.
TINY = DefaultVisionConfig(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2, pretrain_steps=10,
                           pretrain_batch=8, pretrain_lr=5e-3, pretrain_warmup=5, eval_scenes=64)


def _patch(x: float, y: float) -> int:
    return int(y) // P * GRID + int(x) // P


def test_dense_scenes_are_deterministic_and_disjoint_from_datasets():
    a, b = dense_scene(PRETRAIN_SEED, 3), dense_scene(PRETRAIN_SEED, 3)
    assert a == b and render(a).tobytes() == render(b).tobytes()
    assert a.category == "pretrain" and a.question == "" and a.answer == ""
    # the dataset's scene with the same numbers is another scene (its own rng stream)
    assert render(make_scene(PRETRAIN_SEED, 3)).tobytes() != render(a).tobytes()
    scenes = [dense_scene(PRETRAIN_SEED, i) for i in range(200)]
    assert 0.45 < np.mean([s.glyph is not None for s in scenes]) < 0.75
    assert any(o.detail for s in scenes for o in s.objects)
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)


def test_targets_are_true_to_the_pixels():
    for i in range(60):
        scene = dense_scene(PRETRAIN_SEED, i)
        t = scene_targets(scene, GRID)
        pix = np.asarray(render(scene))
        for o in scene.objects:
            # the patch holding the object's centre pixel belongs to it, unless the object covers too little of it
            k = _patch(o.x, o.y)
            cover = shape_mask(o).reshape(GRID, P, GRID, P).mean(axis=(1, 3)).reshape(-1)[k]
            if cover >= MIN_COVER and t["owned"][k]:
                assert t["colour"][k] == list(COLOURS).index(o.colour) + 1
                assert t["shape"][k] == SHAPES.index(o.shape) + 1
                assert np.allclose(t["centre"][k], (o.x / IMAGE_SIZE, o.y / IMAGE_SIZE))
            if o.detail:
                assert (t["detail"] == DETAILS.index(o.detail) + 1).any()
        # background patches: no colour, shape or centre
        assert (t["colour"][~t["owned"]] == 0).all() and (t["shape"][~t["owned"]] == 0).all()
        assert (t["centre"][~t["owned"]] == 0).all()
        if scene.glyph is None:
            assert (t["digit"] == 0).all()
        else:
            g = scene.glyph
            marked = np.flatnonzero(t["digit"])
            assert (t["digit"][marked] == int(g.digit) + 1).all()
            ink = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
            ys, xs = np.nonzero((pix == g.rgb).all(-1))
            x0, y0, x1, y1 = g.box
            inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            ink[ys[inside], xs[inside]] = True
            assert set(marked) == {_patch(x, y) for y, x in zip(*np.nonzero(ink))}
        counts = t["counts"]
        assert counts.sum() == len(scene.objects) and counts[SHAPES.index(scene.objects[0].shape)] >= 1


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_pretraining_is_deterministic(tmp_path):
    a = build_default_vision(tmp_path / "a", TINY)
    b = build_default_vision(tmp_path / "b", TINY)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rand = _weights(build_default_vision(tmp_path / "r", replace(TINY, pretrain_steps=0)))
    assert any(not torch.equal(wa[k], rand[k]) for k in wa)  # pretraining moved the weights
    marker = json.loads((a / "layerfuse_default.json").read_text())
    assert marker["note"] == "pretrained 10 steps on built-in renders" and marker["pretrain_steps"] == 10
    assert json.loads((tmp_path / "r" / "layerfuse_default.json").read_text())["note"] == "random weights"


def test_pretraining_learns_and_the_tower_loads(tmp_path):
    out = build_default_vision(tmp_path / "v", replace(TINY, pretrain_steps=200))
    report = json.loads((out / "layerfuse_default.json").read_text())["pretraining"]
    held = report["held_out"]
    # 200 steps of a 2-block tower read colour off held-out patches far above the 1-in-8 chance
    assert held["colour_acc"] > 0.5, held
    assert report["first_losses"]["colour"] > 2 * report["last_losses"]["colour"], report
    enc = load_vision_encoder(str(out))
    assert enc.info.num_layers == 2 and enc.info.num_tokens == GRID * GRID + 1 and enc.info.hidden_size == 32


def test_a_folder_built_otherwise_is_refused(tmp_path):
    out = build_default_vision(tmp_path / "v", replace(TINY, pretrain_steps=0))
    assert build_default_vision(out, replace(TINY, pretrain_steps=0)) == out  # same settings: kept
    with pytest.raises(DefaultVisionError, match="pretrain_steps"):
        build_default_vision(out, TINY)


def test_extract_builds_the_default_tower_and_refuses_other_settings(tmp_path):
    from click.testing import CliRunner
    from layerfuse.pipeline.cache.reader import FeatureCache
    from layerfuse.pipeline.cli import main

    run = tmp_path / "run"
    args = ["extract", "--run-dir", str(run), "--builtin", "6", "--seed", "2", "--workers", "0", "--quiet"]
    r = CliRunner().invoke(main, [*args, "--vision-pretrain-steps", "0"])
    assert r.exit_code == 0, r.output
    assert re.search(r"; tower ready in \d+\.\d s; extracted in \d+\.\d s$", r.output.strip()), r.output  # timed apart
    meta = FeatureCache(run / "cache").meta
    assert meta["encoder"]["name"] == "default (tiny CLIP, random weights)"
    assert meta["config"]["vision"]["default"]["pretrain_steps"] == 0
    assert (run / "vision" / "layerfuse_default.json").exists()
    # the folder holds an unpretrained tower: asking for the pretrained default is a one-line error, not a reuse
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "other")])
    assert r.exit_code == 1 and "differs in: pretrain_steps" in r.output and "Traceback" not in r.output
    assert f"[default: {DefaultVisionConfig().pretrain_steps}]" in CliRunner().invoke(main, ["extract", "--help"]).output


def _saved_step(path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["layerfuse"])["step"]


def test_a_killed_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import layerfuse.pipeline.models.default_vision as dv

    cfg = replace(TINY, pretrain_steps=12)
    ref = _weights(build_default_vision(tmp_path / "ref", cfg, checkpoint_every=4))
    real, calls = dv.render_batch, []

    def dying(*args, **kw):  # call k + 1 renders training step k, the last one the held-out scenes; die in step 6
        calls.append(args[1])
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(dv, "render_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        build_default_vision(tmp_path / "v", cfg, checkpoint_every=4)
    assert not (tmp_path / "v").exists() and not list(tmp_path.glob(".v.tmp-*"))
    assert _saved_step(resume_path(tmp_path / "v")) == 4  # model, heads, optimizer, RNG: safetensors; the rest JSON

    calls.clear()
    monkeypatch.setattr(dv, "render_batch", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    out = build_default_vision(tmp_path / "v", cfg, checkpoint_every=4)
    starts = [cfg.eval_scenes + k * cfg.pretrain_batch for k in range(4, 12)]
    assert calls == [*starts, 0]  # steps 4..11 only, then the held-out scenes
    got = _weights(out)
    assert all(torch.equal(got[k], ref[k]) for k in ref)  # bit for bit the uninterrupted run
    assert not resume_path(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ref", "v"]
    report = json.loads((out / "layerfuse_default.json").read_text())["pretraining"]
    ref_report = json.loads((tmp_path / "ref" / "layerfuse_default.json").read_text())["pretraining"]
    assert report == ref_report


def test_a_saved_state_of_other_settings_is_not_resumed(tmp_path, monkeypatch):
    import layerfuse.pipeline.models.default_vision as dv

    cfg = replace(TINY, pretrain_steps=8)
    meta = {"config": {**asdict(cfg), "pretrain_lr": 1.0}, "step": 6}
    save_file({"model/x": torch.zeros(1)}, str(resume_path(tmp_path / "v")), metadata={"layerfuse": json.dumps(meta)})
    real, calls = dv.render_batch, []
    monkeypatch.setattr(dv, "render_batch", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    build_default_vision(tmp_path / "v", cfg, checkpoint_every=4)
    assert len(calls) == 8 + 1  # started over: every step ran


class _Planted:
    """Unpickling this writes a canary file: what a pickle-loading resume would execute."""

    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (Path.write_text, (Path(self.canary), "executed"))


def test_a_planted_pickle_is_never_executed(tmp_path, monkeypatch):
    """Resume state is read with safetensors only: a pickle where the state lives (or where the old code kept it,
    OUT.tmp/pretrain_state.pt) is ignored with a warning and pretraining starts over; no code runs."""
    import layerfuse.core.resume_state as rs
    import layerfuse.pipeline.models.default_vision as dv

    canary = tmp_path / "canary"
    payload = pickle.dumps({"config": asdict(TINY), "step": 5, "hook": _Planted(canary)})
    resume_path(tmp_path / "v").write_bytes(payload)
    (tmp_path / "v.tmp").mkdir()
    (tmp_path / "v.tmp" / "pretrain_state.pt").write_bytes(payload)
    real, calls = dv.render_batch, []
    monkeypatch.setattr(dv, "render_batch", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    with pytest.warns(UserWarning, match="ignoring the unreadable pretraining state"):
        build_default_vision(tmp_path / "v", TINY)
    assert not canary.exists() and len(calls) == TINY.pretrain_steps + 1
    for module in (dv, rs):  # nothing in the pretraining's state path can unpickle
        source = inspect.getsource(module)
        assert not any(call in source for call in ("torch.load(", "import pickle", "pickle.load", "weights_only"))
