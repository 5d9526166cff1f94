"""Tests of the built-in synthetic dataset: determinism, balance, answers true to the pixels, export."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layerfuse.pipeline.data.records import SampleError, SampleRecord
from layerfuse.pipeline.data.synthetic import (
    CATEGORIES,
    COLOURS,
    GLYPHS,
    IMAGE_SIZE,
    LLAVA_SUFFIX,
    SHAPES,
    detail_mask,
    glyph_mask,
    make_scene,
    render,
    render_record,
    shape_mask,
    synthetic_plan,
    write_dataset,
)

SEED = 1234
N = 400


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(SEED, i) for i in range(N)]


def _px(arr: np.ndarray, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in arr[y, x])


def _of(scenes, category):
    out = [s for s in scenes if s.category == category]
    assert len(out) >= 10, category
    return out


def test_determinism():
    for i in (0, 7, 123):
        a, b = make_scene(5, i), make_scene(5, i)
        assert a == b
        assert render(a).tobytes() == render(b).tobytes()
        img = render(a)
        assert img.mode == "RGB" and img.size == (IMAGE_SIZE, IMAGE_SIZE)
    differ = sum(render(make_scene(5, i)).tobytes() != render(make_scene(6, i)).tobytes() for i in range(10))
    assert differ == 10
    assert make_scene(5, 3).id == "syn-5-0000003"
    p1, p2 = synthetic_plan(50, 9), synthetic_plan(50, 9)
    assert [r.to_json() for r in p1.records] == [r.to_json() for r in p2.records]
    assert p1.issues == []
    assert [r.to_json() for r in synthetic_plan(50, 10).records] != [r.to_json() for r in p1.records]


def test_plan_records_and_render_record():
    plan = synthetic_plan(20, SEED)
    assert len(plan.records) == 20
    for i, rec in enumerate(plan.records):
        s = make_scene(SEED, i)
        assert rec.source == "synthetic" and rec.has_image and rec.locator == {"seed": SEED, "index": i}
        assert rec.id == s.id and rec.category == s.category and rec.split == s.split
        assert rec.conversations == s.conversations() and rec.image_ref == f"images/{s.id}.png"
        assert SampleRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    assert render_record(plan.records[3]).tobytes() == render(make_scene(SEED, 3)).tobytes()
    bad = dataclasses.replace(plan.records[0], locator={"path": "x.png"})
    with pytest.raises(SampleError):
        render_record(bad)


def test_balance_and_turns(scenes):
    first = scenes[:200]
    cats = Counter(s.category for s in first)
    assert set(cats) == set(CATEGORIES)
    assert 0.15 <= cats["caption"] / 200 <= 0.35
    assert set(s.split for s in first) == {"train", "val", "test"}
    assert Counter(s.split for s in scenes)["train"] / N > 0.65
    questions = [s for s in scenes if s.category != "caption"]
    suffixed = sum(s.human.endswith(LLAVA_SUFFIX) for s in questions) / len(questions)
    assert 0.12 < suffixed < 0.4
    for s in scenes:
        conv = s.conversations()
        assert [t["from"] for t in conv] == ["human", "gpt"] and conv[1]["value"] == s.answer
        assert conv[0]["value"].startswith("<image>\n")
        assert s.answer and "<image>" not in s.answer
        if s.category == "caption":
            assert conv[0]["value"].count("\n") == 1 and s.answer.endswith("background.")
        else:
            assert conv[0]["value"] == "<image>\n" + s.question + (LLAVA_SUFFIX if s.human.endswith(LLAVA_SUFFIX) else "")
            assert len(s.answer.split()) == 1


def test_scene_invariants(scenes):
    names = list(COLOURS.values())
    dists = [np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(names) for b in names[i + 1:]]
    assert min(dists) > 60  # well-separated colours
    for s in scenes:
        assert s.background[0] == s.background[1] == s.background[2] and s.background not in names
        for o in s.objects:
            assert o.shape in SHAPES and COLOURS[o.colour] == o.rgb and 14 <= o.size <= 26
            x0, y0, x1, y1 = o.box
            assert x0 >= 0 and y0 >= 0 and x1 <= IMAGE_SIZE and y1 <= IMAGE_SIZE
        for i, a in enumerate(s.objects):  # no overlap: boxes are disjoint
            for b in s.objects[i + 1:]:
                assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
        masks = [shape_mask(o) for o in s.objects]
        if masks:
            assert int(np.sum(masks, axis=0).max()) <= 1


def test_colour_and_shape_answers(scenes):
    for s in _of(scenes, "colour"):
        arr = np.asarray(render(s))
        shape = s.question.split("the ")[1].rstrip("?")
        targets = [o for o in s.objects if o.shape == shape]
        assert len(targets) == 1 and targets[0].detail is None
        assert _px(arr, targets[0].x, targets[0].y) == COLOURS[s.answer]
        assert not detail_mask(targets[0])[targets[0].y, targets[0].x]
    for s in _of(scenes, "shape"):
        arr = np.asarray(render(s))
        colour = s.question.split("the ")[1].split()[0]
        targets = [o for o in s.objects if o.colour == colour]
        assert len(targets) == 1 and targets[0].shape == s.answer
        # the answer shape's mask is exactly the set of pixels of that colour (no other object has it)
        assert np.array_equal((arr == COLOURS[colour]).all(-1), shape_mask(targets[0]))


def test_count_answers(scenes):
    seen = set()
    for s in _of(scenes, "count"):
        arr = np.asarray(render(s))
        plural = s.question.split("many ")[1].split()[0]
        shape = next(sh for sh in SHAPES if plural in (sh + "s", sh + "es"))
        objs = [o for o in s.objects if o.shape == shape]
        assert s.answer in {str(k) for k in range(1, 7)} and len(objs) == int(s.answer)
        for o in objs:
            assert _px(arr, o.x, o.y) == o.rgb
        seen.add(s.answer)
    assert len(seen) >= 4


def test_position_answers(scenes):
    for s in _of(scenes, "position"):
        a, b = s.objects
        assert s.question == f"Where is the {a.colour} {a.shape} relative to the {b.colour} {b.shape}?"
        dx, dy = a.x - b.x, a.y - b.y
        if abs(dx) > abs(dy):
            assert s.answer == ("left" if dx < 0 else "right")
        else:
            assert s.answer == ("above" if dy < 0 else "below")
        major, minor = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
        assert major >= 20 and minor <= major / 2
        arr = np.asarray(render(s))
        assert _px(arr, a.x, a.y) == a.rgb and _px(arr, b.x, b.y) == b.rgb


def test_glyph_answers(scenes):
    masks = {d: glyph_mask(d) for d in GLYPHS}
    assert all(m.shape == (14, 10) for m in masks.values())
    assert len({m.tobytes() for m in masks.values()}) == 10
    for s in _of(scenes, "glyph"):
        g = s.glyph
        assert g is not None and g.digit == s.answer
        arr = np.asarray(render(s))
        x0, y0, x1, y1 = g.box
        region = arr[y0:y1, x0:x1]
        ink = (region == g.rgb).all(-1)
        assert np.array_equal(ink, masks[s.answer])
        assert [d for d, m in masks.items() if np.array_equal(ink, m)] == [s.answer]
        paper = g.patch_rgb if g.patch is not None else s.background
        assert (region[~ink] == paper).all()
        assert not any(o.box[0] < x1 and x0 < o.box[2] and o.box[1] < y1 and y0 < o.box[3] for o in s.objects)


def test_detail_answers(scenes):
    kinds = set()
    for s in _of(scenes, "detail"):
        with_detail = [o for o in s.objects if o.detail is not None]
        assert len(with_detail) == 1 and 2 <= len(s.objects) <= 4
        assert len({o.shape for o in s.objects}) == 1 and len({o.colour for o in s.objects}) == len(s.objects)
        target = with_detail[0]
        assert s.answer == target.colour
        word = {"dot": "small dot", "stripe": "thin stripe"}[target.detail]
        assert s.question == f"What colour is the {target.shape} with the {word}?"
        kinds.add(target.detail)
        plain = dataclasses.replace(s, objects=tuple(dataclasses.replace(o, detail=None) for o in s.objects))
        a, b = np.asarray(render(s)), np.asarray(render(plain))
        diff = (a != b).any(-1)
        assert 2 <= diff.sum() <= 60  # a fine detail: visible but small
        ys, xs = np.nonzero(diff)
        x0, y0, x1, y1 = target.box
        assert xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1
        assert _px(a, target.x, target.y) == target.rgb
    assert kinds == {"dot", "stripe"}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_dataset(tmp_path):
    n, seed = 30, 77
    manifest = write_dataset(tmp_path / "a", n, seed, shard_size=8, progress=False)
    root = tmp_path / "a"
    assert manifest == json.loads((root / "dataset.json").read_text())
    assert manifest["name"] == "layerfuse-synthetic" and manifest["n"] == n and manifest["seed"] == seed
    assert manifest["image_size"] == IMAGE_SIZE and manifest["categories"] == list(CATEGORIES)
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == n
    plan = {r.id: r for r in synthetic_plan(n, seed).records}

    llava = json.loads((root / "llava.json").read_text())
    assert [e["id"] for e in llava] == list(plan)
    for e in llava:
        rec = plan[e["id"]]
        assert e["conversations"] == rec.conversations and e["category"] == rec.category and e["split"] == rec.split
        img = Image.open(root / "images" / e["image"])
        assert img.mode == "RGB" and img.tobytes() == render_record(rec).tobytes()
    for split, cats in manifest["counts"].items():
        part = json.loads((root / f"llava_{split}.json").read_text())
        assert [e["id"] for e in part] == [e["id"] for e in llava if e["split"] == split]
        assert len(part) == sum(cats.values())

    seen: Counter = Counter()
    for split, names in manifest["files"]["wds"].items():
        for name in names:
            assert Path(name).name.startswith(f"{split}-")
            with tarfile.open(root / name) as tar:
                members = tar.getmembers()
                assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
                keys = Counter(m.name.rsplit(".", 1)[0] for m in members)
                assert all(v == 2 for v in keys.values()) and len(keys) <= 8
                for key in keys:
                    assert "." not in key
                    meta = json.loads(tar.extractfile(f"{key}.json").read())
                    rec = plan[meta["id"]]
                    assert meta["split"] == split and meta["conversations"] == rec.conversations
                    png = Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read()))
                    assert png.tobytes() == render_record(rec).tobytes()
                    seen[meta["id"]] += 1
    assert seen == Counter(list(plan))

    write_dataset(tmp_path / "b", n, seed, shard_size=8, progress=False)
    ha, hb = _hashes(root), _hashes(tmp_path / "b")
    assert ha == hb and len(ha) == n + 5 + sum(len(v) for v in manifest["files"]["wds"].values())
