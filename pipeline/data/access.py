"""What a planned record may make a worker read, and reading it: record -> image bytes -> decoded RGB image.

The JSON and the shards are untrusted data. What they may make a worker read (`ImageAccess`):
  * a LLaVA image is a path under the image root. Planning refuses paths that leave it lexically ("..",
    absolute paths elsewhere); the worker that opens the file resolves it (os.path.realpath, so symlinks
    count) and refuses it unless it lies inside the resolved root (os.path.commonpath), then opens the
    resolved path. An image root that is itself a URL is the user's choice: relative paths under it are
    normalised and may not climb out of it.
  * an image that is itself a URL is refused unless its scheme (every scheme of a chained URL) was allowed
    with --allow-urls; "file" and "local" never are (a local image is a path under the root).
  * only regular files are opened: os.open(O_RDONLY | O_NONBLOCK | O_NOFOLLOW) after a stat, so a FIFO
    never blocks and a device is never opened; fstat confirms what was opened. A file above --max-image-bytes is refused
    by its size and at most max_bytes + 1 bytes are read, so a file that reports a wrong size (procfs) is
    bounded too; the same cap holds for tar image members (at plan time, by their header) and for allowed
    URL images.
  * no message quotes file contents (sizes only).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import fsspec

from layerfuse.core.errors import ConfigError
from layerfuse.pipeline.data.images import decode_image
from layerfuse.pipeline.data.records import SampleError, SampleRecord
from layerfuse.pipeline.data.synthetic import render_record

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["DEFAULT_MAX_IMAGE_BYTES", "ImageAccess", "parse_url_schemes", "is_url", "local_root", "read_image_bytes", "load_image"]

DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024  # --max-image-bytes: the largest image file or tar member read
LOCAL_SCHEMES = frozenset({"file", "local"})  # never allowed by --allow-urls: local images go through the root checks
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


@dataclass(frozen=True)
class ImageAccess:
    """What a worker may read for a record's image (the containment rules of the module docstring).

    image_root: the LLaVA image folder (local path or URL) every llava image must resolve inside; unused by
        other sources. allow_urls: the URL schemes an image value may use (--allow-urls). max_bytes: the
        largest image file or tar member read (--max-image-bytes).
    """

    image_root: str | None = None
    allow_urls: frozenset[str] = frozenset()
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES


def parse_url_schemes(text: str | None) -> frozenset[str]:
    """The --allow-urls value ("s3,gs,https": comma-separated scheme names, any case) as a set of lower-case names.

    Raises `ConfigError` for something that is not a scheme name, and for "file" / "local" (local images are
    paths under the image root, checked as such).
    """
    out: set[str] = set()
    for part in (text or "").split(","):
        name = part.strip().lower()
        if not name:
            continue
        if not _SCHEME.fullmatch(name):
            raise ConfigError(f"--allow-urls: {part.strip()!r} is not a URL scheme name (give e.g. s3,gs,https)")
        if name in LOCAL_SCHEMES:
            raise ConfigError(f"--allow-urls: {name!r} reads local files; local images are given as paths under "
                              "--image-root instead")
        out.add(name)
    return frozenset(out)


def is_url(path: str) -> bool:
    return "://" in path


def _url_schemes(url: str) -> list[str]:
    """Every protocol of a (possibly chained: "simplecache::s3://b/k") fsspec URL, lower-cased; a chain member that
    is a plain path counts as "file"."""
    out = []
    for part in url.split("::"):
        if "://" in part:
            out.append(part.split("://", 1)[0].lower())
        else:
            out.append(part.lower() if _SCHEME.fullmatch(part.lower()) else "file")
    return out


def local_root(root: str) -> str:
    """A file:// (or local://) image root as the local path it names; anything else unchanged."""
    for scheme in LOCAL_SCHEMES:
        if root.startswith(f"{scheme}://"):
            return root[len(scheme) + 3:]
    return root


def is_remote(path: str) -> bool:
    """Whether a path or URL names something off the local disk: a URL other than file:// and local:// (the project's
    one rule for where a shard, a root or --out lives)."""
    return is_url(local_root(path))




_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink"))
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _file_kind(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), f"file type {stat.S_IFMT(mode):o}")


def _over_cap(size: int, cap: int, path: str) -> SampleError:
    return SampleError(f"image file is {size} bytes, over the limit of {cap} (--max-image-bytes): {path}")


