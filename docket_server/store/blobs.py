"""Content-addressed blob storage.

Blobs live at ``blobs/sha256/<2 hex>/<hex>``. A write goes to a temporary file under
``tmp/``, is hashed as it goes, fsynced, and renamed into place only when its bytes match the
digest and size it was announced with; so a blob whose bytes do not hash to its name never
appears under that name, whatever happens to the writer. Two writers of the same blob at once
both succeed: the first rename wins and the second finds the blob in place.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path

from docket_common.digest import hex_part
from docket_common.errors import Reason
from docket_common.torrent import PieceHasher
from docket_server.domain.errors import InvalidArgument, ResourceExhausted

READ_CHUNK = 1024 * 1024


class BlobWriter(ABC):
    """One blob being written: ``write`` chunks, then ``commit`` or ``abort``."""

    @abstractmethod
    async def write(self, chunk: bytes) -> None: ...

    @abstractmethod
    async def commit(self, digest: str) -> bytes:
        """Checks size and digest (the one given, or the one the writer was made with when
        that was empty), stores the blob; returns its torrent piece hashes."""

    @abstractmethod
    def content_digest(self) -> str:
        """The sha256 digest of the bytes written so far."""

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
    def writer(self, digest: str, size: int, piece_length: int) -> BlobWriter:
        """A writer for a blob of ``size`` bytes; ``digest`` may be "" until the commit."""

    @abstractmethod
    def read(self, digest: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def delete(self, digest: str) -> None: ...


class FilesystemBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

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

    def writer(self, digest: str, size: int, piece_length: int) -> BlobWriter:
        free = shutil.disk_usage(self.tmp_dir).free
        if size > free:
            raise ResourceExhausted(
                Reason.INSUFFICIENT_STORAGE,
                f"blob {digest or '(named later)'} is {size} bytes but the server has only "
                f"{free} bytes free",
                digest=digest,
                size_bytes=size,
                free_bytes=free,
            )
        return _FileBlobWriter(self, digest, size, piece_length)

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
    def __init__(self, store: FilesystemBlobStore, digest: str, size: int, piece_length: int):
        self._store = store
        self._digest = digest
        self._size = size
        self._written = 0
        self._sha256 = hashlib.sha256()
        self._pieces = PieceHasher(piece_length)
        fd, name = _mkstemp(store.tmp_dir, hex_part(digest) if digest else "upload")
        self._tmp = Path(name)
        self._fh = os.fdopen(fd, "wb")

    def _hash_sync(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        self._pieces.update(chunk)

    async def write(self, chunk: bytes) -> None:
        if self._written + len(chunk) > self._size:
            raise InvalidArgument(
                Reason.SIZE_MISMATCH,
                f"blob {self._digest or '(named later)'} is longer than the {self._size} bytes "
                "announced",
                digest=self._digest,
                expected=self._size,
                actual=f">{self._written + len(chunk) - 1}",
            )
        self._written += len(chunk)
        # hashlib and file writes release the GIL: off the event loop, in two threads, the
        # hashing and the write of a chunk run at once.
        await asyncio.gather(
            asyncio.to_thread(self._fh.write, chunk), asyncio.to_thread(self._hash_sync, chunk)
        )

    def _commit_sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        final = self._store.local_path(self._digest)
        if final.exists():
            # A concurrent upload of the same bytes got there first; its copy may already be
            # seeding, so keep that file rather than swapping the inode under the seeder.
            self._tmp.unlink()
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp.replace(final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def commit(self, digest: str) -> bytes:
        self._digest = digest or self._digest
        if self._written != self._size:
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
        await asyncio.to_thread(self._commit_sync)
        return self._pieces.pieces()

    def content_digest(self) -> str:
        return "sha256:" + self._sha256.hexdigest()

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)


def _mkstemp(directory: Path, prefix: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=prefix[:16] + ".", suffix=".part", dir=directory)
