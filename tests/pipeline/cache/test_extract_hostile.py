"""Phase one on hostile sources (issue 14), end to end through `run_extract` with a real DataLoader worker: every
escape, URL, special file, oversized file, bomb, deep JSON, huge id and unsafe tar name is a recorded bad sample (or
one clean line under --strict); nothing outside the image root reaches the cache, no connection is opened, nothing
hangs, no file contents land in the records."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from layerfuse.pipeline.cache.extract import ExtractError, run_extract
from layerfuse.pipeline.cache.reader import FeatureCache
from layerfuse.pipeline.cli import main

from tests.pipeline.data.test_containment import SECRET, finishes_within, listener, release_fifo, thin_png
from tests.support import extract_config

CONV = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
TEXT_CONV = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]


def png(size=(40, 30), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def issue_reasons(cache: FeatureCache) -> dict[str, tuple[str, str]]:
    return {i["id"]: (i["stage"], i["reason"]) for i in cache.issues()}


def test_hostile_llava_source_is_contained(tmp_path, vision_dir):
    root, outside = tmp_path / "images", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "good.png").write_bytes(png())
    (outside / "leak.png").write_bytes(png(color=(0, 200, 0)))
    (outside / "passwd").write_bytes(SECRET)
    os.symlink(outside / "passwd", root / "passwd.png")
    os.symlink(outside / "leak.png", root / "leak.png")
    os.mkfifo(root / "pipe.png")
    (root / "big.png").write_bytes(noise_png(120))  # a valid image over --max-image-bytes
    (root / "thin.png").write_bytes(thin_png(20000))  # 20000 pixels; padded to square: 400 million
    (root / "text.png").write_bytes(SECRET)
    mem = f"memory://hostile-{uuid.uuid4().hex}"
    with fsspec.open(f"{mem}/remote.png", "wb") as f:
        f.write(png(color=(0, 0, 200)))

    with listener() as (port, connected):
        images = {
            "good": "good.png", "dots": "../outside/leak.png", "absolute": str(outside / "leak.png"), "dev": "/dev/zero",
            "symlink-text": "passwd.png", "symlink-image": "leak.png", "file-url": f"file://{outside / 'leak.png'}",
            "ftp": f"ftp://127.0.0.1:{port}/x.png", "remote": f"{mem}/remote.png", "fifo": "pipe.png", "big": "big.png",
            "thin": "thin.png", "text": "text.png",
        }
        js = tmp_path / "data.json"
        js.write_text(json.dumps([{"id": k, "image": v, "conversations": CONV} for k, v in images.items()]))
        out = tmp_path / "cache"
        cfg = extract_config(str(out), vision_dir, builtin=None, llava=str(js), image_root=str(root), pad_to_square=True,
                             max_image_bytes=20_000, allow_urls="memory", shard_samples=4)
        res = finishes_within(300, lambda: run_extract(cfg), unblock=release_fifo(root / "pipe.png"))
        assert not connected(), "an ftp:// image opened a connection"

    assert res.summary == {"ok": 2, "text_only": 0, "skipped": 8, "refused": 0, "plan_skipped": 3, "notes": 0}
    cache = FeatureCache(out)
    assert cache.ids == ["good", "remote"]
    reasons = issue_reasons(cache)
    expected = {
        "dots": ("plan", "leads outside the image root"),
        "absolute": ("plan", "leads outside the image root"),
        "dev": ("plan", "leads outside the image root"),
        "symlink-text": ("image", "resolves outside the image root"),
        "symlink-image": ("image", "resolves outside the image root"),
        "file-url": ("image", "--allow-urls cannot allow 'file'"),
        "ftp": ("image", "refused unless allowed with --allow-urls ftp"),
        "fifo": ("image", "not a regular file: a FIFO"),
        "big": ("image", "over the limit of 20000 (--max-image-bytes)"),
        "thin": ("image", "image 20000x1 needs 400000000 pixels while preprocessed"),
        "text": ("image", f"not an image or unsupported format: {len(SECRET)} bytes"),
    }
    assert set(reasons) == set(expected)
    for rid, (stage, part) in expected.items():
        assert reasons[rid][0] == stage and part in reasons[rid][1], (rid, reasons[rid])
    leaked = [r for _, r in reasons.values() if "root:" in r or "/bin/bash" in r]
    assert not leaked, leaked
    fsspec.filesystem("memory").rm(mem.replace("memory://", "/"), recursive=True)


def test_hostile_webdataset_shard_is_contained(tmp_path, vision_dir):
    good = png()
    members = [
        ("ok.png", good), ("ok.txt", b"a red image"),
        ("../up.png", good), ("../up.txt", b"escape"),
        ("/abs.png", good), ("/abs.txt", b"absolute"),
        ("big.png", noise_png(120)), ("big.txt", b"too many bytes"),
        ("deep.png", good), ("deep.json", b"[" * 100_000),
        ("id.png", good), ("id.json", b'{"id": ' + b"4" * 5000 + b', "conversations": ' + json.dumps(CONV).encode() + b"}"),
        ("thin.png", thin_png(300000)), ("thin.txt", b"a thin line"),
    ]
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    out = tmp_path / "cache"
    res = run_extract(extract_config(str(out), vision_dir, builtin=None, wds=str(shard), max_image_bytes=20_000, shard_samples=4))
    assert res.summary == {"ok": 1, "text_only": 0, "skipped": 1, "refused": 0, "plan_skipped": 7, "notes": 0}
    reasons = issue_reasons(FeatureCache(out))
    assert reasons["s.tar/../up.png"] == ("plan", "unsafe member name '../up.png' (a '..' component); skipped")
    assert reasons["s.tar//abs.txt"] == ("plan", "unsafe member name '/abs.txt' (an absolute path); skipped")
    assert reasons["s.tar/big"][1].startswith("image member big.png is") and "--max-image-bytes" in reasons["s.tar/big"][1]
    assert reasons["s.tar/deep"] == ("plan", "invalid JSON in deep.json: nested too deeply")
    assert reasons["s.tar/id"] == ("plan", "'id' is an integer of 5000 digits (more than 512 characters)")
    assert reasons["s.tar/thin"][0] == "image" and "image 300000x1 needs" in reasons["s.tar/thin"][1]


@pytest.mark.parametrize("records, part", [
    ([{"id": "a", "image": "good.png", "conversations": TEXT_CONV}],
     r"--strict: sample a .*no <image> token; added one .*\[llava, repaired: --strict refuses repairs\]"),
    ([{"id": "a", "conversations": TEXT_CONV}, {"id": "a", "conversations": TEXT_CONV}],
     r"--strict: sample a#2.*duplicate id 'a'; renamed to 'a#2'"),
    ([{"conversations": TEXT_CONV}], r"--strict: sample record\[0\] .*no usable 'id'"),
    ([{"id": "a", "image": "../x.png", "conversations": CONV}, {"conversations": TEXT_CONV}],
     r"--strict: sample a .*leads outside the image root"),  # a malformed record is named before a repair
])
def test_strict_stops_at_repairs_too(tmp_path, vision_dir, records, part):
    (tmp_path / "good.png").write_bytes(png())
    js = tmp_path / "data.json"
    js.write_text(json.dumps(records))
    with pytest.raises(ExtractError, match=part):
        run_extract(extract_config(str(tmp_path / "c"), vision_dir, builtin=None, llava=str(js), strict=True))


def test_cli_bad_input_is_one_clean_line(tmp_path, vision_dir):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    r = CliRunner().invoke(main, ["extract", "--llava", str(deep), "--vision", str(vision_dir), "--out", str(tmp_path / "c"),
                                  "--quiet", "--workers", "0"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == f"layerfuse extract: {deep}: JSON nested too deeply"
    r = CliRunner().invoke(main, ["extract", "--llava", str(deep), "--vision", str(vision_dir), "--out", str(tmp_path / "c"),
                                  "--allow-urls", "s3,file"])
    assert r.exit_code == 1 and "--allow-urls: 'file' reads local files" in r.output
    r = CliRunner().invoke(main, ["extract", "--help"])
    assert "--allow-urls SCHEMES" in r.output and "--max-image-bytes" in r.output


def test_cache_info_lists_every_skipped_sample(tmp_path, vision_dir):
    """Plain `layerfuse cache info` names every skipped sample with its reason (it used to stop at 20)."""
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "ok.png").write_bytes(png())
    records = [{"id": "ok", "image": "ok.png", "conversations": CONV}]
    records += [{"id": f"gone{i:02d}", "image": f"gone{i:02d}.png", "conversations": CONV} for i in range(25)]
    js = tmp_path / "data.json"
    js.write_text(json.dumps(records))
    out = tmp_path / "cache"
    run_extract(extract_config(str(out), vision_dir, builtin=None, llava=str(js), image_root=str(root)))
    r = CliRunner().invoke(main, ["cache", "info", str(out)])
    assert r.exit_code == 0, r.output
    listed = [line for line in r.stdout.splitlines() if line.startswith("  - gone")]
    assert len(listed) == 25 and all("image not found" in line for line in listed)
    assert "more (--json lists all)" not in r.stdout
