"""Tests for layerfuse.pipeline.data.sources: LLaVA JSON/JSONL planning, WebDataset shard planning, image loading.

Every bad input (files, tars, JSON) is built for real in tmp dirs or in fsspec's memory filesystem.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image

from layerfuse.pipeline.data.records import SampleError, SampleRecord
from layerfuse.pipeline.data.access import ImageAccess, load_image, read_image_bytes
from layerfuse.pipeline.data.sources import (
    expand_shards,
    normalize_conversations,
    plan_llava,
    plan_webdataset,
    split_member_name,
)

CONV = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]
TEXT_CONV = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]


def png_bytes(color=(255, 0, 0), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def jpeg_noise(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_tar(members: list[tuple], path=None) -> bytes:
    """members: (name, bytes) for files, (name, None, "dir") for directories, (name, target, "sym")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            name = m[0]
            ti = tarfile.TarInfo(name)
            if len(m) == 3 and m[2] == "dir":
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            elif len(m) == 3 and m[2] == "sym":
                ti.type = tarfile.SYMTYPE
                ti.linkname = m[1]
                tar.addfile(ti)
            else:
                data = m[1] if isinstance(m[1], bytes) else m[1].encode()
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    data = buf.getvalue()
    if path is not None:
        with open(path, "wb") as f:
            f.write(data)
    return data


def issues_by_id(plan):
    out = {}
    for i in plan.issues:
        out.setdefault(i.id, []).append(i)
    return out


# -------------------------------------------------------------------------------- conversations


def test_normalize_accepts_role_aliases():
    raw = [{"from": "USER", "value": "<image>\nq"}, {"from": "Assistant", "value": "a"},
           {"from": "human", "value": "q2"}, {"from": "model", "value": "a2", "extra": 1}]
    turns, note = normalize_conversations(raw, has_image=True)
    assert note is None
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[3] == {"from": "gpt", "value": "a2"}


def test_normalize_adds_missing_image_token():
    turns, note = normalize_conversations(TEXT_CONV, has_image=True)
    assert note == "no <image> token; added one to the first human turn"
    assert turns[0]["value"] == "<image>\nHi"
    assert TEXT_CONV[0]["value"] == "Hi"  # input not mutated


@pytest.mark.parametrize(
    "raw, has_image, reason",
    [
        ({"from": "human"}, True, "'conversations' is not a list (got dict)"),
        ([], True, "'conversations' is empty"),
        (["hi"], False, "turn 1 is not an object (got str)"),
        ([{"from": "human", "value": "x"}, {"from": "gpt"}], False, "turn 2 has no 'value' string"),
        ([{"from": "human", "value": "x"}, {"from": "gpt", "value": 3}], False, "turn 2 has no 'value' string"),
        ([{"from": "system", "value": "x"}], False, "turn 1 has unknown role 'system' (expected human or gpt)"),
        ([{"value": "x"}], False, "turn 1 has no 'from' string"),
        ([{"from": "gpt", "value": "x"}], False, "turn 1 is from 'gpt'; the first turn must be from human"),
        (CONV, False, "conversation has <image> but the sample has no image"),
        ([{"from": "human", "value": "<image> <image>"}], True,
         "conversation has 2 <image> tokens; at most one is supported"),
    ],
)
def test_normalize_errors(raw, has_image, reason):
    with pytest.raises(SampleError) as e:
        normalize_conversations(raw, has_image=has_image)
    assert e.value.reason == reason


