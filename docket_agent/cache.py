"""The agent's blob cache: what it holds, what is in use, and what goes when space runs out.

Blobs live at ``blobs/sha256/<2 hex>/<hex>`` (the fetcher moves them there once verified).
Recency is the file's mtime, bumped whenever an order uses a blob. With ``--cache-max-bytes``
the least recently used blobs go first when a download needs room; a blob an order in flight
uses (pinned) never goes. With ``--min-free-bytes`` the same goes for the disk: a download
that would leave less free on the cache's filesystem (after evicting what may go) fails, up
front or as soon as it would while it runs, with the reason.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import structlog

from docket_agent.hostinfo import disk_free
from docket_common.digest import hex_part, sha256_digest
from docket_common.sizes import iec

log = structlog.get_logger()

EMPTY_DIGEST = sha256_digest(b"")


class CacheFullError(Exception):
    pass


@dataclass(frozen=True)
class CachedBlob:
    digest: str
    size: int
    used: float


class BlobCache:
    def __init__(
        self, root: Path, max_bytes: int = 0, min_free_bytes: int = 0, host: str = ""
    ) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.partial_dir = root / "partial"
        self.torrent_dir = root / "torrents"
        self.torrent_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.host = host or "this host"
        self._pins: Counter[str] = Counter()
        self.evictions = 0  # blobs evicted to make room, since the start (metrics)

    def path(self, digest: str) -> Path:
        hexd = hex_part(digest)
        return self.blob_dir / hexd[:2] / hexd

    def torrent_path(self, digest: str) -> Path:
        return self.torrent_dir / f"{hex_part(digest)}.torrent"

    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def put_empty(self, digest: str) -> None:
        """Caches the empty blob, which has no torrent to fetch it with."""
        if digest != EMPTY_DIGEST:
            raise ValueError(f"{digest} is not the digest of no bytes")
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def touch(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(digest))

    def pin(self, digest: str) -> None:
        self._pins[digest] += 1

    def shared(self, digest: str) -> bool:
        """True when more than one order in flight uses the blob."""
        return self._pins[digest] > 1

    def unpin(self, digest: str) -> None:
        self._pins[digest] -= 1
        if self._pins[digest] <= 0:
            del self._pins[digest]

    def blobs(self) -> list[CachedBlob]:
        found: list[CachedBlob] = []
        if not self.blob_dir.is_dir():
            return found
        for path in self.blob_dir.glob("??/*"):
            if len(path.name) != 64:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found.append(CachedBlob(f"sha256:{path.name}", st.st_size, st.st_mtime))
        return found

    def make_room(self, needed: int) -> list[str]:
        """Evicts least recently used unpinned blobs until ``needed`` more bytes fit.

        Returns the evicted digests (the caller stops seeding them). Raises CacheFullError
        when even evicting every unpinned blob is not enough.
        """
        if not self.max_bytes:
            return []
        blobs = sorted(self.blobs(), key=lambda b: b.used)
        used = sum(b.size for b in blobs)
        pinned = sum(b.size for b in blobs if b.digest in self._pins)
        if pinned + needed > self.max_bytes:
            raise CacheFullError(
                f"the cache holds {self.max_bytes} bytes at most; {needed} more do not fit "
                f"beside the {pinned} bytes in use"
            )
        evicted: list[str] = []
        for blob in blobs:
            if used + needed <= self.max_bytes:
                break
            if blob.digest in self._pins:
                continue
            self._evict(blob, "the cache's limit")
            used -= blob.size
            evicted.append(blob.digest)
        return evicted

    def _evict(self, blob: CachedBlob, why: str) -> None:
        self.path(blob.digest).unlink(missing_ok=True)
        self.torrent_path(blob.digest).unlink(missing_ok=True)
        self.evictions += 1
        log.info("evicted from cache", digest=blob.digest, size_bytes=blob.size, to_keep=why)

    # The disk

    def free_bytes(self) -> int:
        return disk_free(self.root)

    def partial_bytes(self, digest: str) -> int:
        """Disk already taken by a partial download of the blob (resumed, not taken again)."""
        hexd = hex_part(digest)
        try:
            return (self.partial_dir / hexd[:2] / hexd).stat().st_blocks * 512
        except FileNotFoundError:
            return 0

    def make_disk_room(self, blobs: list[tuple[str, int]]) -> list[str]:
        """Evicts least recently used unpinned blobs until downloading ``blobs`` (digest,
        size) leaves the reserve free on the disk; returns the evicted digests. Raises
        CacheFullError, naming the host, when evicting every unpinned blob is not enough."""
        needed = sum(max(size - self.partial_bytes(d), 0) for d, size in blobs)
        free = self.free_bytes()
        if free - needed >= self.min_free_bytes:
            return []
        evictable = sorted(
            (b for b in self.blobs() if b.digest not in self._pins), key=lambda b: b.used
        )
        if free + sum(b.size for b in evictable) - needed < self.min_free_bytes:
            raise self._disk_error(free, needed)
        evicted: list[str] = []
        for blob in evictable:
            if self.free_bytes() - needed >= self.min_free_bytes:
                break
            self._evict(blob, "the free-disk reserve")
            evicted.append(blob.digest)
        return evicted

    def check_disk(self, remaining: int) -> None:
        """CacheFullError when the ``remaining`` bytes of the downloads under way would leave
        less than the reserve free (something else filled the disk meanwhile)."""
        free = self.free_bytes()
        if free - remaining < self.min_free_bytes:
            raise self._disk_error(free, remaining)

    def _disk_error(self, free: int, needed: int) -> CacheFullError:
        return CacheFullError(
            f"not enough disk on {self.host}: {iec(needed)} more needed for the cache "
            f"({self.root}), {iec(free)} free, {iec(self.min_free_bytes)} kept in reserve "
            "(--min-free-bytes)"
        )
