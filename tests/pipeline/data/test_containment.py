"""Untrusted sources are contained (issue 14): LLaVA JSON and WebDataset shards cannot make phase one read outside
the image root, open a network connection, hang, exhaust memory, raise a traceback or copy file contents into the
records. Every case is a recorded bad sample (a `SampleError` or a plan issue).

Everything hostile is built for real: files, symlinks, FIFOs and tars in tmp dirs, a listening socket for the
network case, tiny PNGs whose headers claim extreme sizes.
"""

from __future__ import annotations

import io
import json
import os
import select
import socket
import tarfile
import threading
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import pytest
import transformers
from PIL import Image

from layerfuse.core.errors import ConfigError
from layerfuse.pipeline.data.images import DEFAULT_MAX_PIXELS, decode_image
from layerfuse.pipeline.data.records import SampleError, SampleRecord
from layerfuse.pipeline.data.access import DEFAULT_MAX_IMAGE_BYTES, ImageAccess, load_image, parse_url_schemes, read_image_bytes
from layerfuse.pipeline.data.sources import MAX_ID_CHARS, plan_llava, plan_webdataset
from layerfuse.pipeline.models.encoder import ImagePreprocessor

CONV = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]
TEXT_CONV = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


def png_bytes(size=(8, 6), color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def thin_png(width: int, height: int = 1) -> bytes:
    """A real, fully decodable greyscale PNG of width x height: a few hundred bytes even for 300000x1."""
    buf = io.BytesIO()
    Image.new("L", (width, height), 0).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def write_json(path: Path, obj: Any) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return str(path)


def llava_record(rid: str, path: str, ref: str = "") -> SampleRecord:
    """A llava record as a cache could hold it (e.g. planned by older code): the worker's checks alone must hold."""
    return SampleRecord(rid, "llava", {"path": path}, CONV, True, image_ref=ref or path)


def reason_of(fn: Callable[[], Any]) -> str:
    with pytest.raises(SampleError) as e:
        fn()
    return e.value.reason


def by_id(plan) -> tuple[dict[str, SampleRecord], dict[str, list[str]]]:
    issues: dict[str, list[str]] = {}
    for i in plan.issues:
        issues.setdefault(i.id, []).append(f"{i.stage}: {i.reason}")
    return {r.id: r for r in plan.records}, issues


def finishes_within(seconds: float, fn: Callable[[], Any], unblock: Callable[[], None] = lambda: None) -> Any:
    """Run `fn` in a thread; fail the test if it has not returned after `seconds` (our own guard: a hang must fail
    this test, not wait for pytest-timeout). `unblock` is called on failure to release the stuck thread."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the test below
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        unblock()
        thread.join(5)
        pytest.fail(f"still running after {seconds} s (a blocking open or an unbounded read)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def release_fifo(path: Path) -> Callable[[], None]:
    """Open the FIFO for writing and close it: a reader blocked on it sees end-of-file."""
    def unblock() -> None:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    return unblock


@contextmanager
def listener() -> Iterator[tuple[int, Callable[[], bool]]]:
    """A TCP socket listening on 127.0.0.1: (port, whether anybody connected)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    try:
        yield server.getsockname()[1], lambda: bool(select.select([server], [], [], 0.3)[0])
    finally:
        server.close()


@pytest.fixture
def tree(tmp_path) -> dict[str, Path]:
    """An image root with one good image, and outside it a valid image and a secret text file."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "good.png").write_bytes(png_bytes())
    (outside / "leak.png").write_bytes(png_bytes(color=(0, 255, 0)))
    (outside / "passwd").write_bytes(SECRET)
    return {"root": root, "outside": outside, "tmp": tmp_path}


# ----------------------------------------------------------------------------- 1. the image root


def test_plan_refuses_image_paths_that_climb_out_of_the_root(tree):
    root, outside = tree["root"], tree["outside"]
    recs = [
        {"id": "good", "image": "sub/good.png", "conversations": CONV},
        {"id": "inside-dots", "image": "sub/../sub/good.png", "conversations": CONV},
        {"id": "dots", "image": "../outside/leak.png", "conversations": CONV},
        {"id": "deep", "image": "../../../../../../etc/passwd", "conversations": CONV},
        {"id": "absolute", "image": str(outside / "leak.png"), "conversations": CONV},
        {"id": "absolute-inside", "image": str(root / "sub" / "good.png"), "conversations": CONV},
    ]
    plan = plan_llava(write_json(tree["tmp"] / "d.json", recs), str(root))
    records, issues = by_id(plan)
    assert sorted(records) == ["absolute-inside", "good", "inside-dots"]
    assert records["inside-dots"].locator == {"path": str(root / "sub" / "good.png")}
    for rid in ("dots", "deep", "absolute"):
        assert len(issues[rid]) == 1 and issues[rid][0].startswith("plan: image path ")
        assert "outside the image root" in issues[rid][0]


def test_worker_refuses_paths_and_symlinks_that_resolve_outside_the_root(tree):
    root, outside = tree["root"], tree["outside"]
    os.symlink(outside / "passwd", root / "sub" / "passwd.png")  # a symlink leading out
    os.symlink(outside, root / "linked-dir")  # a directory symlink leading out
    os.symlink(root / "sub" / "good.png", root / "alias.png")  # a symlink that stays inside
    os.symlink("/dev/zero", root / "zero.png")
    access = ImageAccess(image_root=str(root))

    plan = plan_llava(write_json(tree["tmp"] / "d.json", [
        {"id": "sym", "image": "sub/passwd.png", "conversations": CONV},
        {"id": "symdir", "image": "linked-dir/leak.png", "conversations": CONV},
        {"id": "alias", "image": "alias.png", "conversations": CONV},
        {"id": "zero", "image": "zero.png", "conversations": CONV},
    ]), str(root))
    records, issues = by_id(plan)
    assert issues == {}  # planning does not look at the file system: the worker does
    for rid in ("sym", "symdir", "zero"):
        reason = reason_of(lambda: load_image(records[rid], max_pixels=10**6, access=access))
        assert "outside the image root" in reason, reason
        assert "root:x" not in reason
    assert load_image(records["alias"], max_pixels=10**6, access=access).size == (8, 6)

    # records that escape lexically (as a cache planned by older code holds them) are refused where they are opened
    for path in (str(root / ".." / "outside" / "leak.png"), str(outside / "leak.png"), "/etc/passwd"):
        reason = reason_of(lambda: read_image_bytes(llava_record("old", path), access))
        assert "outside the image root" in reason, reason
    # a llava record is only ever read against an image root
    with pytest.raises(ValueError, match="image_root"):
        read_image_bytes(records["alias"])


def test_file_urls_are_not_a_way_around_the_root(tree):
    access = ImageAccess(image_root=str(tree["root"]))
    for url in (f"file://{tree['outside'] / 'leak.png'}", f"local://{tree['outside'] / 'passwd'}",
                f"simplecache::file://{tree['outside'] / 'leak.png'}"):
        plan = plan_llava(write_json(tree["tmp"] / "d.json", [{"id": "u", "image": url, "conversations": CONV}]),
                          str(tree["root"]))
        reason = reason_of(lambda: load_image(plan.records[0], max_pixels=10**6, access=access))
        assert "--allow-urls" in reason and "root:x" not in reason
    with pytest.raises(ConfigError, match="file"):
        parse_url_schemes("s3,file")
    # a file:// image root is a local root: its checks (symlinks) apply
    os.symlink(tree["outside"] / "leak.png", tree["root"] / "out.png")
    plan = plan_llava(write_json(tree["tmp"] / "d.json", [{"id": "u", "image": "out.png", "conversations": CONV}]),
                      f"file://{tree['root']}")
    reason = reason_of(lambda: load_image(plan.records[0], max_pixels=10**6,
                                          access=ImageAccess(image_root=f"file://{tree['root']}")))
    assert "outside the image root" in reason


# ---------------------------------------------------------------------------------------- 2. URLs


def test_url_images_are_refused_without_allow_urls_and_open_no_connection(tree):
    with listener() as (port, connected):
        url = f"ftp://127.0.0.1:{port}/pub/cat.png"
        plan = plan_llava(write_json(tree["tmp"] / "d.json", [{"id": "ftp", "image": url, "conversations": CONV}]),
                          str(tree["root"]))
        assert plan.issues == [] and plan.records[0].locator == {"path": url}
        reason = reason_of(lambda: load_image(plan.records[0], max_pixels=10**6,
                                              access=ImageAccess(image_root=str(tree["root"]), allow_urls=frozenset({"s3"}))))
        assert "'ftp'" in reason and "--allow-urls" in reason, reason
        assert not connected(), "refusing a URL image must not open a connection"


def test_parse_url_schemes():
    assert parse_url_schemes(None) == frozenset() and parse_url_schemes("") == frozenset()
    assert parse_url_schemes(" s3, GS,https ,") == frozenset({"s3", "gs", "https"})
    for bad in ("s3,http://x", "s 3", "local", "FILE"):
        with pytest.raises(ConfigError, match="--allow-urls"):
            parse_url_schemes(bad)


def test_allowed_url_images_are_read_up_to_the_size_cap():
    base = f"memory://contain-{uuid.uuid4().hex}"
    with fsspec.open(f"{base}/small.png", "wb") as f:
        f.write(png_bytes())
    with fsspec.open(f"{base}/big.png", "wb") as f:
        f.write(png_bytes((200, 200)) + b"\0" * 5000)
    try:
        access = ImageAccess(image_root="/nonexistent", allow_urls=frozenset({"memory"}), max_bytes=2000)
        assert read_image_bytes(llava_record("s", f"{base}/small.png"), access) == png_bytes()
        reason = reason_of(lambda: read_image_bytes(llava_record("b", f"{base}/big.png"), access))
        assert "2000" in reason and "--max-image-bytes" in reason
        # chained URLs need every scheme in the chain allowed
        reason = reason_of(lambda: read_image_bytes(llava_record("c", f"simplecache::{base}/small.png"), access))
        assert "'simplecache'" in reason
    finally:
        fsspec.filesystem("memory").rm(base.replace("memory://", "/"), recursive=True)


def test_a_url_image_root_is_allowed_but_not_climbed_out_of():
    base = f"memory://contain-{uuid.uuid4().hex}"
    with fsspec.open(f"{base}/images/sub/b.png", "wb") as f:
        f.write(png_bytes(color=(0, 0, 255)))
    with fsspec.open(f"{base}/secret.png", "wb") as f:
        f.write(png_bytes())
    with fsspec.open(f"{base}/d.json", "w") as f:
        json.dump([{"id": "ok", "image": "sub/../sub/b.png", "conversations": CONV},
                   {"id": "abs", "image": "/sub/b.png", "conversations": CONV},
                   {"id": "up", "image": "../secret.png", "conversations": CONV},
                   {"id": "up2", "image": "sub/../../secret.png", "conversations": CONV}], f)
    try:
        root = f"{base}/images"
        plan = plan_llava(f"{base}/d.json", root)
        records, issues = by_id(plan)
        assert sorted(records) == ["abs", "ok"] and sorted(issues) == ["up", "up2"]
        assert records["ok"].locator == {"path": f"{root}/sub/b.png"}
        assert all("outside the image root" in i[0] for i in issues.values())
        access = ImageAccess(image_root=root)  # no --allow-urls: the root is the user's own choice
        assert load_image(records["ok"], max_pixels=10**6, access=access).getpixel((0, 0)) == (0, 0, 255)
        # a cached record that climbs out of the URL root is refused where it is read
        reason = reason_of(lambda: read_image_bytes(llava_record("old", f"{root}/../secret.png"), access))
        assert "outside the image root" in reason
    finally:
        fsspec.filesystem("memory").rm(base.replace("memory://", "/"), recursive=True)


# ------------------------------------------------------------------------ 3. regular files, size cap


def test_a_fifo_in_the_image_root_does_not_block(tree):
    fifo = tree["root"] / "pipe.png"
    os.mkfifo(fifo)
    rec = llava_record("fifo", str(fifo))
    reason = finishes_within(10, lambda: reason_of(lambda: load_image(rec, max_pixels=10**6,
                                                                       access=ImageAccess(image_root=str(tree["root"])))),
                             unblock=release_fifo(fifo))
    assert reason == f"not a regular file: a FIFO ({fifo})"


def test_only_regular_files_are_opened(tree):
    assert reason_of(lambda: read_image_bytes(llava_record("dir", str(tree["root"] / "sub")),
                                              ImageAccess(image_root=str(tree["root"])))
                     ) == f"not a regular file: a directory ({tree['root'] / 'sub'})"
    # /dev as the image root (the user's choice): a device inside it is still refused, without reading it
    reason = finishes_within(10, lambda: reason_of(lambda: read_image_bytes(llava_record("zero", "/dev/zero"),
                                                                            ImageAccess(image_root="/dev"))))
    assert reason == "not a regular file: a character device (/dev/zero)"


def test_image_files_over_the_byte_cap_are_refused(tree):
    big = tree["root"] / "big.png"
    big.write_bytes(png_bytes((64, 64)) + SECRET * 200)
    size = big.stat().st_size
    access = ImageAccess(image_root=str(tree["root"]), max_bytes=1000)
    reason = reason_of(lambda: read_image_bytes(llava_record("big", str(big)), access))
    assert reason == f"image file is {size} bytes, over the limit of 1000 (--max-image-bytes): {big}"
    assert read_image_bytes(llava_record("big", str(big)), ImageAccess(image_root=str(tree["root"]), max_bytes=size))
    assert DEFAULT_MAX_IMAGE_BYTES == 64 * 1024 * 1024


def test_files_that_report_a_wrong_size_are_read_only_up_to_the_cap():
    # procfs reports 0 bytes for /proc/self/status: the cap bounds the read itself, and no content is quoted
    path = "/proc/self/status"
    if not os.path.isfile(path):
        pytest.skip("no procfs here")
    reason = reason_of(lambda: read_image_bytes(llava_record("proc", path), ImageAccess(image_root="/proc", max_bytes=16)))
    assert reason == f"image file has more than 16 bytes (it reports 0), over the limit of 16 (--max-image-bytes): {path}"


def test_webdataset_image_members_over_the_byte_cap(tmp_path):
    small, big = png_bytes(), png_bytes((64, 64)) + b"\0" * 4000
    shard = make_tar(tmp_path / "s.tar", [("a.png", small), ("a.txt", b"cap a"), ("b.png", big), ("b.txt", b"cap b")])
    plan = plan_webdataset(shard, max_image_bytes=len(small) + 10)
    records, issues = by_id(plan)
    assert sorted(records) == ["s.tar/a"]
    assert issues == {"s.tar/b": [f"plan: image member b.png is {len(big)} bytes, over the limit of "
                                  f"{len(small) + 10} (--max-image-bytes)"]}
    # the worker checks again (records of a cache planned with a larger cap)
    rec = plan_webdataset(shard).records[1]
    reason = reason_of(lambda: read_image_bytes(rec, ImageAccess(max_bytes=100)))
    assert "over the limit of 100 (--max-image-bytes)" in reason
    # caption members are capped like .json records are, not read whole
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        ti = tarfile.TarInfo("c.png")
        ti.size = len(small)
        tar.addfile(ti, io.BytesIO(small))
        ti = tarfile.TarInfo("c.txt")
        ti.size = 17 * 1024 * 1024
        tar.addfile(ti, io.BytesIO(b"x" * ti.size))
    records, issues = by_id(plan_webdataset(str(tmp_path / "c.tar")))
    assert records == {} and "c.txt is 17825792 bytes" in issues["c.tar/c"][0]


# ------------------------------------------------------------------- 4. the working size of an image


def clip_like(shortest_edge: int = 96, pad: bool = False) -> ImagePreprocessor:
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": shortest_edge},
                                           crop_size={"height": shortest_edge, "width": shortest_edge})
    return ImagePreprocessor(proc, pad_to_square=pad)


def test_working_pixels_of_the_preprocessing():
    assert clip_like().working_pixels(640, 480) == 640 * 480  # a shrink: the decoded image is the largest
    assert clip_like(336).working_pixels(200, 100) == 672 * 336  # an enlargement
    assert clip_like().working_pixels(20000, 1) == 96 * 1_920_000  # the shortest edge to 96: a 96 x 1.92M image
    assert clip_like(pad=True).working_pixels(20000, 1) == 20000 * 20000  # the padded square
    assert clip_like(pad=True).working_pixels(30, 40) == 96 * 96
    siglip = ImagePreprocessor(transformers.SiglipImageProcessor(size={"height": 384, "width": 384}), pad_to_square=False)
    assert siglip.working_pixels(100, 100) == 384 * 384  # a fixed output size, whatever the input
    assert siglip.working_pixels(300000, 1) == 300000


@pytest.mark.parametrize("width, pad", [(20000, True), (20000, False), (300000, False), (300000, True)])
def test_thin_bombs_are_refused_from_the_header_before_any_allocation(width, pad):
    data = thin_png(width)
    assert len(data) < 1200
    pre = clip_like(pad=pad)
    need = pre.working_pixels(width, 1)
    assert width <= DEFAULT_MAX_PIXELS < need
    tracemalloc.start()
    try:
        reason = reason_of(lambda: decode_image(data, max_pixels=DEFAULT_MAX_PIXELS, working_pixels=pre.working_pixels))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reason == (f"image {width}x1 needs {need} pixels while preprocessed (pad to square, resize) > limit "
                      f"{DEFAULT_MAX_PIXELS} (decompression-bomb guard; raise --max-pixels)")
    assert peak < 4 << 20, f"{peak} bytes allocated before refusing"


def test_working_size_guard_lets_ordinary_images_through():
    pre = clip_like(pad=True)
    img = decode_image(png_bytes((120, 90)), max_pixels=120 * 120, working_pixels=pre.working_pixels)
    assert img.size == (120, 90) and pre(img).shape == (3, 96, 96)
    assert "needs 14400 pixels" in reason_of(
        lambda: decode_image(png_bytes((120, 90)), max_pixels=120 * 119, working_pixels=pre.working_pixels))


def test_load_image_hands_the_working_size_guard_to_the_decoder(tree):
    (tree["root"] / "thin.png").write_bytes(thin_png(20000))
    rec = llava_record("thin", str(tree["root"] / "thin.png"))
    access = ImageAccess(image_root=str(tree["root"]))
    assert load_image(rec, max_pixels=DEFAULT_MAX_PIXELS, access=access).size == (20000, 1)  # w*h alone is fine
    reason = reason_of(lambda: load_image(rec, max_pixels=DEFAULT_MAX_PIXELS, access=access,
                                          working_pixels=clip_like(pad=True).working_pixels))
    assert reason.startswith("image 20000x1 needs 400000000 pixels while preprocessed")


def test_not_an_image_message_quotes_no_bytes(tree):
    access = ImageAccess(image_root=str(tree["root"]))
    (tree["root"] / "passwd.png").write_bytes(SECRET)
    reason = reason_of(lambda: load_image(llava_record("p", str(tree["root"] / "passwd.png")), max_pixels=10**6,
                                          access=access))
    assert reason == f"not an image or unsupported format: {len(SECRET)} bytes"


# --------------------------------------------------------------------------- 5. deep JSON, huge ids


def test_deeply_nested_json_file_is_one_clean_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000)
    reason = reason_of(lambda: plan_llava(str(p), str(tmp_path)))
    assert reason == f"{p}: JSON nested too deeply"


def test_deep_or_huge_values_in_jsonl_lines_are_per_record_issues(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"id": "a", "conversations": TEXT_CONV}),
        "[" * 100_000,
        '{"id": ' + "9" * 5000 + ', "conversations": ' + json.dumps(TEXT_CONV) + "}",
        json.dumps({"id": "x" * (MAX_ID_CHARS + 1), "conversations": TEXT_CONV}),
        json.dumps({"id": "y" * MAX_ID_CHARS, "conversations": TEXT_CONV}),
        '{"id": "n", "conversations": ' + json.dumps(TEXT_CONV) + ', "extra": ' + "7" * 5000 + "}",
        json.dumps({"id": 12345678901234567890, "conversations": TEXT_CONV}),
    ]
    p.write_text("\n".join(lines) + "\n")
    plan = plan_llava(str(p), str(tmp_path))
    records, issues = by_id(plan)
    assert sorted(records) == ["12345678901234567890", "a", "n", "y" * MAX_ID_CHARS]
    assert issues == {
        "record[1]": ["plan: invalid JSON on line 2: nested too deeply"],
        "record[2]": [f"plan: 'id' is an integer of 5000 digits (more than {MAX_ID_CHARS} characters)"],
        "record[3]": [f"plan: 'id' is a string of {MAX_ID_CHARS + 1} characters (more than {MAX_ID_CHARS})"],
    }


def test_a_huge_integer_in_a_json_list_costs_only_its_record(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"id": ' + "1" * 5000 + ', "conversations": ' + json.dumps(TEXT_CONV) + "}, "
                 + json.dumps({"id": "ok", "conversations": TEXT_CONV}) + "]")
    records, issues = by_id(plan_llava(str(p), str(tmp_path)))
    assert list(records) == ["ok"] and list(issues) == ["record[0]"]


def test_webdataset_json_members_deep_or_huge(tmp_path):
    good = png_bytes()
    shard = make_tar(tmp_path / "s.tar", [
        ("deep.png", good), ("deep.json", b"[" * 100_000),
        ("int.png", good), ("int.json", b'{"id": ' + b"5" * 5000 + b', "conversations": ' + json.dumps(CONV).encode() + b"}"),
        ("long.png", good), ("long.json", json.dumps({"id": "z" * 600, "conversations": CONV}).encode()),
        ("ok.png", good), ("ok.json", json.dumps({"id": "fine", "conversations": CONV}).encode()),
    ])
    records, issues = by_id(plan_webdataset(shard))
    assert list(records) == ["fine"]
    assert issues == {
        "s.tar/deep": ["plan: invalid JSON in deep.json: nested too deeply"],
        "s.tar/int": [f"plan: 'id' is an integer of 5000 digits (more than {MAX_ID_CHARS} characters)"],
        "s.tar/long": [f"plan: 'id' is a string of 600 characters (more than {MAX_ID_CHARS})"],
    }


# ------------------------------------------------------------------------------- 6. unsafe tar names


def test_unsafe_tar_member_names_are_skipped_and_recorded(tmp_path):
    good = png_bytes()
    shard = make_tar(tmp_path / "s.tar", [
        ("../up.png", good), ("../up.txt", b"a caption"),
        ("/abs/x.png", good), ("/abs/x.txt", b"a caption"),
        ("a/../b.png", good), ("a/../b.txt", b"a caption"),
        ("ctl\x1b[2J.png", good),
        ("ok.png", good), ("ok.txt", b"a caption"),
    ])
    plan = plan_webdataset(shard)
    assert [r.id for r in plan.records] == ["s.tar/ok"]
    unsafe = {i.where.split("#", 1)[1]: i.reason for i in plan.issues}
    assert set(unsafe) == {"../up.png", "../up.txt", "/abs/x.png", "/abs/x.txt", "a/../b.png", "a/../b.txt",
                           "ctl\x1b[2J.png"}
    assert unsafe["../up.png"] == "unsafe member name '../up.png' (a '..' component); skipped"
    assert unsafe["/abs/x.txt"] == "unsafe member name '/abs/x.txt' (an absolute path); skipped"
    assert unsafe["ctl\x1b[2J.png"] == "unsafe member name 'ctl\\x1b[2J.png' (control characters); skipped"
    assert all(i.stage == "plan" for i in plan.issues)
