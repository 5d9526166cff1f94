"""Reading a WebDataset tar shard once: opening it (local path, fsspec URL, `pipe:` command) and taking the planned
image members out of it with every size checked against the cap before any data is read.

Extraction (pipeline/cache/extract.py) reads each input shard that holds an image of a pending row exactly once with
`read_members`: a file on a local disk (an input shard, or a spool copy) by offset, only the planned images' headers and
data (`_read_local_members`); a stream (a `pipe:` command, an fsspec URL with no spool copy) front to back. Planning
(pipeline/data/sources.py) streams a `pipe:` shard with `ShardTape`, since a command's output cannot be seeked, and so a
remote (fsspec) shard when it spools.

Spooling: a `pipe:` shard (typically `pipe:curl ...` or `pipe:aws s3 cp ... -`) or a remote one would be read twice,
once by planning and once by extraction, and planning a remote shard by its headers costs a ranged request per member.
With a spool folder, planning streams such a shard whole and copies the bytes it reads to a local spool file
(`spool_path`), committed only once the shard was read to its end; extraction reads the members from that copy
(`read_members(..., spool=...)`) and reads the input again only when there is no copy. The copy is byte for byte what
planning saw, so every planned offset holds in it even when the command would now print something else. A copy that
cannot be written is a `SpoolError` (this machine's disk), never a damaged input.

Opening: `pipe:` commands and local paths (and file: URLs) go through webdataset's opener (`webdataset.gopen.gopen`: a
subprocess for `pipe:`, a buffered file otherwise); any other URL through fsspec with a large readahead block
(webdataset 1.0 has no fsspec opener: it reaches s3/gs/http through command-line tools). Members of a stream are
iterated by `tarfile` in stream mode ("r|"), as webdataset's `tar_file_iterator` does, but not through it: that reads
every member it selects whole before anything can look at its header size, so it could not hold --max-image-bytes
against a shard that changed since planning, and its `group_by_keys` splits a key whose members are not adjacent, which
planning groups. Here a member is taken only when its name *and* data offset are the planned ones, only when its header
size is within the cap, and at most cap + 1 bytes of it are read; everything else in the stream is read through and
dropped. Reading stops as soon as the last wanted member has been read.

A local file is not streamed: the plan has read every header and record already, so streaming it again would read those
twice (for small images, such as the built-in 96-px PNGs at 2.1 KiB of tar a sample, that is more than half the
input). `_read_local_members` reads, in offset order, the 512-byte header block in front of each planned data offset,
checks it (a valid tar header, the planned name, a regular file, a size within the cap) and then reads the data: the
images and their headers, once, and nothing else.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import fsspec
from webdataset.gopen import gopen

from layerfuse.core.errors import StateError
from layerfuse.core.fingerprint import fingerprint
from layerfuse.pipeline.data.access import is_remote, local_root
from layerfuse.pipeline.data.records import SampleError

__all__ = ["PIPE_PREFIX", "STREAM_BLOCK", "SpoolError", "is_pipe", "open_local", "open_stream", "spool_path", "ShardTape", "read_members"]

PIPE_PREFIX = "pipe:"
STREAM_BLOCK = 8 << 20  # readahead of an fsspec shard read front to back: large sequential requests
_CHUNK = 1 << 20  # members are read and drained in pieces of this size


def is_pipe(url: str) -> bool:
    """Whether a shard is a `pipe:` command (webdataset's convention: the command's stdout is the tar)."""
    return url.startswith(PIPE_PREFIX)


def open_stream(url: str) -> BinaryIO:
    """A shard opened for one sequential read (module docstring). Raises FileNotFoundError / OSError."""
    if is_pipe(url):
        return gopen(url, "rb")
    if not is_remote(url):
        return gopen(local_root(url), "rb")
    return fsspec.open(url, "rb", block_size=STREAM_BLOCK, cache_type="readahead").open()


class SpoolError(StateError):
    """The local copy of a streamed input shard cannot be written (a full or read-only disk): this machine's problem,
    never recorded as damage of the input."""

    @classmethod
    def of(cls, path: Any, e: OSError) -> "SpoolError":
        return cls(f"cannot write the spool copy {path} of an input shard: {e.strerror or e}; free space there, choose "
                   "another --spool folder, or pass --spool none (commands run again, remote shards are read twice)")


def spool_path(spool_dir: str | Path, url: str) -> Path:
    """The local copy of streamed shard `url` (a `pipe:` command or a remote URL) in `spool_dir` (module docstring): one
    file per shard, named by the fingerprint of its URL."""
    return Path(spool_dir) / f"{fingerprint({'shard': url})}.tar"


class ShardTape:
    """A read-only stream over an opened shard that counts the bytes it hands out and keeps the first bytes (the
    compression magic) and the last two pieces read, so that what a tar reader stopped on can be looked at afterwards.
    With `copy`, every byte read is also written there (a spool file); `eof` says whether the stream was read to its
    end, so whether that copy is whole."""

    def __init__(self, f: BinaryIO, copy: BinaryIO | None = None):
        self.f = f
        self.copy = copy
        self.pos = 0  # bytes handed out so far
        self.eof = False  # a read returned nothing: the whole stream has been read
        self.head = b""  # the first 16 bytes of the shard
        self._recent: list[tuple[int, bytes]] = []  # [(offset, piece)], the last two reads

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if not data and n != 0:
            self.eof = True
        if self.copy is not None and data:
            try:
                self.copy.write(data)
            except OSError as e:
                raise SpoolError.of(getattr(self.copy, "name", "?"), e) from None
        if len(self.head) < 16:
            self.head += data[: 16 - len(self.head)]
        self._recent = [*self._recent[-1:], (self.pos, data)]
        self.pos += len(data)
        return data

    def peek(self, at: int, n: int) -> bytes:
        """Bytes [at, at + n) of the shard as far as the last two reads hold them (b"" when they do not)."""
        if not self._recent or at < self._recent[0][0]:
            return b""
        start = self._recent[0][0]
        joined = b"".join(piece for _, piece in self._recent)
        return joined[at - start: at - start + n]

    def drain(self) -> int:
        """Read to the end; returns the shard's size in bytes."""
        while self.read(_CHUNK):
            pass
        return self.pos

    def close(self) -> None:
        self.f.close()


