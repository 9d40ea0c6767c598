"""`docker save` from the engine into a spool file that can be read while it is written.

Pushing used to export the whole image to a temporary archive and upload it afterwards, which
took save time plus upload time (2.3x `docker save` alone for a 1 GiB image). The export now
parses the tar stream as it writes it and reports each blob member as soon as its header goes
by; the pusher uploads the blobs the server lacks straight from the spool, a chunk behind the
engine, and the archive is complete (and checked as a whole) before the image is recorded.

Engines since Docker 25 write the OCI layout, where every blob is ``blobs/sha256/<hex>``: the
name is the digest. Older engines (Debian 12's docker.io 20.10) write ``<id>/layer.tar``,
whose digest is known only once it has been read: those are reported with an empty digest
(the server names the upload after its bytes), and the config ``<hex>.json`` by its name.
"""

from __future__ import annotations

import contextlib
import queue
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

CHUNK = 1024 * 1024
BLOB_PREFIX = "blobs/sha256/"
_HEX = frozenset("0123456789abcdef")


class ExportError(Exception):
    """The engine could not export the image; str() is the one line to show."""


@dataclass(frozen=True)
class SpooledMember:
    """A blob member of the archive: its bytes are at ``offset`` in the spool. ``digest`` is
    "" for a legacy layer (its name does not say it). ``in_file``: how many of its bytes were
    already in the spool file when it was reported."""

    digest: str
    offset: int
    size: int
    in_file: int = 0


def blob_member(name: str, offset: int, size: int) -> SpooledMember | None:
    """The blob a `docker save` member holds, or None when it holds none."""
    name = name.removeprefix("./")
    if name.startswith(BLOB_PREFIX):  # OCI layout
        hexd = name[len(BLOB_PREFIX) :]
    elif name.endswith(".json") and "/" not in name:  # legacy layout: the config
        hexd = name.removesuffix(".json")
    elif name.endswith("/layer.tar") and name.count("/") == 1:  # legacy layout: a layer
        return SpooledMember("", offset, size)
    else:
        return None
    if len(hexd) != 64 or not _HEX.issuperset(hexd):
        return None
    return SpooledMember(f"sha256:{hexd}", offset, size)


class GrowingSpool:
    """An archive file being written by one thread and read by others as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0
        self.error: BaseException | None = None
        self.finished = False
        self._cond = threading.Condition()
        self._wanted = 0  # the lowest end a reader waits for (0: none waits)

    def wrote(self, nbytes: int) -> None:
        with self._cond:
            self.written += nbytes
            # Wake readers only when one can go on: waking them for every write costs more
            # (in GIL handoffs) than the copying.
            if self._wanted and self.written >= self._wanted:
                self._wanted = 0
                self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self.error = error
            self.finished = True
            self._cond.notify_all()

    def wait_for(self, end: int) -> None:
        """Blocks until the spool holds ``end`` bytes; raises if the export failed first."""
        with self._cond:
            while self.written < end and not self.finished:
                self._wanted = min(self._wanted, end) if self._wanted else end
                self._cond.wait()
            if self.written < end:
                raise ExportError(
                    str(self.error) if self.error else "the export ended before this blob did"
                )

    def read(self, offset: int, size: int, chunk: int = CHUNK) -> Iterator[bytes]:
        """The bytes at [offset, offset + size), each chunk as soon as it is written."""
        with self.path.open("rb") as fh:
            position = offset
            end = offset + size
            while position < end:
                want = min(chunk, end - position)
                self.wait_for(position + want)
                fh.seek(position)
                data = fh.read(want)
                if len(data) != want:
                    raise ExportError(f"the spool {self.path} is shorter than written")
                position += want
                yield data


class MemberPipe:
    """The bytes of one member handed from the export's thread to its uploader, instead of
    through the spool file: writing a GiB into the page cache and reading it back cost as
    much CPU here as the rest of the push. Bounded: the export waits for a slow uploader."""

    def __init__(self, depth: int = 16) -> None:
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
        self._abandoned = threading.Event()

    def put(self, data: bytes) -> None:
        while not self._abandoned.is_set():
            try:
                self._queue.put(data, timeout=0.1)
                return
            except queue.Full:
                continue

    def end(self, error: BaseException | None = None) -> None:
        self.put(error)  # type: ignore[arg-type]  # None or the error: the end

    def get(self) -> bytes | None:
        """The next bytes; None at the end. Raises ExportError if the export failed."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise ExportError(f"the export failed: {item}")
        return item

    def abandon(self) -> None:
        """The uploader gives up: the export no longer waits for it, and a ``get`` blocked
        on the way out returns None."""
        self._abandoned.set()
        while True:
            try:
                self._queue.put_nowait(None)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()


