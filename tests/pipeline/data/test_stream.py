"""WebDataset shards read once (pipeline/data/stream.py): `read_members` takes the planned members out of a stream, or
out of a local file by offset, under the size cap; a `pipe:` shard is planned from its stream with the same records and
issues as the same tar on disk; extraction reads each input shard once, opens none whose rows are all in finished
output shards, and records the hostile corpus the same way for local, `pipe:` and fsspec shards."""

from __future__ import annotations

import io
import os
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
import torch
import zarr

from layerfuse.pipeline.cache import extract as extract_mod
from layerfuse.pipeline.cache.extract import run_extract, tar_batches
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.data.access import is_remote, read_image_bytes
from layerfuse.pipeline.data.images import decode_image
from layerfuse.pipeline.data.records import SampleError, SampleRecord
from layerfuse.pipeline.data.sources import expand_shards, plan_webdataset
from layerfuse.core.errors import MissingError
from layerfuse.pipeline.data import stream as stream_mod
from layerfuse.pipeline.data.stream import ShardTape, SpoolError, open_stream, read_members, spool_path
from layerfuse.pipeline.models.encoder import load_vision_encoder

from tests.pipeline.cache.test_extract_hostile import test_hostile_webdataset_shard_is_contained as hostile_members
from tests.pipeline.data.test_sources import _five_samples, jpeg_noise, make_tar, png_bytes
from tests.support import extract_config

assert hostile_members  # the corpus below is the one that test writes


def _wanted(plan) -> dict[tuple[str, int], str]:
    return {(r.locator["member"], r.locator["offset"]): r.id for r in plan.records if r.has_image}


def test_read_members_yields_every_wanted_member_once(tmp_path):
    members, images = _five_samples()
    shard = tmp_path / "s.tar"
    make_tar(members, shard)
    plan = plan_webdataset(str(shard))
    got = dict(read_members(str(shard), _wanted(plan), max_bytes=1 << 20))
    assert got == {f"s.tar/{k}": images[k] for k in ("s0", "s1", "s2", "s3", "s4")}
    assert got == {r.id: read_image_bytes(r) for r in plan.records}  # the bytes random access reads
    # one wanted member: the same bytes; the stream stops after it (garbage behind it is never read)
    data = shard.read_bytes()
    s1 = next(r for r in plan.records if r.id == "s.tar/s1").locator
    cut = tmp_path / "tail.tar"
    cut.write_bytes(data[: s1["offset"] + s1["size"] + 512] + b"\xab" * 4096)
    assert list(read_members(str(cut), {(s1["member"], s1["offset"]): 1}, max_bytes=1 << 20)) == [(1, images["s1"])]
    assert list(read_members(str(shard), {}, max_bytes=1)) == []


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_local_shard_is_read_by_offset_wanted_members_only(tmp_path, monkeypatch, fmt):
    """A shard on a local disk is read by offset: each wanted member's 512-byte header and its data, nothing else
    (the plan already read every header and the records), also for names that need a long-name record."""
    members, images = _five_samples()
    long_key = "d" * 60 + "/" + ("k" * 80 if fmt != tarfile.USTAR_FORMAT else "k" * 30)  # ustar: a prefix split
    odd_key = "bild-\u00e4\u00f6" if fmt != tarfile.USTAR_FORMAT else "plain"
    images[long_key], images[odd_key] = jpeg_noise(31), jpeg_noise(32)
    members += [(f"{long_key}.jpg", images[long_key]), (f"{long_key}.txt", "a caption"),
                (f"{odd_key}.jpg", images[odd_key]), (f"{odd_key}.txt", "another")]
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=fmt) as tar:
        for name, data in members:
            data = data if isinstance(data, bytes) else data.encode()
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    plan = plan_webdataset(str(shard))
    assert not plan.issues and len(plan.records) == 7
    reads: list[int] = []
    real = stream_mod.open_local

    class Counted(io.RawIOBase):
        def __init__(self, path: str):
            self.f = real(path)

        def seek(self, *a):
            return self.f.seek(*a)

        def read(self, n: int = -1) -> bytes:
            data = self.f.read(n)
            reads.append(len(data))
            return data

        def close(self) -> None:
            self.f.close()

    monkeypatch.setattr(stream_mod, "open_local", Counted)
    got = dict(read_members(str(shard), _wanted(plan), max_bytes=1 << 20))
    assert got == {f"s.tar/{k}": v for k, v in images.items()}
    assert sum(reads) == sum(512 + len(v) for v in images.values())  # headers and images, no record, no other header
    assert dict(read_members(f"pipe:cat {shard}", _wanted(plan), max_bytes=1 << 20)) == got  # what a stream reads