def _read_local(path: str, root: str, cap: int) -> bytes:
    """The bytes of local image `path`, which must resolve (symlinks included) inside `root` and be a regular file
    of at most `cap` bytes; at most cap + 1 bytes are ever read."""
    real_root = os.path.realpath(os.path.expanduser(root))
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise SampleError(f"image {path} resolves outside the image root {root} ('..' or a symlink); refused")
    try:
        info = os.stat(real)  # before opening: a device is never opened, a FIFO never waited on
        if not stat.S_ISREG(info.st_mode):
            raise SampleError(f"not a regular file: {_file_kind(info.st_mode)} ({path})")
        if info.st_size > cap:
            raise _over_cap(info.st_size, cap, path)
        fd = os.open(real, _OPEN_FLAGS)
    except FileNotFoundError:
        raise SampleError(f"image not found: {path}") from None
    except PermissionError:
        raise SampleError(f"cannot read image {path}: permission denied") from None
    except OSError as e:  # ELOOP: the last component became a symlink since it was resolved
        raise SampleError(f"cannot read image {path}: {e.strerror or type(e).__name__}") from None
    try:
        info = os.fstat(fd)  # what was opened, in case it changed since the stat
        if not stat.S_ISREG(info.st_mode):
            raise SampleError(f"not a regular file: {_file_kind(info.st_mode)} ({path})")
        if info.st_size > cap:
            raise _over_cap(info.st_size, cap, path)
        chunks: list[bytes] = []
        got = 0
        while got <= cap:
            chunk = os.read(fd, min(cap + 1 - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise SampleError(f"cannot read image {path}: {e.strerror or type(e).__name__}") from None
    finally:
        os.close(fd)
    if got > cap:
        raise SampleError(f"image file has more than {cap} bytes (it reports {info.st_size}), over the limit of {cap} "
                          f"(--max-image-bytes): {path}")
    return b"".join(chunks)


def _read_url(url: str, cap: int) -> bytes:
    """At most cap + 1 bytes of an image URL; more than `cap` is refused."""
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read(cap + 1)
    except FileNotFoundError:
        raise SampleError(f"image not found: {url}") from None
    except Exception as e:  # noqa: BLE001 - fsspec back ends raise many types (network, auth, unknown protocol)
        raise SampleError(f"cannot read image {url}: {type(e).__name__}: {e}") from None
    if len(data) > cap:
        raise SampleError(f"image file has more than {cap} bytes, over the limit of {cap} (--max-image-bytes): {url}")
    return data


def _read_llava_image(path: str, access: ImageAccess) -> bytes:
    """A llava record's image bytes under the containment rules (module docstring)."""
    if access.image_root is None:
        raise ValueError("llava records are read against their image root: pass ImageAccess(image_root=...)")
    root = local_root(access.image_root)
    if is_url(root):
        prefix = root.rstrip("/") + "/"
        if path.startswith(prefix):
            rel = path[len(prefix):]
            if posixpath.normpath(rel) != rel or rel == ".." or rel.startswith("../"):
                raise SampleError(f"image {path} leads outside the image root {access.image_root}; refused")
            return _read_url(path, access.max_bytes)
    if is_url(path):
        schemes = _url_schemes(path)
        local = [s for s in schemes if s in LOCAL_SCHEMES]
        if local:
            raise SampleError(f"image is a URL that reads local files (scheme {local[0]!r}); refused: local images "
                              f"are paths under the image root, and --allow-urls cannot allow {local[0]!r}: {path}")
        refused = list(dict.fromkeys(s for s in schemes if s not in access.allow_urls))
        if refused:
            raise SampleError(f"image is a URL (scheme {refused[0]!r}); URL images are refused unless allowed with "
                              f"--allow-urls {','.join(refused)}: {path}")
        return _read_url(path, access.max_bytes)
    if is_url(root):
        raise SampleError(f"image {path} is outside the image root {access.image_root}; refused")
    return _read_local(path, root, access.max_bytes)


def read_image_bytes(rec: SampleRecord, access: ImageAccess = ImageAccess()) -> bytes:
    """The encoded image bytes of a llava or webdataset record, read under `access` (the containment rules of the
    module docstring; a llava record needs `access.image_root`). Raises `SampleError` if refused or unreadable."""
    if not rec.has_image:
        raise ValueError(f"record {rec.id!r} is text-only; it has no image")
    if rec.source == "llava":
        return _read_llava_image(rec.locator["path"], access)
    if rec.source == "webdataset":
        loc = rec.locator
        shard, member, offset, size = loc["tar"], loc["member"], int(loc["offset"]), int(loc["size"])
        if size > access.max_bytes:
            raise SampleError(f"tar member {member} is {size} bytes, over the limit of {access.max_bytes} "
                              f"(--max-image-bytes): {shard}")
        if shard.startswith("pipe:"):  # a command's output cannot be read by offset: extraction streams it
            raise SampleError(f"tar member {member} of a pipe: shard can only be streamed "
                              f"(pipeline/data/stream.py), not read by offset: {shard}")
        try:
            with fsspec.open(shard, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except FileNotFoundError:
            raise SampleError(f"shard not found: {shard}") from None
        except OSError as e:
            raise SampleError(f"cannot read {member} from {shard}: {e}") from None
        if len(data) < size:
            raise SampleError(f"truncated tar member {member}: got {len(data)} of {size} bytes from {shard}")
        return data
    raise ValueError(f"read_image_bytes does not handle source {rec.source!r}")


def load_image(
    rec: SampleRecord,
    *,
    max_pixels: int,
    access: ImageAccess = ImageAccess(),
    working_pixels: Callable[[int, int], int] | None = None,
) -> Image.Image:
    """Load and decode a record's image into an RGB `PIL.Image.Image` (raises `SampleError` if bad or refused).

    Bytes are read under `access` (`read_image_bytes`); `max_pixels` and `working_pixels` (the preprocessing's
    largest intermediate for a w x h image, e.g. `ImagePreprocessor.working_pixels`) go to `decode_image`.
    Synthetic records are rendered by `layerfuse.pipeline.data.synthetic.render_record(rec)`.
    """
    if rec.source == "synthetic":
        return render_record(rec)
    return decode_image(read_image_bytes(rec, access), max_pixels=max_pixels, working_pixels=working_pixels)
