"""Planning the inputs: a source (LLaVA JSON + image folder, WebDataset tar shards) -> `Plan` (records, issues).

Planning never decodes an image and never checks that an image file exists (that happens when a worker
loads the record, so planning stays fast on huge datasets). Every malformed input sample becomes a
`SampleIssue`; repairs become `SampleIssue(stage="note")` and the sample is kept.

WebDataset naming (see `split_member_name`): a member's *key* is its path up to the first "." of its
basename (directory prefix kept, a leading "./" dropped) and its *extension* the rest, lower-cased — the
WebDataset convention, so "a.b.c.jpg" has key "a" and extension "b.c.jpg". A sample's image is the member
whose extension is exactly one of IMAGE_EXTENSIONS (first in that order); only when there is none, a
member whose *last* suffix is an image extension is used, provided there is exactly one such member (more
than one is an issue: we cannot tell which is the image). The ".json" record and ".txt"/".caption"
caption are found the same way (exact extension first, then a unique last-suffix match).

Ids: duplicates within one plan are made unique by appending "#2", "#3", ... with a note issue, so that
no sample silently replaces another downstream. An id longer than MAX_ID_CHARS (a string, or an integer of
that many digits) is a plan issue; integers that long are never converted (Python refuses int(str) past 4300
digits), so one such value costs its record, not the file.

Containment rules for what a record may make a worker read: pipeline/data/access.py. Planning already refuses
LLaVA image paths that leave the image root on their face ("..", absolute paths elsewhere).
WebDataset member names that are absolute, have a ".." component, a backslash or control characters are
skipped and recorded, as are ".json" records and ".txt" captions above MAX_JSON_MEMBER_BYTES.
"""

from __future__ import annotations

import glob as globmod
import json
import os
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import fsspec
from braceexpand import braceexpand
from tqdm.auto import tqdm

from layerfuse.core.atomic import commit, temp_path
from layerfuse.core.errors import MissingError
from layerfuse.pipeline.data.access import DEFAULT_MAX_IMAGE_BYTES, is_remote, is_url, local_root
from layerfuse.pipeline.data.records import Plan, SampleError, SampleIssue, SampleRecord
from layerfuse.pipeline.data.stream import ShardTape, SpoolError, is_pipe, open_local, open_stream, spool_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_TOKEN",
    "MAX_ID_CHARS",
    "normalize_conversations",
    "plan_llava",
    "expand_shards",
    "pipe_shards",
    "split_member_name",
    "plan_webdataset",
]

IMAGE_TOKEN = "<image>"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
CAPTION_EXTENSIONS = ("txt", "caption")
MAX_JSON_MEMBER_BYTES = 16 * 1024 * 1024  # a ".json" record or ".txt" caption larger than this is an issue, not read
MAX_ID_CHARS = 512  # a longer sample id is a plan issue

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "model": "gpt"}
_ADDED_TOKEN_NOTE = "no <image> token; added one to the first human turn"


# --------------------------------------------------------------------------------------------- helpers


class _LongInteger:
    """Stands in for a JSON integer of more than MAX_ID_CHARS digits, which is never converted to an int."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(text: str) -> int | _LongInteger:
    digits = len(text.lstrip("-"))
    return int(text) if digits <= MAX_ID_CHARS else _LongInteger(digits)


def _loads(text: str | bytes) -> Any:
    """json.loads with over-long integers kept as `_LongInteger`. Raises json.JSONDecodeError for bad syntax,
    RecursionError for nesting deeper than Python's recursion limit, ValueError for other refusals."""
    return json.loads(text, parse_int=_parse_int)


def _kind(value: Any) -> str:
    if isinstance(value, _LongInteger):
        return "int"
    return "null" if value is None else type(value).__name__