def _read_capped(tar: tarfile.TarFile, ti: tarfile.TarInfo, cap: int) -> bytes:
    """Member data, at most cap + 1 bytes read; raises tarfile.ReadError when the stream ends inside it."""
    f = tar.extractfile(ti)
    if f is None:
        return b""
    chunks: list[bytes] = []
    got = 0
    while got <= cap:
        chunk = f.read(min(_CHUNK, cap + 1 - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _names_match(header_name: str, member: str) -> bool:
    """Whether a member's own 512-byte header names `member`. A name that does not fit a ustar header (over 100 bytes
    with no usable prefix split, or not ASCII) is carried by a pax or GNU long-name record in front of that header,
    whose own name field holds a truncated or re-encoded copy: any name is taken then (size, type and position still
    are checked)."""
    if header_name == member:
        return True
    return not member.isascii() or len(member.encode()) > 100


def _unopened(url: str, e: Exception) -> SampleError:
    """Why a shard's members cannot be read: it could not be opened."""
    if isinstance(e, FileNotFoundError):
        return SampleError(f"shard not found: {url}")
    return SampleError(f"cannot open shard {url}: {type(e).__name__}: {e}")


def _refusal(ti: tarfile.TarInfo, member: str, url: str, max_bytes: int) -> SampleError | None:
    """Why a planned member's header (read again at extraction) refuses it, or None: it must still be a regular file,
    and within the size cap before any of its data is read."""
    if not ti.isreg():
        return SampleError(f"tar member {member} is no longer a regular file: {url}")
    if ti.size > max_bytes:
        return SampleError(f"tar member {member} is {ti.size} bytes, over the limit of {max_bytes} (--max-image-bytes): {url}")
    return None


def open_local(path: str) -> BinaryIO:
    """A shard on a local disk opened for reads by offset: unbuffered, so every read fetches the bytes asked for and a
    seek skips what is not wanted."""
    return open(path, "rb", buffering=0)


def _read_local_members(path: str, url: str, left: dict[tuple[str, int], Any],
                        max_bytes: int) -> Iterator[tuple[Any, bytes | SampleError]]:
    """`read_members` for a shard on a local disk (an input path or a spool copy): each wanted member's header block
    (the 512 bytes in front of its data) and then its data are read by offset, in offset order, nothing else: what the
    plan read (every header, the records) is not read again, and images are read once."""
    try:
        f = open_local(path)
    except Exception as e:  # noqa: BLE001 - reported per member
        for tag in left.values():
            yield tag, _unopened(url, e)
        return
    failure: str | None = None  # why the members behind the current one cannot be read
    try:
        for member, offset in sorted(left, key=lambda k: k[1]):
            tag = left.pop((member, offset))
            try:
                block = b""
                if offset >= tarfile.BLOCKSIZE:
                    f.seek(offset - tarfile.BLOCKSIZE)
                    block = f.read(tarfile.BLOCKSIZE)
                try:
                    ti = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
                except tarfile.HeaderError:
                    ti = None
                if ti is None or not _names_match(ti.name, member):
                    yield tag, SampleError(f"tar member {member} not found at byte {offset} of {url}: "
                                           "the shard changed since planning")
                    continue
                if (refused := _refusal(ti, member, url, max_bytes)) is not None:
                    yield tag, refused
                    continue
                pieces: list[bytes] = []
                got = 0
                while got < ti.size:  # the file is at `offset`, just behind the header
                    piece = f.read(min(_CHUNK, ti.size - got))
                    if not piece:
                        break
                    pieces.append(piece)
                    got += len(piece)
            except OSError as e:
                failure = f"{type(e).__name__}: {e}"
                yield tag, SampleError(f"cannot read {member} from {url}: {failure}")
                break
            if got < ti.size:
                failure = f"the tar ends inside member {member}"
                yield tag, SampleError(f"truncated tar member {member}: got less than {ti.size} bytes from {url}")
                break
            yield tag, b"".join(pieces)
    finally:
        f.close()
    for (member, _), tag in left.items():
        yield tag, SampleError(f"cannot read {member} from {url}: {failure}")


def read_members(url: str, wanted: Mapping[tuple[str, int], Any], max_bytes: int, *,
                 spool: str | Path | None = None) -> Iterator[tuple[Any, bytes | SampleError]]:
    """Read shard `url` once and yield (tag, data or SampleError) for every wanted member, in stream order.

    `wanted` maps (member name, data offset) -- a webdataset locator's "member" and "offset" -- to a caller's tag.
    Every tag is yielded exactly once: with the member's bytes, or with the reason it is missing (the same wording as
    `access.read_image_bytes` for an oversized or cut member; "not found" when the shard changed since planning).
    A stream (a `pipe:` command, an fsspec URL) is read front to back: unwanted members are read through (a stream
    cannot seek) and dropped. A file on a local disk is read by offset (`_read_local_members`): only the wanted
    members' headers and data. With `spool` (the local copy planning made of a `pipe:` or remote shard, `spool_path`)
    the members are read from that file instead; messages still name `url`.
    """
    left = dict(wanted)
    if not left:
        return
    source = str(spool) if spool is not None else url
    if not is_pipe(source) and not is_remote(source):
        yield from _read_local_members(local_root(source), url, left, max_bytes)
        return
    try:
        f = open_stream(source)
    except Exception as e:  # noqa: BLE001 - openers raise many types (OSError, ValueError from gopen, back ends)
        for tag in left.values():
            yield tag, _unopened(url, e)
        return
    failure: str | None = None  # why the stream ended before every wanted member was read
    try:
        tar = tarfile.open(fileobj=f, mode="r|")
        while left:
            ti = tar.next()
            if ti is None:
                break
            tar.members = []  # stream mode keeps every TarInfo otherwise
            tag = left.pop((ti.name, ti.offset_data), None)
            if tag is None:
                continue
            if (refused := _refusal(ti, ti.name, url, max_bytes)) is not None:
                yield tag, refused
                continue
            try:
                data = _read_capped(tar, ti, max_bytes)
            except tarfile.ReadError:
                data = b""
            if len(data) < ti.size:
                failure = f"the tar ends inside member {ti.name}"
                yield tag, SampleError(f"truncated tar member {ti.name}: got less than {ti.size} bytes from {url}")
                break
            yield tag, data
    except Exception as e:  # noqa: BLE001 - a damaged tar or a failing command raises many types
        failure = f"{type(e).__name__}: {e}"
    finally:
        try:
            f.close()
        except Exception as e:  # noqa: BLE001 - a command cut short reports its exit status; what was read stands
            if left and failure is None:
                failure = f"{type(e).__name__}: {e}"
    for (member, offset), tag in left.items():
        if failure is not None:
            yield tag, SampleError(f"cannot read {member} from {url}: {failure}")
        else:
            yield tag, SampleError(f"tar member {member} not found at byte {offset} of {url}: "
                                   "the shard changed since planning")