# ------------------------------------------------------------------------------------------ LLaVA


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def test_plan_llava_good_and_bad_records(tmp_path):
    root = tmp_path / "imgs"
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "a.png").write_bytes(png_bytes())
    records = [
        {"id": "ok", "image": "coco/a.png", "conversations": CONV, "category": "cap", "split": "val"},
        {"id": "text", "conversations": TEXT_CONV},
        5,
        {"id": "noconv", "image": "coco/a.png"},
        {"id": "role", "image": "x.png", "conversations": [{"from": "robot", "value": "<image>"}]},
        {"id": "val", "image": "x.png", "conversations": [{"from": "human", "value": ["<image>"]}]},
        {"id": "repair", "image": "coco/missing.png", "conversations": TEXT_CONV},
        {"id": "tok", "conversations": CONV},
        {"image": "coco/a.png", "conversations": CONV},
        {"id": "multi", "image": ["a.png", "b.png"], "conversations": CONV},
    ]
    jp = write_json(tmp_path / "data.json", records)
    plan = plan_llava(jp, str(root), split="train")

    ids = [r.id for r in plan.records]
    assert ids == ["ok", "text", "repair", "record[8]"]
    ok, text, repair, noid = plan.records
    assert ok.source == "llava" and ok.has_image
    assert ok.locator == {"path": os.path.join(str(root), "coco", "a.png")}
    assert ok.image_ref == "coco/a.png"
    assert (ok.category, ok.split) == ("cap", "val")
    assert ok.conversations == CONV
    assert text.has_image is False and text.locator == {} and text.split == "train" and text.category == ""
    # no existence check at planning time
    assert repair.locator["path"].endswith("coco/missing.png")
    assert repair.conversations[0]["value"] == "<image>\nHi"

    iss = issues_by_id(plan)
    assert iss["record[2]"][0].reason == "record is not an object (got int)"
    assert iss["record[2]"][0].where == f"{jp}#2"
    assert iss["noconv"][0].reason == "no 'conversations'" and iss["noconv"][0].stage == "plan"
    assert "unknown role 'robot'" in iss["role"][0].reason
    assert iss["val"][0].reason == "turn 1 has no 'value' string"
    assert [(i.stage, i.reason) for i in iss["repair"]] == [
        ("note", "no <image> token; added one to the first human turn")]
    assert iss["tok"][0].reason == "conversation has <image> but the sample has no image"
    assert iss["record[8]"][0].stage == "note" and "no usable 'id'" in iss["record[8]"][0].reason
    assert "multi-image" in iss["multi"][0].reason
    assert all(i.source == "llava" for i in plan.issues)
    assert len(plan.issues) == 8


def test_plan_llava_duplicate_ids_made_unique(tmp_path):
    jp = write_json(tmp_path / "d.json", [{"id": "x", "conversations": TEXT_CONV}] * 3)
    plan = plan_llava(jp, str(tmp_path))
    assert [r.id for r in plan.records] == ["x", "x#2", "x#3"]
    assert [i.stage for i in plan.issues] == ["note", "note"]


def test_plan_llava_invalid_json_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[{"id": "a", "conversations": []},\n {"id": "b" "x"}]')
    with pytest.raises(SampleError) as e:
        plan_llava(str(p), str(tmp_path))
    assert str(p) in e.value.reason
    assert "line 2" in e.value.reason and "column" in e.value.reason
    p.write_text('{"id": "a"}')
    with pytest.raises(SampleError, match="expected a JSON list"):
        plan_llava(str(p), str(tmp_path))
    with pytest.raises(SampleError, match="file not found"):
        plan_llava(str(tmp_path / "nope.json"), str(tmp_path))


def test_plan_llava_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = [json.dumps({"id": "a", "image": "a.png", "conversations": CONV}), "",
             "{not json", json.dumps({"id": "c", "conversations": TEXT_CONV})]
    p.write_text("\n".join(lines) + "\n")
    plan = plan_llava(str(p), str(tmp_path / "img"))
    assert [r.id for r in plan.records] == ["a", "c"]
    assert plan.records[0].locator["path"] == str(tmp_path / "img" / "a.png")
    assert len(plan.issues) == 1
    assert plan.issues[0].id == "record[1]" and plan.issues[0].reason.startswith("invalid JSON on line 3")


def test_plan_llava_memory_url_and_read_bytes():
    base = f"memory://t-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    img = png_bytes((0, 0, 255))
    with fsspec.open(f"{base}/images/sub/b.png", "wb") as f:
        f.write(img)
    with fsspec.open(f"{base}/data.json", "w") as f:
        json.dump([{"id": "m", "image": "sub/b.png", "conversations": CONV},
                   {"id": "gone", "image": "sub/none.png", "conversations": CONV}], f)
    try:
        plan = plan_llava(f"{base}/data.json", f"{base}/images")
        assert plan.issues == []
        m, gone = plan.records
        assert m.locator == {"path": f"{base}/images/sub/b.png"}
        access = ImageAccess(image_root=f"{base}/images")
        assert read_image_bytes(m, access) == img
        assert load_image(m, max_pixels=10_000, access=access).getpixel((0, 0)) == (0, 0, 255)
        with pytest.raises(SampleError) as e:
            read_image_bytes(gone, access)
        assert e.value.reason == f"image not found: {base}/images/sub/none.png"
    finally:
        fs.rm(base.replace("memory://", "/"), recursive=True)


