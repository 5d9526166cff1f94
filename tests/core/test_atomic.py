"""core/atomic.py: a write is the old file or the whole new one; folders are published whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from layerfuse.core import atomic


def test_temp_name_is_hidden_next_to_the_target_and_names_its_owner(tmp_path):
    target = tmp_path / "sub" / "a.json"
    assert atomic.temp_path(target) == tmp_path / "sub" / f".a.json.tmp-{os.getpid()}"
    assert atomic.temp_path(target, owner="run") == tmp_path / "sub" / ".a.json.tmp-run"
    assert atomic.temp_path(str(target), owner=7).name == ".a.json.tmp-7"


def test_write_bytes_text_json_replace_and_leave_nothing_behind(tmp_path):
    path = tmp_path / "new" / "f.json"  # the missing folder is created
    atomic.write_bytes(path, b"one")
    assert path.read_bytes() == b"one"
    atomic.write_text(path, "twö")
    assert path.read_bytes() == "twö".encode("utf-8")
    atomic.write_json(path, {"b": [1, 2]}, indent=1)
    assert path.read_text() == json.dumps({"b": [1, 2]}, indent=1)
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]


def test_an_error_before_the_rename_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic.replacing(path) as tmp:
            tmp.write_bytes(b"half of the ne")
            raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_a_failing_rename_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")

    def refuse(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="disk gone"):
        atomic.write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


@pytest.mark.slow
def test_a_process_killed_mid_write_leaves_the_old_file_and_only_its_own_hidden_temp(tmp_path):
    path = tmp_path / "marker.json"
    path.write_text('{"old": true}')
    child = textwrap.dedent(f"""
        import os
        from layerfuse.core import atomic
        with atomic.replacing({str(path)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b'{{"new": tr')
                f.flush()
                os._exit(9)  # killed: no exception handling, no rename
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert json.loads(path.read_text()) == {"old": True}
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".marker.json.tmp-"), leftovers


def test_publish_dir_renames_the_staging_folder_into_place(tmp_path):
    target = tmp_path / "model"
    staging = atomic.fresh_temp_dir(target)
    assert staging == atomic.temp_path(target) and staging.is_dir() and not any(staging.iterdir())
    (staging / "weights.bin").write_bytes(b"w")
    (staging / "sub").mkdir()
    (staging / "sub" / "cfg.json").write_text("{}")
    atomic.publish_dir(staging, target)
    assert (target / "weights.bin").read_bytes() == b"w" and (target / "sub" / "cfg.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_fresh_temp_dir_clears_a_leftover_of_a_killed_build(tmp_path):
    target = tmp_path / "checkpoint"
    leftover = atomic.temp_path(target, owner="run")
    leftover.mkdir()
    (leftover / "torn.bin").write_bytes(b"x")
    staging = atomic.fresh_temp_dir(target, owner="run")
    assert staging == leftover and not any(staging.iterdir())


def test_publish_dir_without_replace_refuses_an_existing_folder(tmp_path):
    target = tmp_path / "llm"
    target.mkdir()
    (target / "theirs.txt").write_text("theirs")
    staging = atomic.fresh_temp_dir(target)
    (staging / "ours.txt").write_text("ours")
    with pytest.raises(OSError):
        atomic.publish_dir(staging, target)
    assert (target / "theirs.txt").read_text() == "theirs" and (staging / "ours.txt").exists()


@pytest.mark.parametrize("previous", [None, "checkpoint.old"])
def test_publish_dir_with_replace_swaps_the_folder_and_drops_the_previous_one(tmp_path, previous):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "step").write_text("1")
    staging = atomic.fresh_temp_dir(target, owner="run")
    (staging / "step").write_text("2")
    atomic.publish_dir(staging, target, replace=True, previous=tmp_path / previous if previous else None)
    assert (target / "step").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_swap_killed_after_moving_the_old_folder_aside_leaves_it_whole(tmp_path, monkeypatch):
    """The moment between the two renames: the previous folder sits complete under the name the caller gave."""
    target, previous = tmp_path / "checkpoint", tmp_path / "checkpoint.old"
    target.mkdir()
    (target / "step").write_text("1")
    staging = atomic.fresh_temp_dir(target, owner="run")
    (staging / "step").write_text("2")
    real_rename = type(staging).rename

    def killed_at_second_rename(self, dst):
        if self == staging:
            raise KeyboardInterrupt  # stands for the kill
        return real_rename(self, dst)

    monkeypatch.setattr(type(staging), "rename", killed_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic.publish_dir(staging, target, replace=True, previous=previous)
    assert not target.exists() and (previous / "step").read_text() == "1"


def test_read_json_is_the_reading_side_of_write_json(tmp_path):
    class Broken(Exception):
        pass

    path = tmp_path / "rec.json"
    missing = Broken("no record")
    with pytest.raises(Broken, match="no record"):
        atomic.read_json(path, missing=missing, error=Broken)
    atomic.write_json(path, {"a": [1, 2]})
    assert atomic.read_json(path, missing=missing, error=Broken) == {"a": [1, 2]}
    path.write_text('{"a": ')
    with pytest.raises(Broken, match=r"cannot read .*rec\.json"):
        atomic.read_json(path, missing=missing, error=Broken)