def _short_repr(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except RecursionError:
        return "<deeply nested value>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _record_id(value: Any) -> str | None:
    """A usable id from a record's "id" value (str or int), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def _id_problem(value: Any) -> str | None:
    """Why a record's "id" value refuses the record (an over-long id), else None."""
    if isinstance(value, _LongInteger):
        return f"'id' is an integer of {value.digits} digits (more than {MAX_ID_CHARS} characters)"
    if isinstance(value, str) and len(value) > MAX_ID_CHARS:
        return f"'id' is a string of {len(value)} characters (more than {MAX_ID_CHARS})"
    return None


def _dedupe_ids(plan: Plan, source: str) -> None:
    """Make record ids unique within `plan` ("x", "x#2", ...), adding a note issue for each rename."""
    seen: set[str] = set(r.id for r in plan.records)
    if len(seen) == len(plan.records):
        return
    used: set[str] = set()
    out: list[SampleRecord] = []
    for rec in plan.records:
        if rec.id not in used:
            used.add(rec.id)
            out.append(rec)
            continue
        n = 2
        while f"{rec.id}#{n}" in used or f"{rec.id}#{n}" in seen:
            n += 1
        new_id = f"{rec.id}#{n}"
        used.add(new_id)
        plan.issues.append(
            SampleIssue(
                id=new_id, source=source, stage="note",
                reason=f"duplicate id {rec.id!r}; renamed to {new_id!r}",
                where=rec.image_ref,
            )
        )
        d = rec.to_json()
        d["id"] = new_id
        out.append(SampleRecord.from_json(d))
    plan.records = out


# ------------------------------------------------------------------------------------- conversations


def normalize_conversations(raw: Any, *, has_image: bool) -> tuple[list[dict[str, str]], str | None]:
    """Validate a LLaVA `conversations` value and return (clean turns, note or None).

    Each turn must be an object with "from" in {human, gpt} (also accepted, case-insensitively: user ->
    human; assistant, model -> gpt) and a string "value"; the first turn must be from human. Clean turns
    keep only {"from", "value"}.

    `<image>` handling: at most one token in the whole conversation, and only in a human turn. With an
    image but no token, "<image>\\n" is prepended to the first human turn and a note is returned. A token
    without an image is an error.

    Raises `SampleError` naming what is wrong (turns are numbered from 1).
    """
    if not isinstance(raw, list):
        raise SampleError(f"'conversations' is not a list (got {_kind(raw)})")
    if not raw:
        raise SampleError("'conversations' is empty")
    turns: list[dict[str, str]] = []
    for n, turn in enumerate(raw, start=1):
        if not isinstance(turn, dict):
            raise SampleError(f"turn {n} is not an object (got {_kind(turn)})")
        role = turn.get("from")
        if not isinstance(role, str):
            raise SampleError(f"turn {n} has no 'from' string")
        norm = _ROLES.get(role.strip().lower())
        if norm is None:
            raise SampleError(f"turn {n} has unknown role {role!r} (expected human or gpt)")
        value = turn.get("value")
        if not isinstance(value, str):
            raise SampleError(f"turn {n} has no 'value' string")
        turns.append({"from": norm, "value": value})
    if turns[0]["from"] != "human":
        raise SampleError(f"turn 1 is from {turns[0]['from']!r}; the first turn must be from human")

    count = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if count > 1:
        raise SampleError(f"conversation has {count} <image> tokens; at most one is supported")
    if count == 1:
        if not has_image:
            raise SampleError("conversation has <image> but the sample has no image")
        n = next(i for i, t in enumerate(turns, start=1) if IMAGE_TOKEN in t["value"])
        if turns[n - 1]["from"] != "human":
            raise SampleError(f"the <image> token is in turn {n}, a gpt turn; it must be in a human turn")
        return turns, None
    if has_image:
        turns[0] = {"from": "human", "value": IMAGE_TOKEN + "\n" + turns[0]["value"]}
        return turns, _ADDED_TOKEN_NOTE
    return turns, None


# --------------------------------------------------------------------------------------------- LLaVA


def _join_image_path(image_root: str, image: str) -> tuple[str, str | None]:
    """(where a record's image is, or the reason it is refused): a URL image as it is (the worker checks its
    scheme), else the image under the root, normalised; refused when it leaves the root lexically."""
    if is_url(image):
        return image, None
    root = local_root(image_root)
    if is_url(root):
        rel = posixpath.normpath(image.lstrip("/"))
        if rel == ".." or rel.startswith("../"):
            return "", f"image path {image!r} leads outside the image root {image_root}"
        return f"{root.rstrip('/')}/{rel}", None
    root = os.path.abspath(os.path.expanduser(root))
    path = os.path.abspath(os.path.join(root, image))
    if os.path.commonpath([root, path]) != root:
        return "", f"image path {image!r} leads outside the image root {image_root}"
    return path, None


def _load_llava_records(json_path: str) -> list[tuple[Any, str | None]]:
    """Read a LLaVA JSON list or JSON-lines file: [(record or None, parse error or None), ...].

    A whole-file problem (unreadable, not JSON, not a list) raises `SampleError`; in a .jsonl file each
    bad line is reported per record instead.
    """
    try:
        with fsspec.open(json_path, "rb", compression="infer") as f:
            raw = f.read()
    except FileNotFoundError:
        raise SampleError(f"{json_path}: file not found") from None
    except OSError as e:
        raise SampleError(f"{json_path}: cannot read: {e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SampleError(f"{json_path}: not UTF-8 text (byte {e.start})") from None

    name = json_path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        out: list[tuple[Any, str | None]] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((_loads(line), None))
            except json.JSONDecodeError as e:
                out.append((None, f"invalid JSON on line {lineno}, column {e.colno}: {e.msg}"))
            except RecursionError:
                out.append((None, f"invalid JSON on line {lineno}: nested too deeply"))
            except ValueError as e:
                out.append((None, f"invalid JSON on line {lineno}: {e}"))
        return out

    try:
        data = _loads(text)
    except json.JSONDecodeError as e:
        raise SampleError(
            f"{json_path}: invalid JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}"
        ) from None
    except RecursionError:
        raise SampleError(f"{json_path}: JSON nested too deeply") from None
    except ValueError as e:
        raise SampleError(f"{json_path}: invalid JSON: {e}") from None
    if not isinstance(data, list):
        raise SampleError(f"{json_path}: expected a JSON list of records, got {_kind(data)}")
    return [(r, None) for r in data]


def plan_llava(json_path: str, image_root: str, *, split: str = "train") -> Plan:
    """Plan a LLaVA-format dataset: a JSON list (or .jsonl) of records + a folder of images.

    `json_path` and `image_root` are local paths or fsspec URLs. A record with "image" gets locator
    {"path": image_root joined with it} (absolute and normalised for local roots; a URL image as it is);
    one without is text-only. Malformed records (an image path leaving the root, an over-long id included)
    become plan issues and are left out; repairs (added <image> token, missing id, duplicate id) become
    note issues and the record is kept. Image existence is not checked here, nor symlinks or URL schemes:
    the worker that reads the image does (pipeline/data/access.py).

    Raises `SampleError` when the file as a whole cannot be read or is not valid JSON (nesting too deep
    included).
    """
    plan = Plan()
    for i, (rec, parse_error) in enumerate(_load_llava_records(json_path)):
        where = f"{json_path}#{i}"
        fallback_id = f"record[{i}]"
        if parse_error is not None:
            plan.issues.append(SampleIssue(fallback_id, "llava", "plan", parse_error, where))
            continue
        if not isinstance(rec, dict):
            reason = f"record is not an object (got {_kind(rec)})"
            plan.issues.append(SampleIssue(fallback_id, "llava", "plan", reason, where))
            continue
        problem = _id_problem(rec.get("id"))
        if problem is not None:
            plan.issues.append(SampleIssue(fallback_id, "llava", "plan", problem, where))
            continue
        rid = _record_id(rec.get("id"))
        sid = rid or fallback_id

        def issue(reason: str, stage: str = "plan") -> None:
            plan.issues.append(SampleIssue(sid, "llava", stage, reason, where))

        if "conversations" not in rec:
            issue("no 'conversations'")
            continue

        image = rec.get("image")
        if "image" in rec and image is not None:
            if isinstance(image, list):
                issue(f"'image' is a list of {len(image)}; multi-image samples are not supported")
                continue
            if not isinstance(image, str) or not image.strip():
                issue(f"'image' is not a non-empty string (got {_kind(image)})")
                continue
        has_image = isinstance(image, str)
        path = ""
        if has_image:
            path, problem = _join_image_path(image_root, image)
            if problem is not None:
                issue(problem)
                continue

        try:
            convs, note = normalize_conversations(rec["conversations"], has_image=has_image)
        except SampleError as e:
            issue(e.reason)
            continue

        if rid is None:
            got = "" if "id" not in rec else f" (got {_kind(rec.get('id'))} {_short_repr(rec.get('id'))})"
            issue(f"no usable 'id'{got}; using {fallback_id!r}", stage="note")
        if note:
            issue(note, stage="note")

        category = rec.get("category")
        rsplit = rec.get("split")
        plan.records.append(
            SampleRecord(
                id=sid,
                source="llava",
                locator={"path": path} if has_image else {},
                conversations=convs,
                has_image=has_image,
                category=category if isinstance(category, str) else "",
                split=rsplit if isinstance(rsplit, str) and rsplit else split,
                image_ref=image if has_image else "",
            )
        )
    _dedupe_ids(plan, "llava")
    return plan


# ---------------------------------------------------------------------------------------- WebDataset


def _split_top_level_commas(spec: str) -> list[str]:
    """Split on commas that are not inside {...} (so brace alternatives like {a,b} survive)."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Expand a shard spec into a list of shard paths/URLs (order kept, duplicates dropped).

    `spec` is a comma-separated string or a list; each item may be a local path, a glob ("*", "?",
    "[...]"), or a brace pattern such as "data/train-{000000..000009}.tar" (expanded with braceexpand).
    Local paths are made absolute and must exist (MissingError naming the missing shard, or the glob
    that matched nothing). fsspec URLs are kept as they are (a URL with a glob is expanded with fsspec), and so are
    `pipe:` commands (webdataset's convention: "pipe:CMD" reads the tar from CMD's stdout; braces expand, a comma
    outside braces separates shards).
    """
    items: list[str] = []
    for part in [spec] if isinstance(spec, str) else list(spec):
        items.extend(_split_top_level_commas(str(part)))
    if not items:
        raise ValueError(f"no shards in spec {spec!r}")
    out: list[str] = []
    for item in items:
        for path in braceexpand(item):
            if is_pipe(path):
                out.append(path)
                continue
            if is_url(path):
                if _has_glob(path):
                    fs, fs_path = fsspec.core.url_to_fs(path)
                    matches = sorted(fs.glob(fs_path))
                    if not matches:
                        raise MissingError(f"no shard matches {path}; check the shard spec (--wds)")
                    out.extend(fs.unstrip_protocol(m) for m in matches)
                else:
                    out.append(path)
                continue
            path = os.path.expanduser(path)
            if _has_glob(path):
                matches = sorted(m for m in globmod.glob(path) if os.path.isfile(m))
                if not matches:
                    raise MissingError(f"no shard matches {path}; check the shard spec (--wds)")
                out.extend(os.path.abspath(m) for m in matches)
            else:
                if not os.path.isfile(path):
                    raise MissingError(f"shard not found: {path}; check the shard spec (--wds)")
                out.append(os.path.abspath(path))
    return list(dict.fromkeys(out))


def pipe_shards(spec: str | list[str]) -> frozenset[str]:
    """The `pipe:` commands a shard spec names (as `expand_shards` lists them; nothing else is resolved): extraction
    runs no command that is not one of these, whatever a cache's stored locators say."""
    items = [p for part in ([spec] if isinstance(spec, str) else list(spec)) for p in _split_top_level_commas(str(part))]
    return frozenset(path for item in items for path in braceexpand(item) if is_pipe(path))


def split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset key/extension of a tar member name, or None when it has none.

    key = the path up to the first "." of the basename (directory prefix kept, leading "./" removed);
    extension = the rest, lower-cased. Names whose basename has no "." (or starts with one: hidden files)
    have no key.
    """
    while name.startswith("./"):
        name = name[2:]
    dirname, base = posixpath.split(name)
    dot = base.find(".")
    if dot <= 0 or dot == len(base) - 1:
        return None
    key = posixpath.join(dirname, base[:dot]) if dirname else base[:dot]
    return key, base[dot + 1 :].lower()


def _pick(members: dict[str, tarfile.TarInfo], wanted: Iterable[str]) -> tuple[str | None, str | None]:
    """(extension of the member to use, or None; an ambiguity error or None) — see module docstring."""
    wanted = tuple(wanted)
    for ext in wanted:
        if ext in members:
            return ext, None
    fallback = [ext for ext in members if "." in ext and ext.rsplit(".", 1)[1] in wanted]
    if len(fallback) == 1:
        return fallback[0], None
    if len(fallback) > 1:
        names = ", ".join(members[e].name for e in fallback)
        return None, f"several candidate members ({names}); cannot tell which to use"
    return None, None


def _unsafe_member_name(name: str) -> str | None:
    """Why a tar member name is unsafe to use (absolute, a ".." component, a backslash, control characters), or None."""
    if not name:
        return "an empty name"
    if name.startswith("/"):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a '..' component"
    if "\\" in name:
        return "a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "control characters"
    return None


def _member_kind(ti: tarfile.TarInfo) -> str:
    if ti.issym():
        return f"a symlink (-> {ti.linkname})"
    if ti.islnk():
        return f"a hard link (-> {ti.linkname})"
    if ti.ischr() or ti.isblk():
        return "a device file"
    if ti.isfifo():
        return "a FIFO"
    return f"not a regular file (type {ti.type!r})"


class _ShardScan:
    """Result of reading one shard's headers."""

    def __init__(self) -> None:
        self.members: list[tarfile.TarInfo] = []  # complete regular-file and other non-dir members
        self.cut_member: tarfile.TarInfo | None = None  # member whose data runs past the end of the file
        self.error: str | None = None  # damage description, None when the tar is intact
        self.complete: int = 0  # members read completely before the damage


def _scan_tar(f: Any, size: int) -> tuple[tarfile.TarFile | None, _ShardScan]:
    scan = _ShardScan()
    tar: tarfile.TarFile | None = None
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
        while True:
            ti = tar.next()
            if ti is None:
                break
            if ti.isdir():
                scan.complete += 1
                continue
            if ti.offset_data + ti.size > size:
                scan.cut_member = ti
                scan.error = (
                    f"member {ti.name!r} needs {ti.offset_data + ti.size} bytes but the file has {size}"
                )
                return tar, scan
            scan.members.append(ti)
            scan.complete += 1
    except Exception as e:  # noqa: BLE001 - a damaged tar raises many types; one bad shard never raises
        scan.error = f"{type(e).__name__}: {e}"
        return tar, scan
    # tarfile silently stops at a bad or missing header after the first one: check where it stopped.
    end = tar.offset
    if end >= size:
        scan.error = "the file ends without the end-of-archive marker"
    else:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
        if block.strip(b"\0"):
            scan.error = f"invalid tar header at byte {end}"
    return tar, scan


def _is_text_member(name: str) -> bool:
    """Whether a member could be a sample's ".json" record or caption (its extension, or its last suffix, says so)."""
    parsed = split_member_name(name)
    return parsed is not None and parsed[1].rsplit(".", 1)[-1] in ("json", *CAPTION_EXTENSIONS)


def _scan_stream(tape: ShardTape) -> tuple[_ShardScan, dict[int, bytes]]:
    """`_scan_tar` for a shard that can only be read front to back (a `pipe:` command): every member's data is read
    through, the text of small ".json"/".txt" candidates kept (by data offset), the rest dropped as it is read, so a
    member cut by the end of the stream is found where it is cut. Returns (scan, texts)."""
    scan = _ShardScan()
    texts: dict[int, bytes] = {}
    try:
        tar = tarfile.open(fileobj=tape, mode="r|")
        while (ti := tar.next()) is not None:
            tar.members = []  # stream mode keeps every TarInfo otherwise
            if ti.isdir():
                scan.complete += 1
                continue
            if ti.isreg():
                keep = ti.size <= MAX_JSON_MEMBER_BYTES and _is_text_member(ti.name)
                fobj = tar.extractfile(ti)
                kept: list[bytes] = []
                got = 0
                try:
                    while fobj is not None and (chunk := fobj.read(1 << 20)):
                        got += len(chunk)
                        if keep:
                            kept.append(chunk)
                except tarfile.ReadError:
                    got = -1
                if got < ti.size:
                    size = tape.drain()
                    scan.cut_member = ti
                    scan.error = f"member {ti.name!r} needs {ti.offset_data + ti.size} bytes but the file has {size}"
                    return scan, texts
                if keep:
                    texts[ti.offset_data] = b"".join(kept)
            scan.members.append(ti)
            scan.complete += 1
    except SpoolError:
        raise  # the local copy failed, not the input
    except Exception as e:  # noqa: BLE001 - a damaged tar or a failing command raises many types; never raises for them
        scan.error = f"{type(e).__name__}: {e}"
        try:
            tape.drain()  # the rest of the stream still goes to the spool: the planned members before the damage are in it
        except SpoolError:
            raise
        except Exception:  # noqa: BLE001 - a failing command: the spool stays incomplete and is not kept
            pass
        return scan, texts
    # as in _scan_tar: tarfile silently stops at a bad or missing header after the first one
    end = tar.offset
    block = tape.peek(end, tarfile.BLOCKSIZE)
    size = tape.drain()
    if end >= size:
        scan.error = "the file ends without the end-of-archive marker"
    elif block.strip(b"\0"):
        scan.error = f"invalid tar header at byte {end}"
    return scan, texts


def _tar_text_reader(tar: tarfile.TarFile) -> Callable[[tarfile.TarInfo], str]:
    """A small member's text (UTF-8, BOM dropped) read from a seekable tar; the reader raises UnicodeDecodeError,
    tarfile.TarError, OSError, EOFError."""

    def read(ti: tarfile.TarInfo) -> str:
        fobj = tar.extractfile(ti)
        return (fobj.read() if fobj is not None else b"").decode("utf-8-sig")

    return read


def _kept_text_reader(texts: dict[int, bytes]) -> Callable[[tarfile.TarInfo], str]:
    """A small member's text as `_scan_stream` kept it (UTF-8, BOM dropped); the reader raises UnicodeDecodeError."""
    return lambda ti: texts[ti.offset_data].decode("utf-8-sig")


def _webdataset_sample(
    shard: str,
    key: str,
    members: dict[str, tarfile.TarInfo],
    read_text: Callable[[tarfile.TarInfo], str],
    split: str,
    max_image_bytes: int,
) -> tuple[SampleRecord | None, list[SampleIssue]]:
    """Build the record for one grouped sample (or the issues saying why there is none)."""
    base = posixpath.basename(shard.rstrip("/"))
    default_id = f"{base}/{key}"
    issues: list[SampleIssue] = []

    def fail(reason: str, sid: str = default_id, member: str = "") -> tuple[None, list[SampleIssue]]:
        where = f"{shard}#{member or key}"
        issues.append(SampleIssue(sid, "webdataset", "plan", reason, where))
        return None, issues

    img_ext, err = _pick(members, IMAGE_EXTENSIONS)
    if err:
        return fail(f"image: {err}")
    json_ext, err = _pick(members, ("json",))
    if err:
        return fail(f"record: {err}")
    txt_ext, err = _pick(members, CAPTION_EXTENSIONS)
    if err:
        return fail(f"caption: {err}")
    if img_ext is not None and members[img_ext].size > max_image_bytes:
        ti = members[img_ext]
        return fail(f"image member {ti.name} is {ti.size} bytes, over the limit of {max_image_bytes} "
                    "(--max-image-bytes)", member=ti.name)

    meta: dict[str, Any] = {}
    convs_raw: Any = None
    sid = default_id
    if json_ext is not None:
        ti = members[json_ext]
        if ti.size > MAX_JSON_MEMBER_BYTES:
            return fail(f"{ti.name} is {ti.size} bytes (> {MAX_JSON_MEMBER_BYTES}); not a sample record",
                        member=ti.name)
        try:
            meta = _loads(read_text(ti))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return fail(f"invalid JSON in {ti.name}: {e}", member=ti.name)
        except RecursionError:
            return fail(f"invalid JSON in {ti.name}: nested too deeply", member=ti.name)
        except (tarfile.TarError, OSError, EOFError) as e:
            return fail(f"cannot read {ti.name}: {e}", member=ti.name)
        except ValueError as e:
            return fail(f"invalid JSON in {ti.name}: {e}", member=ti.name)
        if not isinstance(meta, dict):
            return fail(f"{ti.name} is not a JSON object (got {_kind(meta)})", member=ti.name)
        problem = _id_problem(meta.get("id"))
        if problem is not None:
            return fail(problem, member=ti.name)
        sid = _record_id(meta.get("id")) or default_id
        convs_raw = meta.get("conversations")

    note: str | None = None
    has_image = img_ext is not None
    if convs_raw is not None:
        try:
            convs, note = normalize_conversations(convs_raw, has_image=has_image)
        except SampleError as e:
            return fail(e.reason, sid=sid, member=members[json_ext].name if json_ext else "")
    elif txt_ext is not None:
        ti = members[txt_ext]
        if ti.size > MAX_JSON_MEMBER_BYTES:
            return fail(f"{ti.name} is {ti.size} bytes (> {MAX_JSON_MEMBER_BYTES}); not a caption",
                        sid=sid, member=ti.name)
        try:
            text = read_text(ti).strip()
        except UnicodeDecodeError as e:
            return fail(f"caption {ti.name} is not UTF-8 text: {e}", sid=sid, member=ti.name)
        except (tarfile.TarError, OSError, EOFError) as e:
            return fail(f"cannot read {ti.name}: {e}", sid=sid, member=ti.name)
        if not text:
            return fail(f"caption {ti.name} is empty", sid=sid, member=ti.name)
        if not has_image:
            return fail(f"caption {ti.name} but no image member", sid=sid, member=ti.name)
        convs = [{"from": "human", "value": IMAGE_TOKEN + "\n"}, {"from": "gpt", "value": text}]
    elif json_ext is not None:
        return fail(
            f"{members[json_ext].name} has no 'conversations' and there is no caption (.txt) member",
            sid=sid, member=members[json_ext].name,
        )
    elif has_image:
        return fail("no conversation (.json) or caption (.txt) member", member=members[img_ext].name)
    else:
        names = ", ".join(sorted(ti.name for ti in members.values()))
        return fail(f"no image, conversation (.json) or caption (.txt) member (members: {names})")

    if note:
        issues.append(SampleIssue(sid, "webdataset", "note", note, f"{shard}#{key}"))
    category = meta.get("category")
    rsplit = meta.get("split")
    if has_image:
        ti = members[img_ext]
        locator = {"tar": shard, "member": ti.name, "offset": ti.offset_data, "size": ti.size}
    else:
        locator = {}
    rec = SampleRecord(
        id=sid,
        source="webdataset",
        locator=locator,
        conversations=convs,
        has_image=has_image,
        category=category if isinstance(category, str) else "",
        split=rsplit if isinstance(rsplit, str) and rsplit else split,
        image_ref=members[img_ext].name if has_image else "",
    )
    return rec, issues


def _is_compressed(magic: bytes) -> bool:
    """gzip, bzip2, xz or zstd magic at the start of a shard."""
    return (
        magic[:2] == b"\x1f\x8b"
        or (magic[:3] == b"BZh" and magic[4:10] == b"1AY&SY")
        or magic[:6] == b"\xfd7zXZ\x00"
        or magic[:4] == b"\x28\xb5\x2f\xfd"
    )


def _open_headers(shard: str) -> BinaryIO:
    """A seekable shard opened to read its member headers and small text members without its other data: a local
    file unbuffered (every read fetches the bytes asked for, seeks skip member data), an fsspec file without readahead
    (cache_type "none": each header and each .json/.txt is one ranged read of its own bytes)."""
    if not is_remote(shard):
        return open_local(local_root(shard))
    return fsspec.open(shard, "rb", cache_type="none").open()


def _plan_shard(shard: str, split: str, plan: Plan, max_image_bytes: int, spool_dir: Path | None) -> None:
    base = posixpath.basename(shard.rstrip("/"))

    def shard_issue(tag: str, reason: str) -> None:
        plan.issues.append(SampleIssue(f"{base}/{tag}", "webdataset", "plan", reason, shard))

    compressed = ("<shard>", "compressed tar shards are not supported (random access needs an uncompressed .tar)")
    # streamed whole: a command (it cannot seek), and a remote shard that is spooled (one sequential read at the store's
    # bandwidth instead of a ranged request per member header)
    streamed = is_pipe(shard) or (spool_dir is not None and is_remote(shard))
    try:
        f = open_stream(shard) if streamed else _open_headers(shard)
    except FileNotFoundError:
        raise MissingError(f"shard not found: {shard}; check the shard spec (--wds)") from None
    except OSError as e:
        shard_issue("<shard>", f"cannot open shard: {e}")
        return
    spool = spool_path(spool_dir, shard) if spool_dir is not None and streamed else None
    copy: BinaryIO | None = None
    tape: ShardTape | None = None
    try:
        if streamed:
            if spool is not None:
                try:
                    spool.parent.mkdir(parents=True, exist_ok=True)
                    copy = open(temp_path(spool), "wb")
                except OSError as e:
                    raise SpoolError.of(temp_path(spool), e) from None
            tape = ShardTape(f, copy)
            scan, texts = _scan_stream(tape)
            if _is_compressed(tape.head):
                shard_issue(*compressed)
                return
            read_text = _kept_text_reader(texts)
        else:
            try:
                f.seek(0, 2)
                size = f.tell()
                f.seek(0)
                magic = f.read(10)
                f.seek(0)
            except OSError as e:
                shard_issue("<shard>", f"cannot read shard: {e}")
                return
            if _is_compressed(magic):
                shard_issue(*compressed)
                return
            tar, scan = _scan_tar(f, size)
            read_text = _tar_text_reader(tar) if tar is not None else _kept_text_reader({})

        # Group members by key (first appearance order), flagging non-regular members and duplicates.
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        bad_keys: set[str] = set()
        for ti in scan.members:
            where = f"{shard}#{ti.name}"
            unsafe = _unsafe_member_name(ti.name)
            if unsafe is not None:
                plan.issues.append(SampleIssue(f"{base}/{ti.name}", "webdataset", "plan",
                                               f"unsafe member name {ti.name!r} ({unsafe}); skipped", where))
                continue
            if not ti.isreg():
                plan.issues.append(SampleIssue(f"{base}/{ti.name}", "webdataset", "plan",
                                               f"member is {_member_kind(ti)}; skipped", where))
                continue
            parsed = split_member_name(ti.name)
            if parsed is None:
                plan.issues.append(SampleIssue(f"{base}/{ti.name}", "webdataset", "plan",
                                               "member name has no extension (or is a hidden file); "
                                               "not part of any sample", where))
                continue
            key, ext = parsed
            group = groups.setdefault(key, {})
            if ext in group:
                if key not in bad_keys:
                    plan.issues.append(SampleIssue(
                        f"{base}/{key}", "webdataset", "plan",
                        f"duplicate key: {group[ext].name!r} and {ti.name!r} both map to {key}.{ext}; "
                        "sample skipped", where))
                bad_keys.add(key)
                continue
            group[ext] = ti

        cut_key: str | None = None
        if scan.cut_member is not None:
            parsed = split_member_name(scan.cut_member.name)
            cut_key = parsed[0] if parsed else None
            bad_keys.add(cut_key or "")
            plan.issues.append(SampleIssue(
                f"{base}/{cut_key or scan.cut_member.name}", "webdataset", "plan",
                f"member {scan.cut_member.name!r} is cut off by the end of the file (truncated tar); "
                "sample skipped", f"{shard}#{scan.cut_member.name}"))

        last_key = next(reversed(groups), None) if groups else None
        for key, members in groups.items():
            if key in bad_keys:
                continue
            rec, issues = _webdataset_sample(shard, key, members, read_text, split, max_image_bytes)
            if rec is None and scan.error is not None and key == last_key:
                suffix = " (sample at the damaged end of the tar)"
                issues = [SampleIssue(i.id, i.source, i.stage, i.reason + suffix, i.where) for i in issues]
            plan.issues.extend(issues)
            if rec is not None:
                plan.records.append(rec)

        if scan.error is not None:
            shard_issue("<truncated>",
                        f"truncated or corrupt tar after {scan.complete} members: {scan.error}")
    finally:
        try:
            f.close()
        except Exception as e:  # noqa: BLE001 - a `pipe:` command reports its failure when it is closed
            what = "the shard's command failed" if is_pipe(shard) else "closing the shard failed"
            shard_issue("<shard>", f"{what}: {type(e).__name__}: {e}")
        if copy is not None and spool is not None:
            try:
                copy.close()  # its last buffered bytes are written here: a full disk can show only now
                if tape is not None and tape.eof:  # the whole output: every planned member is in the copy
                    commit(temp_path(spool), spool)
            except OSError as e:
                raise SpoolError.of(temp_path(spool), e) from None
            finally:
                temp_path(spool).unlink(missing_ok=True)  # a copy not committed (committed: renamed away already)


PLAN_THREADS = 8  # input shards planned at once: planning waits on the store (requests, commands), not on the CPU


def plan_webdataset(spec: str | list[str], *, split: str = "train", max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                    spool_dir: str | Path | None = None, threads: int = PLAN_THREADS, progress: bool = False) -> Plan:
    """Plan WebDataset tar shards: read member headers (not image data) and group them into samples.

    Each sample's image is located by {"tar", "member", "offset", "size"}: extraction reads each shard once and takes
    the member at that offset (pipeline/data/stream.py: a local file or spool copy by offset, a stream front to back). Local and fsspec shards are read by their headers (and
    the small .json/.txt members) only, seeking past image data; a `pipe:` shard cannot seek, so its whole stream is
    read here. With `spool_dir`, `pipe:` and remote (non-local fsspec) shards are streamed whole and copied to a local
    file there as they are read (`stream.spool_path`), which extraction reads instead of the input; without it a
    command runs again when extracting and a remote shard is planned by one ranged read per header and record. The
    sample's conversation comes from `{key}.json` (LLaVA-style: conversations, optional id/category/split)
    or, failing that, a `.txt`/`.caption` member turned into [human "<image>\\n", gpt caption]. A json
    without an image and without an <image> token gives a text-only record.

    Members with unsafe names and image members above `max_image_bytes` (by their header) are skipped and
    recorded. One bad shard never raises: damage becomes issues and every complete sample before it is
    kept. A missing shard raises MissingError.

    `threads` shards are planned at once (each by one thread: a command, a stream or a series of ranged reads that
    mostly waits on I/O); the plan is the same for any number, its records and issues in shard order.
    """
    shards = expand_shards(spec)
    folder = None if spool_dir is None else Path(spool_dir)

    def one(shard: str) -> Plan:
        part = Plan()
        _plan_shard(shard, split, part, max_image_bytes, folder)
        return part

    plan = Plan()
    pool = ThreadPoolExecutor(max(1, min(threads, len(shards))), thread_name_prefix="layerfuse-plan")
    try:
        with tqdm(total=len(shards), unit="shard", desc="plan", disable=not progress, dynamic_ncols=True) as bar:
            for part in pool.map(one, shards):  # in shard order
                plan.records.extend(part.records)
                plan.issues.extend(part.issues)
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a shard that raised: the shards not started are not planned
    _dedupe_ids(plan, "webdataset")
    return plan