def test_load_image_llava_bad_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    full = jpeg_noise(3)
    (tmp_path / "half.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "junk.png").write_bytes(b"\x00\x01garbage" * 10)
    (tmp_path / "good.jpg").write_bytes(full)
    recs = [{"id": n, "image": n, "conversations": CONV}
            for n in ("empty.jpg", "half.jpg", "junk.png", "good.jpg", "missing.jpg")]
    plan = plan_llava(write_json(tmp_path / "d.json", recs), str(tmp_path))
    by = {r.id: r for r in plan.records}
    reasons = {}
    for n in ("empty.jpg", "half.jpg", "junk.png", "missing.jpg"):
        with pytest.raises(SampleError) as e:
            load_image(by[n], max_pixels=1_000_000, access=ImageAccess(image_root=str(tmp_path)))
        reasons[n] = e.value.reason
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["half.jpg"].startswith("truncated or corrupt image data:")
    assert reasons["junk.png"].startswith("not an image or unsupported format:")
    assert reasons["missing.jpg"] == f"image not found: {tmp_path / 'missing.jpg'}"
    assert load_image(by["good.jpg"], max_pixels=1_000_000, access=ImageAccess(image_root=str(tmp_path))).size == (64, 48)
    with pytest.raises(SampleError, match="image too large: 64x48"):
        load_image(by["good.jpg"], max_pixels=1000, access=ImageAccess(image_root=str(tmp_path)))


def test_load_image_synthetic_delegates_to_render_record(monkeypatch):
    calls = []

    def render_record(rec):
        calls.append(rec.id)
        return Image.new("RGB", (2, 2))

    monkeypatch.setattr("layerfuse.pipeline.data.access.render_record", render_record)
    rec = SampleRecord("s0", "synthetic", {"seed": 0, "index": 0}, CONV, True)
    assert load_image(rec, max_pixels=100).size == (2, 2)
    assert calls == ["s0"]
    with pytest.raises(ValueError):
        read_image_bytes(rec)


# -------------------------------------------------------------------------------------- shards


def test_split_member_name():
    assert split_member_name("./dir/a.b.c.JPG") == ("dir/a", "b.c.jpg")
    assert split_member_name("x y ü.Json") == ("x y ü", "json")
    assert split_member_name("README") is None
    assert split_member_name("dir/.hidden.jpg") is None


def test_expand_shards_braces_globs_commas(tmp_path):
    for i in range(4):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "other.tar").write_bytes(b"")
    d = str(tmp_path)
    assert expand_shards(f"{d}/train-{{000000..000002}}.tar") == [f"{d}/train-{i:06d}.tar" for i in range(3)]
    assert expand_shards(f"{d}/train-*.tar") == [f"{d}/train-{i:06d}.tar" for i in range(4)]
    assert expand_shards(f"{d}/other.tar, {d}/train-{{000001,000003}}.tar") == [
        f"{d}/other.tar", f"{d}/train-000001.tar", f"{d}/train-000003.tar"]
    assert expand_shards([f"{d}/other.tar", f"{d}/other.tar", "s3://bucket/x-{0..1}.tar"]) == [
        f"{d}/other.tar", "s3://bucket/x-0.tar", "s3://bucket/x-1.tar"]
    with pytest.raises(FileNotFoundError, match="train-000004.tar"):
        expand_shards(f"{d}/train-{{000003..000009}}.tar")
    with pytest.raises(FileNotFoundError, match="nomatch"):
        expand_shards(f"{d}/nomatch-*.tar")