@dataclass
class _Route:
    start: int  # stream offsets
    end: int
    pipe: MemberPipe


class _Tee:
    """A read-only stream over the engine's chunks that tarfile parses the archive through.
    Everything it hands out goes to the spool file, a MiB at a time (the engine sends chunks
    of tens of kB), except the ranges routed to member pipes, which leave holes in the file.
    A read may return less than asked (tarfile's stream reader asks again)."""

    def __init__(self, chunks: Iterator[bytes], out: IO[bytes], spool: GrowingSpool) -> None:
        self._chunks = chunks
        self._out = out
        self._spool = spool
        self._chunk = memoryview(b"")
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.flushed = 0  # stream offset up to which everything went to the file or a pipe
        self._routes: list[_Route] = []

    def route(self, start: int, end: int, pipe: MemberPipe) -> None:
        """Sends the stream's bytes [start, end) to ``pipe``; ``start`` >= ``flushed``."""
        self._routes.append(_Route(start, end, pipe))

    def fail(self, error: BaseException) -> None:
        for route in self._routes:
            route.pipe.end(error)
        self._routes.clear()

    def flush(self) -> None:
        if not self._pending:
            return
        data = memoryview(b"".join(self._pending))
        position = self.flushed
        while data:
            route = next((r for r in self._routes if r.end > position), None)
            if route is not None and route.start <= position:
                n = min(len(data), route.end - position)
                route.pipe.put(bytes(data[:n]))
                if position + n == route.end:
                    route.pipe.end()
                    self._routes.remove(route)
            else:
                n = len(data) if route is None else min(len(data), route.start - position)
                self._out.seek(position)
                self._out.write(data[:n])
            position += n
            data = data[n:]
        self._out.flush()
        self._spool.wrote(self._pending_bytes)
        self.flushed = position
        self._pending, self._pending_bytes = [], 0

    def read(self, size: int = -1) -> bytes:
        while not self._chunk:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.flush()
                return b""
            self._chunk = memoryview(chunk)
        if size < 0:
            size = len(self._chunk)
        data = bytes(self._chunk[:size])
        self._chunk = self._chunk[size:]
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= CHUNK:
            self.flush()
        return data


# Members this big go to a pipe when the uploader asks; smaller ones (configs, which the
# archive check reads back) stay in the file.
PIPE_MIN_BYTES = 1024 * 1024


def export_to_spool(
    chunks: Iterator[bytes],
    spool: GrowingSpool,
    on_member: Callable[[SpooledMember], MemberPipe | None],
    on_bytes: Callable[[int], None],
) -> int:
    """Writes the engine's `docker save` stream to the spool, calling ``on_member`` for each
    blob member as soon as its header is read. A member of PIPE_MIN_BYTES or more for which
    ``on_member`` returns a pipe is sent there from ``in_file`` on (its first ``in_file``
    bytes are already in the spool), and is a hole in the spool file. Returns the archive's
    size; marks the spool finished (with the error, if any) either way."""

    def counted() -> Iterator[bytes]:
        for chunk in chunks:
            on_bytes(len(chunk))
            yield chunk

    tee: _Tee | None = None
    try:
        with spool.path.open("wb") as out:
            tee = _Tee(counted(), out, spool)
            stream: Any = tee
            with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as archive:
                for member in archive:
                    found = blob_member(member.name, member.offset_data, member.size)
                    if not member.isfile() or found is None:
                        continue
                    in_file = min(max(tee.flushed - found.offset, 0), found.size)
                    found = replace(found, in_file=in_file)
                    pipe = on_member(found)
                    if pipe is None:
                        continue
                    if in_file < found.size and found.size >= PIPE_MIN_BYTES:
                        tee.route(found.offset + in_file, found.offset + found.size, pipe)
                    else:
                        pipe.end()
            # tarfile stops at the end-of-archive marker: keep what follows (padding).
            while tee.read(CHUNK):
                pass
            tee.flush()
            out.truncate(tee.flushed)
    except tarfile.TarError as e:
        error = ExportError(f"the engine's export is not a readable tar archive: {e}")
        if tee is not None:
            tee.fail(error)
        spool.finish(error)
        raise error from e
    except BaseException as e:
        if tee is not None:
            tee.fail(e)
        spool.finish(e)
        raise
    spool.finish()
    return spool.written
