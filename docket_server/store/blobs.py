"""Content-addressed blob storage.

Blobs live at ``blobs/sha256/<2 hex>/<hex>``. A write goes to a temporary file under
``tmp/``, is hashed as it goes, fsynced, and renamed into place only when its bytes match the
digest and size it was announced with; so a blob whose bytes do not hash to its name never
appears under that name, whatever happens to the writer. Two writers of the same blob at once
both succeed: the first rename wins and the second finds the blob in place.

The store keeps a reserve of free disk (``min_free_bytes``): a writer is refused up front when
the blob's known size would eat into it, and stopped as soon as a write would (a chunked
upload of unknown size), with INSUFFICIENT_STORAGE; its temporary file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from docket_common.digest import hex_part
from docket_common.errors import Reason
from docket_common.sizes import iec
from docket_common.torrent import PieceHasher, piece_length_for
from docket_server.domain.errors import InvalidArgument, ResourceExhausted

READ_CHUNK = 1024 * 1024
DIRECT_ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffers aligned to the block size
STAGE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    """A blob file in the store, as found on disk."""

    digest: str
    size: int
    modify_time: float  # seconds since the epoch


class BlobWriter(ABC):
    """One blob being written: ``write`` chunks, then ``commit`` or ``abort``."""

    @abstractmethod
    async def write(self, chunk: bytes) -> None: ...

    @abstractmethod
    async def commit(self, digest: str) -> tuple[int, bytes]:
        """Checks size and digest (the one given, or the one the writer was made with when
        that was empty), stores the blob; returns its torrent's piece length and piece
        hashes."""

    @abstractmethod
    def content_digest(self) -> str:
        """The sha256 digest of the bytes written so far."""

    @property
    @abstractmethod
    def written(self) -> int:
        """How many bytes were written so far."""

    @abstractmethod
    def abort(self) -> None:
        """Drops what was written. Synchronous and quick, so a cancelled task can run it."""


class BlobStore(ABC):
    """Where blob bytes live. The filesystem store is the one; object storage can be another."""

    @abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abstractmethod
    def local_path(self, digest: str) -> Path:
        """A local file holding the blob, which the seeder shares over BitTorrent."""

    @abstractmethod
    def writer(self, digest: str, size: int, size_hint: int = 0) -> BlobWriter:
        """A writer for a blob of ``size`` bytes (-1: not known until the commit, as in a
        chunked registry upload, where ``size_hint`` may guess it); ``digest`` may be ""
        until the commit."""

    @abstractmethod
    def read(self, digest: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def delete(self, digest: str) -> None: ...

    @abstractmethod
    def check_space(self, needed: int, digest: str = "", written: int = -1) -> None:
        """INSUFFICIENT_STORAGE unless ``needed`` more bytes leave the reserve free.
        ``written`` (bytes of the blob already written) says the blob is under way."""

    @abstractmethod
    def stored(self) -> list[StoredFile]:
        """Every blob file in the store (blocking: call it in a thread). Garbage collection
        compares them with the blobs recorded, to find files a crash left without a record."""


class FilesystemBlobStore(BlobStore):
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"
        self.min_free_bytes = min_free_bytes
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        """Free bytes on the store's filesystem, as an unprivileged writer may use them."""
        st = os.statvfs(self.tmp_dir)
        return st.f_bavail * st.f_frsize

    def check_space(self, needed: int, digest: str = "", written: int = -1) -> None:
        free = self.free_bytes()
        if free - needed >= self.min_free_bytes:
            return
        name = digest or "(named later)"
        reserve = f"{iec(self.min_free_bytes)} kept in reserve (--min-free-bytes)"
        if written < 0:
            of = f" of {iec(needed)}" if needed > 0 else ""
            message = (
                f"not enough disk on the server for blob {name}{of}: {iec(free)} free, {reserve}"
            )
        else:
            message = (
                f"not enough disk on the server for blob {name}: stopped after {iec(written)}, "
                f"as {iec(needed)} more would leave less than the {reserve}; {iec(free)} free"
            )
        raise ResourceExhausted(
            Reason.INSUFFICIENT_STORAGE,
            message,
            digest=digest,
            size_bytes=needed,
            free_bytes=free,
            reserved_bytes=self.min_free_bytes,
        )

    def stored(self) -> list[StoredFile]:
        found = []
        for sub in self.blob_dir.iterdir():
            if not sub.is_dir():
                continue
            for entry in sub.iterdir():
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # deleted meanwhile
                if entry.is_file():
                    found.append(StoredFile(f"sha256:{entry.name}", st.st_size, st.st_mtime))
        return found

    def clean_temporary(self) -> int:
        """Removes what interrupted writes left behind; run at start-up, before serving."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def local_path(self, digest: str) -> Path:
        hexd = hex_part(digest)
        return self.blob_dir / hexd[:2] / hexd

    def exists(self, digest: str) -> bool:
        return self.local_path(digest).is_file()

    def writer(self, digest: str, size: int, size_hint: int = 0) -> BlobWriter:
        self.check_space(max(size, size_hint), digest)
        return _FileBlobWriter(self, digest, size, size_hint)

    async def read(self, digest: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        path = self.local_path(digest)
        fh = await asyncio.to_thread(path.open, "rb")
        try:
            await asyncio.to_thread(fh.seek, offset)
            remaining = length if length > 0 else None
            while remaining is None or remaining > 0:
                want = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                chunk = await asyncio.to_thread(fh.read, want)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            fh.close()

    async def delete(self, digest: str) -> None:
        await asyncio.to_thread(self.local_path(digest).unlink, True)


class _FileBlobWriter(BlobWriter):
    """Hashes (sha256, and SHA-1 per torrent piece) in the same pass as it writes.

    When the size is not known up front (a chunked registry upload, as `docker push` sends
    layers), the pieces are hashed at the piece length of the size hint. A blob that outgrows
    it has its pieces hashed by a follower thread at a longer piece length (that of four
    times the bytes so far, so that few restarts are needed), from the file's start and then
    behind the writes, so that little is left to hash at the commit. Only when the final size
    wants yet another piece length are the pieces hashed again at the commit.
    """

    def __init__(self, store: FilesystemBlobStore, digest: str, size: int, size_hint: int = 0):
        self._store = store
        self._digest = digest
        self._size = size
        self._written = 0
        self._sha256 = hashlib.sha256()
        self._pieces = PieceHasher(piece_length_for(size if size >= 0 else size_hint))
        self._pieces_valid = True
        fd, name = _mkstemp(store.tmp_dir, hex_part(digest) if digest else "upload")
        self._tmp = Path(name)
        self._file = DirectFile(fd)
        self._follower: _PieceFollower | None = None

    @property
    def written(self) -> int:
        return self._written

    def _hash_sync(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        if self._pieces_valid:
            self._pieces.update(chunk)

    async def write(self, chunk: bytes) -> None:
        if self._size >= 0 and self._written + len(chunk) > self._size:
            raise InvalidArgument(
                Reason.SIZE_MISMATCH,
                f"blob {self._digest or '(named later)'} is longer than the {self._size} bytes "
                "announced",
                digest=self._digest,
                expected=self._size,
                actual=f">{self._written + len(chunk) - 1}",
            )
        # What is still to come counts when it is known: a push stops at its first chunk
        # once another one has taken the room it was let in with.
        remaining = self._size - self._written if self._size >= 0 else len(chunk)
        self._store.check_space(remaining, self._digest, self._written)
        self._written += len(chunk)
        if self._pieces_valid and piece_length_for(self._written) > self._pieces.piece_length:
            self._pieces_valid = False  # outgrown: the follower takes over
        # hashlib and file writes release the GIL: off the event loop, in two threads, the
        # hashing and the write of a chunk run at once.
        try:
            await asyncio.gather(
                asyncio.to_thread(self._file.write, chunk),
                asyncio.to_thread(self._hash_sync, chunk),
            )
            if not self._pieces_valid:
                await self._follow()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ResourceExhausted(
                    Reason.INSUFFICIENT_STORAGE,
                    f"the server's disk is full after {iec(self._written)} of blob "
                    f"{self._digest or '(named later)'} (raise --min-free-bytes to refuse "
                    "uploads before it fills)",
                    digest=self._digest,
                ) from e
            raise

    async def _follow(self) -> None:
        follower = self._follower
        if follower is None or piece_length_for(self._written) > follower.piece_length:
            if follower is not None:
                await asyncio.to_thread(follower.stop)
            follower = _PieceFollower(self._tmp, piece_length_for(4 * self._written))
            self._follower = follower
        follower.advance(self._file.flushed)

    def _commit_sync(self) -> bytes:
        self._file.finish()
        self._file.close()
        length = piece_length_for(self._written)
        follower, self._follower = self._follower, None
        if self._pieces_valid and self._pieces.piece_length == length:
            pieces = self._pieces.pieces()
        elif follower is not None and follower.piece_length == length:
            pieces = follower.finish(self._written)
        else:
            pieces = self._hash_pieces_again()
        if follower is not None:
            follower.stop()
        final = self._store.local_path(self._digest)
        if final.exists():
            # A concurrent upload of the same bytes got there first; its copy may already be
            # seeding, so keep that file rather than swapping the inode under the seeder.
            self._tmp.unlink()
            return pieces
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp.replace(final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return pieces

    def _hash_pieces_again(self) -> bytes:
        hasher = PieceHasher(piece_length_for(self._written))
        with self._tmp.open("rb") as fh:
            while chunk := fh.read(READ_CHUNK * 4):
                hasher.update(chunk)
        return hasher.pieces()

    async def commit(self, digest: str) -> tuple[int, bytes]:
        self._digest = digest or self._digest
        if self._size >= 0 and self._written != self._size:
            raise InvalidArgument(
                Reason.SIZE_MISMATCH,
                f"blob {self._digest} ended after {self._written} of the {self._size} bytes "
                "announced",
                digest=self._digest,
                expected=self._size,
                actual=self._written,
            )
        actual = self.content_digest()
        if actual != self._digest:
            raise InvalidArgument(
                Reason.DIGEST_MISMATCH,
                f"the uploaded bytes hash to {actual}, not {self._digest}",
                expected=self._digest,
                actual=actual,
            )
        pieces = await asyncio.to_thread(self._commit_sync)
        return piece_length_for(self._written), pieces

    def content_digest(self) -> str:
        return "sha256:" + self._sha256.hexdigest()

    def abort(self) -> None:
        try:
            if self._follower is not None:
                self._follower.stop()
                self._follower = None
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)


class _PieceFollower:
    """A thread hashing a growing file's torrent pieces from its start, reading only as far
    as the file has been written (``advance``)."""

    def __init__(self, path: Path, piece_length: int) -> None:
        self.piece_length = piece_length
        self._hasher = PieceHasher(piece_length)
        self._fd = os.open(path, os.O_RDONLY)
        self._done = 0
        self._limit = 0
        self._final = False
        self._stopped = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="piece-follower", daemon=True)
        self._thread.start()

    def advance(self, limit: int) -> None:
        with self._cond:
            if limit > self._limit:
                self._limit = limit
                self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._done >= self._limit and not (self._final or self._stopped):
                        self._cond.wait()
                    if self._stopped or self._done >= self._limit:
                        return
                    limit = self._limit
                chunk = _read_at(self._fd, min(READ_CHUNK * 4, limit - self._done), self._done)
                self._hasher.update(chunk)
                self._done += len(chunk)
        except BaseException as e:  # handed to finish()
            self._error = e
        finally:
            os.close(self._fd)

    def finish(self, size: int) -> bytes:
        """The piece hashes of the whole file of ``size`` bytes (blocking)."""
        with self._cond:
            self._limit = size
            self._final = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._done != size:
            raise OSError(f"hashed {self._done} of {size} bytes")
        return self._hasher.pieces()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()


class DirectFile:
    """A file written front to back, with O_DIRECT where the filesystem takes it.

    Through the page cache, writing a GiB cost 2.1 s of CPU on these machines (the largest
    single cost of taking in a push); with O_DIRECT it cost 0.1 s. Writes are gathered in an
    aligned buffer and go out a MiB at a time; the tail is padded to the block size, written,
    and cut back to the real size. Where O_DIRECT is refused (tmpfs), writes go through the
    page cache as usual.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self.flushed = 0  # bytes of data in the file so far (not in the staging buffer)
        self.direct = _set_direct(fd, True)
        self._stage = mmap.mmap(-1, STAGE_BYTES) if self.direct else None
        self._filled = 0
        # close() may come (an aborted upload) while a thread writes: the descriptor is then
        # closed by that thread when it is done, never under it (its number could be reused
        # by the next upload's file, which the late write would corrupt).
        self._lock = threading.Lock()
        self._busy = False
        self._closed = False

    def write(self, data: bytes) -> None:
        with self._using():
            self._write(data)

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise ValueError("write to a closed blob file")
            self._busy = True
        try:
            yield
        finally:
            with self._lock:
                self._busy = False
                if self._closed:
                    self._release()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        self.size += len(view)
        while view:
            if self._stage is None:
                written = os.write(self.fd, view)
                view = view[written:]
                self.flushed += written
                continue
            n = min(len(view), STAGE_BYTES - self._filled)
            self._stage[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == STAGE_BYTES:
                self._flush_stage(STAGE_BYTES)

    def _flush_stage(self, length: int) -> None:
        assert self._stage is not None
        out = memoryview(self._stage)[:length]
        try:
            while out:
                written = os.write(self.fd, out)
                out = out[written:]
                if out and written % DIRECT_ALIGN:  # cannot go on aligned: finish buffered
                    self._buffered()
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct:
                raise
            self._buffered()  # the filesystem took the flag but not the writes
            while out:
                out = out[os.write(self.fd, out) :]
        self.flushed = min(self.flushed + length, self.size)
        self._filled = 0

    def _buffered(self) -> None:
        _set_direct(self.fd, False)
        self.direct = False

    def finish(self) -> None:
        """Writes what is staged, trims the padding, and syncs the file to disk. A blob is
        read soon after its push (its first rollout): the kernel is asked to read it back
        into the page cache, by DMA, off this CPU (without it, the first rollout after a
        push took 0.1 s longer at N=8)."""
        with self._using():
            self._finish()

    def _finish(self) -> None:
        if self._stage is not None and self._filled:
            padded = -(-self._filled // DIRECT_ALIGN) * DIRECT_ALIGN
            self._stage[self._filled : padded] = bytes(padded - self._filled)
            self._flush_stage(padded if self.direct else self._filled)
            os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)
        if self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        """Closes the file now, or, if a thread is writing, as soon as it is done."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._busy:
                self._release()

    def _release(self) -> None:
        os.close(self.fd)
        if self._stage is not None:
            self._stage.close()


def _read_at(fd: int, length: int, offset: int) -> bytes:
    chunk = os.pread(fd, length, offset)
    if not chunk:
        raise OSError(f"the blob file ended at {offset} bytes, before the bytes written")
    return chunk


def _set_direct(fd: int, on: bool) -> bool:
    """Turns O_DIRECT on or off for ``fd``; whether it is on."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | direct) if on else (flags & ~direct))
    except OSError:
        return False
    return on


def _mkstemp(directory: Path, prefix: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=prefix[:16] + ".", suffix=".part", dir=directory)