def test_read_members_refuses_what_changed_since_planning(tmp_path):
    members, images = _five_samples()
    shard = tmp_path / "s.tar"
    data = make_tar(members, shard)
    plan = plan_webdataset(str(shard))
    wanted = _wanted(plan)
    # over the cap (the shard was planned under a larger one): refused by the header, never read
    small = min(len(v) for v in images.values()) - 1
    got = dict(read_members(str(shard), wanted, max_bytes=small))
    assert all(isinstance(e, SampleError) and "--max-image-bytes" in e.reason for e in got.values())
    # truncated since planning: the cut member is named, the ones behind it cannot be read
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        s3 = tar.getmember("s3.jpg")
    shard.write_bytes(data[: s3.offset_data + 10])
    got = dict(read_members(str(shard), wanted, max_bytes=1 << 20))
    assert [got[f"s.tar/s{i}"] for i in range(3)] == [images[f"s{i}"] for i in range(3)]
    assert got["s.tar/s3"].reason.startswith("truncated tar member s3.jpg")
    assert got["s.tar/s4"].reason.startswith(f"cannot read s4.jpg from {shard}")
    # rewritten with other members: not found where planned
    make_tar([("x.jpg", jpeg_noise(9)), *members], shard)
    got = dict(read_members(str(shard), wanted, max_bytes=1 << 20))
    assert all("the shard changed since planning" in e.reason for e in got.values())
    # a missing shard, a failing command
    got = dict(read_members(str(tmp_path / "gone.tar"), wanted, max_bytes=1 << 20))
    assert {e.reason for e in got.values()} == {f"shard not found: {tmp_path / 'gone.tar'}"}
    got = dict(read_members("pipe:exit 3", wanted, max_bytes=1 << 20))
    assert all(e.reason.startswith("cannot read") for e in got.values())


def test_shard_tape_counts_and_peeks():
    tape = ShardTape(io.BytesIO(bytes(range(256)) * 100))
    assert tape.read(10) == bytes(range(10)) and tape.head == bytes(range(10))
    tape.read(100)
    assert tape.peek(5, 3) == bytes([5, 6, 7]) and tape.peek(105, 10) == bytes(range(105, 110))
    tape.read(100)
    assert tape.peek(0, 4) == b""  # older than the last two reads
    assert not tape.eof
    assert tape.drain() == 25600 and tape.head == bytes(range(16)) and tape.eof
    copy = io.BytesIO()
    tape = ShardTape(io.BytesIO(b"abcdef"), copy)
    tape.read(2), tape.read(0)
    assert copy.getvalue() == b"ab" and not tape.eof
    tape.drain()
    assert copy.getvalue() == b"abcdef" and tape.eof


@pytest.mark.parametrize("kind", ["pipe", "memory"])
@pytest.mark.parametrize("name", ["full.tar", "cut.tar", "header.tar", "junk.tar"])
def test_streamed_shard_is_spooled_while_planned_and_read_from_the_spool(tmp_path, name, kind):
    """Planning copies a `pipe:` shard's whole output, and a remote (fsspec) shard whole, to its spool file, planning
    what it would plan without one; `read_members` reads the planned members from that copy, without running the
    command or opening the URL again, and names the shard in its messages."""
    shard = tmp_path / name
    shard.write_bytes(_corpora()[name])
    runs = tmp_path / "runs.txt"
    if kind == "pipe":
        url = f"pipe:echo run >> {runs}; cat {shard}"
    else:
        url = f"memory://spool-{uuid.uuid4().hex}/{name}"
        with fsspec.open(url, "wb") as f:
            f.write(shard.read_bytes())
    spool_dir = tmp_path / "spool"
    plan = plan_webdataset(url, spool_dir=spool_dir)
    again = plan_webdataset(url)  # a command streamed again; a remote shard by its headers
    assert (plan.records, plan.issues) == (again.records, again.issues)  # the copy changes nothing planned
    spool = spool_path(spool_dir, url)
    assert spool.read_bytes() == shard.read_bytes()
    assert sorted(p.name for p in spool_dir.iterdir()) == [spool.name]  # no temporary left beside it
    if kind == "pipe":
        assert runs.read_text().split() == ["run", "run"]
        shard.write_bytes(b"")  # what the command would print now no longer matters
    else:
        fsspec.filesystem("memory").rm(url.replace("memory://", "/"))  # nor whether the remote shard is still there
    got = dict(read_members(url, _wanted(plan), max_bytes=1 << 20, spool=spool))
    if kind == "pipe":
        assert runs.read_text().split() == ["run", "run"]  # the command did not run again
    assert got == {r.id: data for r, data in zip(plan.records, _image_bytes(_corpora()[name], plan)) if r.has_image}
    missing = dict(read_members(url, _wanted(plan), max_bytes=1 << 20, spool=tmp_path / "none.tar"))
    assert all(e.reason == f"shard not found: {url}" for e in missing.values())