def test_plan_webdataset_members(tmp_path):
    img = {k: jpeg_noise(i) for i, k in enumerate(["s0", "s1", "s2", "multi", "lone", "dup1", "dup2", "txtonly"])}
    members = [
        ("dir", None, "dir"),
        ("./s0.jpg", img["s0"]),
        ("./s0.json", json.dumps({"id": "custom-0", "conversations": CONV, "category": "c", "split": "val"})),
        ("dir/sub/s1.PNG", png_bytes()),
        ("dir/sub/s1.JPG", img["s1"]),  # jpg preferred over png
        ("dir/sub/s1.txt", "  a caption  \n"),
        ("with space ü.jpeg", img["s2"]),
        ("with space ü.json", json.dumps({"conversations": TEXT_CONV})),  # token added: note
        ("multi.b.c.jpg", img["multi"]),  # key "multi", ext "b.c.jpg": last-suffix fallback
        ("multi.b.c.json", json.dumps({"conversations": CONV})),
        ("lone.webp", img["lone"]),
        ("dup.jpg", img["dup1"]),
        ("dup.json", json.dumps({"conversations": CONV})),
        ("./dup.jpg", img["dup2"]),
        ("textonly.json", json.dumps({"id": "t", "conversations": TEXT_CONV})),
        ("badtext.json", json.dumps({"conversations": CONV})),
        ("badjson.json", "{nope"),
        ("link.jpg", "s0.jpg", "sym"),
        ("README", "hello"),
        ("capnoimg.txt", "caption without image"),
    ]
    shard = tmp_path / "shard-0.tar"
    make_tar(members, shard)
    plan = plan_webdataset(str(shard), split="train")

    by = {r.id: r for r in plan.records}
    assert list(by) == ["custom-0", "shard-0.tar/dir/sub/s1", "shard-0.tar/with space ü",
                        "shard-0.tar/multi", "t"]
    r0 = by["custom-0"]
    assert (r0.category, r0.split, r0.image_ref) == ("c", "val", "./s0.jpg")
    assert r0.locator["tar"] == str(shard) and r0.locator["member"] == "./s0.jpg"
    r1 = by["shard-0.tar/dir/sub/s1"]
    assert r1.image_ref == "dir/sub/s1.JPG"
    assert r1.conversations == [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "a caption"}]
    assert by["shard-0.tar/multi"].image_ref == "multi.b.c.jpg"
    t = by["t"]
    assert t.has_image is False and t.locator == {} and t.split == "train"

    # random access by offset gives back exactly the original bytes, and decodes
    originals = {"custom-0": img["s0"], "shard-0.tar/dir/sub/s1": img["s1"],
                 "shard-0.tar/with space ü": img["s2"], "shard-0.tar/multi": img["multi"]}
    for rid, data in originals.items():
        assert by[rid].locator["size"] == len(data)
        assert read_image_bytes(by[rid]) == data
        assert load_image(by[rid], max_pixels=10_000).size == (64, 48)

    iss = issues_by_id(plan)
    assert [(i.stage, i.reason) for i in iss["shard-0.tar/with space ü"]] == [
        ("note", "no <image> token; added one to the first human turn")]
    assert iss["shard-0.tar/lone"][0].reason == "no conversation (.json) or caption (.txt) member"
    assert iss["shard-0.tar/lone"][0].where == f"{shard}#lone.webp"
    assert "duplicate key" in iss["shard-0.tar/dup"][0].reason
    assert "<image> but the sample has no image" in iss["shard-0.tar/badtext"][0].reason
    assert iss["shard-0.tar/badjson"][0].reason.startswith("invalid JSON in badjson.json")
    assert "symlink" in iss["shard-0.tar/link.jpg"][0].reason
    assert "no extension" in iss["shard-0.tar/README"][0].reason
    assert "no image member" in iss["shard-0.tar/capnoimg"][0].reason
    assert not any("<truncated>" in i.id for i in plan.issues)
    assert len(plan.issues) == 8


def test_plan_webdataset_ambiguous_last_suffix(tmp_path):
    shard = tmp_path / "amb.tar"
    make_tar([("img.001.jpg", jpeg_noise(0)), ("img.002.jpg", jpeg_noise(1)), ("img.001.json", "{}")], shard)
    plan = plan_webdataset(str(shard))
    assert plan.records == []
    assert "several candidate members" in plan.issues[0].reason


def _five_samples():
    members, images = [], {}
    for i in range(5):
        images[f"s{i}"] = jpeg_noise(10 + i)
        members.append((f"s{i}.jpg", images[f"s{i}"]))
        members.append((f"s{i}.json", json.dumps({"conversations": CONV})))
    return members, images


