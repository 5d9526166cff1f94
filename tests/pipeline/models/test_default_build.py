"""The one seeded-default-model builder (default vision tower and default LLM): seeding that leaves the caller's
random streams alone, one reuse rule, a marker, and a folder that appears whole or not at all."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from layerfuse.core.errors import StateError
from layerfuse.pipeline.models.default_build import MARKER, build_default, read_marker, seeded

SETTINGS = {"hidden_size": 8, "seed": 3, "corpus_seeds": [0, 1]}


class BuildError(StateError):
    pass


def _fill(calls):
    def fill(staging):
        calls.append(staging)
        (staging / "weights.bin").write_bytes(torch.randn(4).numpy().tobytes())  # drawn from the seeded generator
        return {"num_parameters": 4}

    return fill


def _build(out, calls, settings=SETTINGS, **kw):
    return build_default(out, settings, _fill(calls), seed=settings["seed"], note={"note": "random weights", "kind": "toy"},
                         what="default toy", error=BuildError, **kw)


def test_seeded_draws_are_fixed_and_the_callers_streams_untouched():
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    with seeded(5):
        a = (torch.rand(2), random.random(), np.random.rand())
    with seeded(5):
        b = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_build_writes_the_marker_and_reuses_the_same_settings(tmp_path):
    calls = []
    out = _build(tmp_path / "m", calls)
    assert read_marker(out) == {"note": "random weights", "kind": "toy", **SETTINGS, "num_parameters": 4}
    assert (out / MARKER).read_text() == json.dumps(read_marker(out), indent=1)
    again = _build(tmp_path / "again", calls)
    assert (again / "weights.bin").read_bytes() == (out / "weights.bin").read_bytes()  # seeded: the same weights
    mtime = (out / "weights.bin").stat().st_mtime_ns
    assert _build(out, calls) == out and len(calls) == 2 and (out / "weights.bin").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "m"]  # no staging folder left


def test_other_settings_and_incomplete_folders_are_refused(tmp_path):
    out = _build(tmp_path / "m", [])
    with pytest.raises(BuildError, match=r"default toy built with other settings \(differs in: corpus_seeds, hidden_size\)"):
        _build(out, [], {**SETTINGS, "hidden_size": 16, "corpus_seeds": [0]})
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(BuildError, match=f"not a complete default toy \\(no {MARKER}\\)"):
        _build(tmp_path / "half", [])
    (tmp_path / "empty").mkdir()
    assert read_marker(_build(tmp_path / "empty", [])) is not None  # an empty folder is no default yet: built


def test_a_failed_build_leaves_nothing(tmp_path):
    def broken(staging):
        (staging / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_default(tmp_path / "m", SETTINGS, broken, seed=0, note={}, what="default toy", error=BuildError)
    assert list(tmp_path.iterdir()) == []


def test_a_concurrent_builder_wins_the_rename(tmp_path):
    """Another rank publishes the same default first: this build's rename fails and its folder is used."""
    out = tmp_path / "m"

    def racing(settings):
        def fill(staging):
            out.mkdir()
            (out / MARKER).write_text(json.dumps({"note": "theirs", **settings}))
            return {}

        return fill

    assert build_default(out, SETTINGS, racing(SETTINGS), seed=0, note={}, what="default toy", error=BuildError) == out
    assert read_marker(out)["note"] == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    other = tmp_path / "o"
    out = other
    with pytest.raises(BuildError, match="differs in: hidden_size"):
        build_default(other, SETTINGS, racing({**SETTINGS, "hidden_size": 1}), seed=0, note={}, what="default toy", error=BuildError)