def _image_bytes(data: bytes, plan) -> list[bytes | None]:
    return [data[r.locator["offset"]: r.locator["offset"] + r.locator["size"]] if r.has_image else None
            for r in plan.records]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fill a disk")
def test_a_spool_that_cannot_be_written_is_an_error_of_this_machine_not_a_damaged_input(tmp_path):
    """A full disk under the spool stops planning with one SpoolError naming the copy and the way out; it is never
    recorded as damage of the input shard (which would drop its samples)."""
    with open("/dev/full", "wb", buffering=0) as full:
        with pytest.raises(SpoolError, match=r"cannot write the spool copy /dev/full .*--spool none"):
            ShardTape(io.BytesIO(b"x" * 100), full).read(10)
    shard = tmp_path / "s.tar"
    shard.write_bytes(_corpora()["full.tar"])
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the spool folder would go")
    with pytest.raises(SpoolError, match="cannot write the spool copy"):
        plan_webdataset(f"pipe:cat {shard}", spool_dir=blocker / "spool")
    real_open = open
    import builtins
    from unittest import mock

    for buffering in (0, 1 << 24):  # each write fails; every write is buffered and the close fails
        def to_full(path, mode="r", *a, **kw):  # the spool file is created, then writing to it fails
            if ".tmp-" in str(path) and "w" in mode:
                return real_open("/dev/full", "wb", buffering=buffering)
            return real_open(path, mode, *a, **kw)

        with mock.patch.object(builtins, "open", to_full), pytest.raises(SpoolError, match="No space left"):
            plan_webdataset(f"pipe:cat {shard}", spool_dir=tmp_path / "spool")
        assert not list((tmp_path / "spool").iterdir())