def test_plan_webdataset_truncated_in_third_member(tmp_path):
    members, images = _five_samples()
    data = make_tar(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = tar.getmembers()[2]
    assert third.name == "s1.jpg"
    shard = tmp_path / "cut.tar"
    shard.write_bytes(data[: third.offset_data + third.size // 2])
    plan = plan_webdataset(str(shard))
    assert [r.id for r in plan.records] == ["cut.tar/s0"]
    assert read_image_bytes(plan.records[0]) == images["s0"]
    iss = issues_by_id(plan)
    assert "cut off" in iss["cut.tar/s1"][0].reason
    trunc = iss["cut.tar/<truncated>"][0]
    assert trunc.reason.startswith("truncated or corrupt tar after 2 members:")
    assert trunc.where == str(shard) and trunc.source == "webdataset" and trunc.stage == "plan"
    # a record planned from the full shard but read from the truncated one: short read
    full = tmp_path / "full.tar"
    full.write_bytes(data)
    rec = plan_webdataset(str(full)).records[4]
    d = rec.to_json()
    d["locator"] = dict(d["locator"], tar=str(shard))
    with pytest.raises(SampleError, match="truncated tar member s4.jpg"):
        read_image_bytes(SampleRecord.from_json(d))


def test_plan_webdataset_cut_at_boundary_and_bad_header(tmp_path):
    members, _ = _five_samples()
    data = make_tar(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        ms = tar.getmembers()
    # cut exactly after s1.json: all 4 members intact, end marker missing
    boundary = ms[4].offset  # header of s2.jpg
    (tmp_path / "b.tar").write_bytes(data[:boundary])
    plan = plan_webdataset(str(tmp_path / "b.tar"))
    assert [r.id for r in plan.records] == ["b.tar/s0", "b.tar/s1"]
    assert [i.id for i in plan.issues] == ["b.tar/<truncated>"]
    assert "after 4 members" in plan.issues[0].reason
    # garbage over the header of s3.jpg: s0..s2 kept
    bad = bytearray(data)
    bad[ms[6].offset: ms[6].offset + 512] = b"\xab" * 512
    (tmp_path / "h.tar").write_bytes(bytes(bad))
    plan = plan_webdataset(str(tmp_path / "h.tar"))
    assert [r.id for r in plan.records] == ["h.tar/s0", "h.tar/s1", "h.tar/s2"]
    assert [i.id for i in plan.issues] == ["h.tar/<truncated>"]
    assert f"invalid tar header at byte {ms[6].offset}" in plan.issues[0].reason


def test_plan_webdataset_unreadable_shards_do_not_raise(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    (tmp_path / "gz.tar").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 100)
    good = make_tar([("a.jpg", jpeg_noise(0)), ("a.txt", "cap")], tmp_path / "good.tar")
    assert good
    plan = plan_webdataset(f"{tmp_path}/empty.tar,{tmp_path}/junk.tar,{tmp_path}/gz.tar,{tmp_path}/good.tar")
    assert [r.id for r in plan.records] == ["good.tar/a"]
    iss = issues_by_id(plan)
    assert iss["empty.tar/<truncated>"][0].reason.startswith("truncated or corrupt tar after 0 members")
    assert iss["junk.tar/<truncated>"][0].reason.startswith("truncated or corrupt tar after 0 members")
    assert "compressed" in iss["gz.tar/<shard>"][0].reason
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        plan_webdataset([str(tmp_path / "good.tar"), str(tmp_path / "missing.tar")])


def test_plan_webdataset_memory_url_and_glob():
    base = f"memory://wds-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    imgs = [jpeg_noise(20), jpeg_noise(21)]
    for n in range(2):
        with fsspec.open(f"{base}/train-{n}.tar", "wb") as f:
            f.write(make_tar([(f"k{n}.jpg", imgs[n]), (f"k{n}.json", json.dumps({"conversations": CONV}))]))
    try:
        shards = expand_shards(f"{base}/train-*.tar")
        # fsspec's glob returns canonical URLs ("memory:///..."): same files
        assert [fs._strip_protocol(u) for u in shards] == [
            fs._strip_protocol(f"{base}/train-{n}.tar") for n in range(2)]
        assert all(u.startswith("memory://") for u in shards)
        plan = plan_webdataset(f"{base}/train-{{0..1}}.tar")
        assert plan.issues == []
        assert [r.id for r in plan.records] == ["train-0.tar/k0", "train-1.tar/k1"]
        assert [read_image_bytes(r) for r in plan.records] == imgs
        with pytest.raises(FileNotFoundError):
            plan_webdataset(f"{base}/nope.tar")
    finally:
        fs.rm(base.replace("memory://", "/"), recursive=True)


def test_duplicate_ids_across_shards_made_unique(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        make_tar([("k.jpg", jpeg_noise(0)), ("k.txt", "cap")], tmp_path / d / "s.tar")
    plan = plan_webdataset(f"{tmp_path}/a/s.tar,{tmp_path}/b/s.tar")
    assert [r.id for r in plan.records] == ["s.tar/k", "s.tar/k#2"]
    assert plan.records[1].locator["tar"] == str(tmp_path / "b" / "s.tar")
    assert [i.stage for i in plan.issues] == ["note"]
