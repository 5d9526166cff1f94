"""Atomic writes: a file or a folder is either the old one or the complete new one, never half of either.

Everything is written under a temporary name in the same folder (so the final rename stays on one filesystem),
flushed to disk, and renamed into place. The one temporary-name convention is `temp_path`:

    DIR/.NAME.tmp-OWNER     OWNER = the writing process's id, or a fixed word when several processes share it

A kill leaves at most such a hidden leftover next to the target, never a torn target. Leftovers of a process id
are unique to that process and harmless; a shared one (fixed OWNER) is cleared by the next `fresh_temp_dir`.
`read_json` is the reading side of `write_json`: a missing or unreadable record is one error naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


def temp_path(path: str | Path, owner: str | int | None = None) -> Path:
    """The temporary name for `path`: `.NAME.tmp-OWNER` in the same folder (OWNER: this process id by default)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid() if owner is None else owner}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to (by any writer: torch.save, safetensors, ...);
    on a normal exit it is flushed and renamed onto `path`, on an exception it is removed and `path` is untouched.
    Missing parent folders are created.

    >>> with replacing(run / "fuser.safetensors") as tmp:
    ...     save_file(state, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit(tmp: str | Path, path: str | Path) -> None:
    """Flush the finished file `tmp` (a `temp_path` of `path`, written by any means) and rename it onto `path`: what
    `replacing` does on a normal exit, for a writer that decides only at the end whether to keep what it wrote."""
    _fsync_file(Path(tmp))
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (missing parent folders are created)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any, **dumps: Any) -> None:
    """Replace `path` with `json.dumps(data, **dumps)` atomically."""
    write_text(path, json.dumps(data, **dumps))


def read_json(path: str | Path, *, missing: Exception, error: type[Exception]) -> Any:
    """The JSON record at `path`; `missing` is raised when there is no such file, `error(...)` naming the file and the
    parse problem when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise missing
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"cannot read {path}: {e}") from None


def fresh_temp_dir(target: str | Path, owner: str | int | None = None) -> Path:
    """An empty staging folder for `target` (`temp_path(target, owner)`; a leftover from a killed build is removed).
    Fill it, then `publish_dir` it."""
    staging = temp_path(target, owner)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_dir(staging: str | Path, target: str | Path, *, replace: bool = False, previous: str | Path | None = None) -> None:
    """Flush every file in `staging` and rename it to `target`.

    Without `replace` an existing non-empty `target` makes the rename fail (OSError) and `staging` is left for the
    caller. With `replace` an existing `target` is first renamed to `previous` (default `temp_path(target, "old")`),
    then removed once the new folder is in place: a kill during the swap leaves `previous` complete, so a reader
    that knows `previous` still finds one whole folder."""
    staging, target = Path(staging), Path(target)
    for f in sorted(p for p in staging.rglob("*") if p.is_file() and not p.is_symlink()):
        _fsync_file(f)
    old = None
    if replace and target.exists():
        old = Path(previous) if previous is not None else temp_path(target, "old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    staging.rename(target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