def test_failing_command_leaves_no_spool(tmp_path):
    url = "pipe:exit 3"
    plan = plan_webdataset(url, spool_dir=tmp_path)
    assert not plan.records and [i.stage for i in plan.issues]
    assert spool_path(tmp_path, url).is_file() is (len(list(tmp_path.iterdir())) == 1)  # a whole (empty) output, or nothing
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _corpora() -> dict[str, bytes]:
    members, _ = _five_samples()
    data = make_tar(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        ms = tar.getmembers()
    bad = bytearray(data)
    bad[ms[6].offset: ms[6].offset + 512] = b"\xab" * 512
    return {
        "full.tar": data, "cut.tar": data[: ms[2].offset_data + ms[2].size // 2], "boundary.tar": data[: ms[4].offset],
        "header.tar": bytes(bad), "halfheader.tar": data[: ms[4].offset + 100], "empty.tar": b"",
        "junk.tar": b"this is not a tar file at all" * 40, "gz.tar": b"\x1f\x8b\x08\x00" + b"\x00" * 100,
        "members.tar": make_tar([
            ("dir", None, "dir"), ("./s0.jpg", jpeg_noise(0)), ("./s0.json", '{"id": "c", "conversations": 3}'),
            ("dir/sub/s1.PNG", png_bytes()), ("dir/sub/s1.JPG", jpeg_noise(1)), ("dir/sub/s1.txt", " cap "),
            ("multi.b.c.jpg", jpeg_noise(2)), ("multi.b.c.txt", "m"), ("dup.jpg", jpeg_noise(3)), ("./dup.jpg", b"x"),
            ("link.jpg", "s0.jpg", "sym"), ("README", "hello"), ("../up.jpg", jpeg_noise(4)), ("lone.webp", b"w"),
            ("t.json", '{"id": "t", "conversations": [{"from": "human", "value": "Hi"}]}'), ("bom.txt", b"\xef\xbb\xbfhi"),
            ("bom.jpg", jpeg_noise(5)), ("bad.txt", b"\xff\xfe"), ("bad.jpg", jpeg_noise(6)),
        ]),
    }


@pytest.mark.parametrize("name", list(_corpora()))
def test_pipe_shard_plans_like_the_file(tmp_path, name):
    shard = tmp_path / name
    shard.write_bytes(_corpora()[name])
    url = f"pipe:cat {shard}"
    assert expand_shards(url) == [url]
    on_disk, streamed = plan_webdataset(str(shard)), plan_webdataset(url)

    def same(text: str) -> str:
        return text.replace(url, str(shard))

    assert [r.to_json() for r in streamed.records] == [
        {**r.to_json(), "locator": {**r.locator, "tar": url} if r.locator else {}} for r in on_disk.records]
    assert [(i.id, i.stage, same(i.reason), same(i.where)) for i in streamed.issues] == [
        (i.id, i.stage, i.reason, i.where) for i in on_disk.issues]
    if streamed.records:  # what extraction reads from the stream is what the file holds at the planned offsets
        got = dict(read_members(url, _wanted(streamed), max_bytes=1 << 20))
        assert got == {r.id: read_image_bytes(r) for r in on_disk.records if r.has_image}
        assert dict(read_members(str(shard), _wanted(on_disk), max_bytes=1 << 20)) == got  # the file, by offset
        with pytest.raises(SampleError, match="can only be streamed"):
            read_image_bytes(next(r for r in streamed.records if r.has_image))


def test_tar_batches_split_where_the_input_shard_changes():
    def rec(tar: str | None) -> SampleRecord:
        loc = {"tar": tar, "member": "m.jpg", "offset": 512, "size": 1} if tar else {}
        return SampleRecord(id="x", source="webdataset", locator=loc, conversations=[], has_image=bool(tar))

    records = [rec("a"), rec(None), rec("a"), rec("b"), rec(None), rec("b"), rec(None), rec(None), rec("c")]
    assert tar_batches(records, [[0, 1, 2, 3], [4, 5, 6, 7], [8]]) == [
        ("a", [0, 1, 2]), ("b", [3]), ("b", [4, 5, 6, 7]), ("c", [8])]
    assert tar_batches(records, [[6, 7]]) == [(None, [6, 7])]


def _shards(tmp_path, n_tars: int, per_tar: int) -> list[str]:
    out = []
    for t in range(n_tars):
        members = []
        for i in range(per_tar):
            members += [(f"k{t}-{i}.png", png_bytes(color=(40 * t, 20 * i, 90), size=(30 + i, 20))),
                        (f"k{t}-{i}.txt", f"caption {t} {i}")]
        if t == 1:
            members.append(("k1-text.json", '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}'))
        path = tmp_path / f"in-{t}.tar"
        make_tar(members, path)
        out.append(str(path))
    return out


def test_extract_streams_each_input_shard_once_and_resumes_by_input_shard(tmp_path, vision_dir, monkeypatch):
    shards = _shards(tmp_path, 3, 5)  # 16 rows (one text-only), output shards of 4: input shards span output shards
    log = tmp_path / "opened.txt"  # written by the DataLoader workers (other processes)
    real = extract_mod.read_members

    def counted(url, wanted, max_bytes, **kw):
        with open(log, "a") as f:
            f.write(os.path.basename(url) + "\n")
        return real(url, wanted, max_bytes, **kw)

    def opened() -> list[str]:
        names = sorted(log.read_text().split()) if log.exists() else []
        log.unlink(missing_ok=True)
        return names

    monkeypatch.setattr(extract_mod, "read_members", counted)
    out = tmp_path / "cache"
    cfg = dict(builtin=None, wds=",".join(shards), shard_samples=4, batch_size=3, workers=2)
    res = run_extract(extract_config(str(out), vision_dir, **cfg))
    assert res.summary == {"ok": 15, "text_only": 1, "skipped": 0, "refused": 0, "plan_skipped": 0, "notes": 0}
    assert opened() == ["in-0.tar", "in-1.tar", "in-2.tar"]
    cache = FeatureCache(out)
    first = cache.features(list(range(16)), layers=[0, 3]).numpy()  # [16, 2, T, D] float16
    # the streamed images are the planned ones: the features of the bytes read by offset, within float16 rounding
    enc = load_vision_encoder(str(vision_dir))
    pre = enc.preprocessor(False)
    plan = plan_webdataset(",".join(shards))
    rows = [r for r, rec in enumerate(plan.records) if rec.has_image][::4]
    pixels = torch.from_numpy(np.stack([pre(decode_image(read_image_bytes(plan.records[r]), max_pixels=1 << 24))
                                        for r in rows]))
    with torch.no_grad():
        ref = enc(pixels)[:, [0, 3]].float().numpy()  # [n, 2, T, D]
    np.testing.assert_allclose(first[rows].astype(np.float32), ref, rtol=1e-2, atol=1e-2)

    # resume: only output shard 1 (rows 4..7) is redone; it holds rows of in-0 and in-1 only: in-2 is not opened
    os.remove(out / "progress" / "shard-000001.json")
    g = zarr.open_group(str(out), mode="r+")
    g.attrs["layerfuse"] = {**dict(g.attrs["layerfuse"]), "complete": False}
    run_extract(extract_config(str(out), vision_dir, **cfg))
    assert opened() == ["in-0.tar", "in-1.tar"]
    np.testing.assert_array_equal(FeatureCache(out).features(list(range(16)), layers=[0, 3]).numpy(), first)


@pytest.mark.parametrize("kind", ["pipe", "memory"])
def test_hostile_corpus_streamed_from_pipe_and_fsspec(tmp_path, vision_dir, kind, monkeypatch):
    """The hostile shard of test_extract_hostile, read through `pipe:` and an fsspec URL: the same records."""
    written: dict[str, str] = {}
    real = extract_mod.run_extract

    def redirect(cfg):
        local = cfg.wds
        if kind == "pipe":
            cfg.wds = f"pipe:cat {local}"
        else:
            url = f"memory://stream-{uuid.uuid4().hex}/s.tar"
            with fsspec.open(url, "wb") as f:
                f.write(open(local, "rb").read())
            cfg.wds = written["url"] = url
        return real(cfg)

    import tests.pipeline.cache.test_extract_hostile as hostile

    monkeypatch.setattr(hostile, "run_extract", redirect)
    try:
        hostile.test_hostile_webdataset_shard_is_contained(tmp_path, vision_dir)
    finally:
        if "url" in written:
            fsspec.filesystem("memory").rm(written["url"].rsplit("/", 1)[0].replace("memory://", "/"), recursive=True)


def test_no_command_runs_that_wds_does_not_name(tmp_path, vision_dir):
    """A cache's stored locators are data: a `pipe:` tar among them that --wds does not name is a bad sample, not run."""
    from layerfuse.pipeline.cache.extract import _StreamDataset
    from layerfuse.pipeline.data.access import ImageAccess
    from layerfuse.pipeline.data.sources import pipe_shards

    assert pipe_shards("a.tar, pipe:cat {x,y}.tar,s3://b/c.tar") == {"pipe:cat x.tar", "pipe:cat y.tar"}
    flag = tmp_path / "ran"
    loc = {"tar": f"pipe:touch {flag}", "member": "a.png", "offset": 512, "size": 10}
    rec = SampleRecord(id="a", source="webdataset", locator=loc, conversations=[], has_image=True)
    pre = load_vision_encoder(str(vision_dir)).preprocessor(False)
    ds = _StreamDataset([rec], [[0]], pre, 1 << 24, ImageAccess(), pipe_shards(f"pipe:cat {tmp_path}/s.tar"))
    [batch] = list(ds)
    assert batch["items"][0]["error"] == f"input shard 'pipe:touch {flag}' is a command that --wds does not name; not run"
    assert not flag.exists()


def test_extract_runs_each_pipe_command_once_and_resumes_from_the_spool(tmp_path, vision_dir, monkeypatch):
    """Planning spools each `pipe:` shard; extraction reads the spools (no command runs again), a run killed after
    planning resumes from them, and they are removed once the cache is complete. --spool none runs each command twice."""
    shards = _shards(tmp_path, 2, 5)
    runs = tmp_path / "runs.txt"
    urls = [f"pipe:echo {os.path.basename(s)} >> {runs}; cat {s}" for s in shards]
    cfg = dict(builtin=None, wds=",".join(urls), shard_samples=4, batch_size=3, workers=2)

    def commands_run() -> list[str]:
        names = sorted(runs.read_text().split()) if runs.exists() else []
        runs.unlink(missing_ok=True)
        return names

    out = tmp_path / "cache"
    spool_dir = tmp_path / "cache.spool"

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_mod, "_process", killed)
    with pytest.raises(KeyboardInterrupt):
        run_extract(extract_config(str(out), vision_dir, **cfg))
    assert extract_config(str(out), vision_dir, **cfg).spool_dir() == spool_dir
    assert sorted(p.read_bytes() for p in spool_dir.iterdir()) == sorted(open(s, "rb").read() for s in shards)
    assert commands_run() == ["in-0.tar", "in-1.tar"]  # planning
    monkeypatch.undo()
    res = run_extract(extract_config(str(out), vision_dir, **cfg))
    assert res.summary["ok"] == 10 and res.summary["text_only"] == 1
    assert commands_run() == []  # extraction read the spools
    assert not spool_dir.exists()  # removed with the cache complete

    ref = tmp_path / "ref"
    res = run_extract(extract_config(str(ref), vision_dir, **cfg, spool="none"))
    assert commands_run() == ["in-0.tar", "in-0.tar", "in-1.tar", "in-1.tar"]  # planning, then extraction
    assert not (tmp_path / "ref.spool").exists()
    np.testing.assert_array_equal(FeatureCache(out).features(list(range(11)), layers=[0, 3]).numpy(),
                                  FeatureCache(ref).features(list(range(11)), layers=[0, 3]).numpy())
    assert extract_config("s3://b/c", vision_dir, run_dir=str(tmp_path / "r")).spool_dir().parent == tmp_path / "r" / "spool"
    assert extract_config(str(out), vision_dir, spool=str(tmp_path / "x")).spool_dir() == tmp_path / "x"
    assert extract_config(f"file://{out}", vision_dir).spool_dir() == spool_dir  # a file:// --out is a local folder
    local = plan_webdataset(f"local://{shards[0]}", spool_dir=tmp_path / "local-spool")  # a local file: never copied
    assert local.records and not (tmp_path / "local-spool").exists()


def test_shards_planned_at_once_give_the_plan_of_one_at_a_time(tmp_path):
    """Planning runs several shards at once (threads); records and issues come in shard order, whatever finishes first,
    and a shard that raises stops the planning with its error."""
    names = list(_corpora())
    spec = []
    for i, name in enumerate(names):
        path = tmp_path / name
        path.write_bytes(_corpora()[name])
        # later shards finish first: every other one is a command that waits
        spec.append(f"pipe:sleep {0.05 * (len(names) - i)}; cat {path}" if i % 2 else str(path))
    one = plan_webdataset(",".join(spec), threads=1)
    many = plan_webdataset(",".join(spec), threads=8)
    assert one.records and one.issues
    assert (many.records, many.issues) == (one.records, one.issues)
    base = f"memory://plan-{uuid.uuid4().hex}"
    with fsspec.open(f"{base}/a.tar", "wb") as f:
        f.write(_corpora()["full.tar"])
    with pytest.raises(MissingError, match="shard not found"):
        plan_webdataset(f"{base}/a.tar,{base}/gone.tar,{base}/a.tar", threads=3)
    fsspec.filesystem("memory").rm(base.replace("memory://", "/"), recursive=True)


def test_one_rule_says_which_shards_are_remote(tmp_path):
    """access.is_remote: plain paths, file:// and local:// are on this disk (opened as files, never spooled), any other
    URL is not; open_stream reads a local:// or file:// shard as the plain path does."""
    assert not any(is_remote(u) for u in ("/d/a.tar", "a.tar", "file:///d/a.tar", "local:///d/a.tar"))
    assert all(is_remote(u) for u in ("s3://b/a.tar", "https://h/a.tar", "memory://a.tar"))
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"tar bytes")
    for url in (str(shard), f"file://{shard}", f"local://{shard}"):
        with open_stream(url) as f:
            assert f.read() == b"tar bytes", url
