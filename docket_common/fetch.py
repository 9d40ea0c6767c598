"""Fetching blobs over BitTorrent: the agents' and `docketctl pull`'s side of the swarm.

A blob downloads into ``partial/<2 hex>/<hex>``; libtorrent checks every piece's SHA-1 as it
arrives. Its sha256 is computed as the pieces complete, in index order (``hashed_pieces``):
the run of pieces held from the start is read from the file once libtorrent has flushed them
(it checks a piece before its disk threads write it) and fed to the hash in a thread, so when
the last piece is in, the hash is too, with no pass over the file at the end. The hash's state
is saved next to the partial file every CHECKPOINT_BYTES (``<hex>.sha256``, see
resumable_sha256), so an agent restarted mid-download goes on from there. Only when the
sha256 matches is the blob moved (by libtorrent, which keeps seeding it) to the cache path
``blobs/sha256/<2 hex>/<hex>``:
a blob under its name is always the right bytes. ``verified_piece`` hands out a piece only
once it is in the hash, and a blob's last piece only once the whole blob matched: a reader
streaming a blob while it downloads (a `docker load`, the registry face) never sends bytes
that the sha256 has not passed in full.

Pieces that BitTorrent does not deliver (the swarm stalls, the port is blocked) can be filled
in from any other source with ``fill_missing``: libtorrent checks them like any other piece.

In a rollout the server hands out the first copy of each piece to one agent
(``claim_first_pieces``, see docket_server/domain/first_pieces.py) and the agents trade the
rest; the server's seed is held back (``hold``) and dialled only once the server has no piece
left to hand out and no piece has come for ``SEED_AFTER`` seconds. When libtorrent closed a
peer as it became a seed (``LOST_SEED``), the pieces no connected peer holds are fetched from
the server over gRPC at the next tick.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import libtorrent as lt
import structlog

from docket_common.aio import wait_event
from docket_common.bt import ALERT_MASK, TorrentSession, split_host_port
from docket_common.digest import hex_part
from docket_common.resumable_sha256 import ResumableSha256
from docket_common.resumable_sha256 import available as resumable_available

log = structlog.get_logger()

SERVER_CLIENT = "docket-server"
SEED_AFTER = 1.0  # seconds without a piece, once first pieces ran out, before dialling the seed
READ_RETRY = 5.0  # seconds before a piece read libtorrent has not answered is asked again
READ_ATTEMPTS = 12
CLAIM_WORKERS = 2  # ClaimFirstPieces calls in flight per blob, at first
MAX_CLAIM_WORKERS = int(os.environ.get("DOCKET_MAX_CLAIM_WORKERS", "6"))  # on a fast link
CLAIM_SECONDS = 0.1  # aim for claims that take this long: small enough to pass pieces on soon
MIN_CLAIM_BYTES = 64 << 10
MAX_CLAIM_BYTES = 2 << 20
# Ask peers for the lowest pieces first (libtorrent's sequential_download), not the rarest:
# the server hands out first pieces in index order, one stripe to each host, so the swarm
# still has every host holding pieces the others lack, while each host's pieces arrive near
# enough in order for the in-order sha256 and a `docker load` fed from it to keep up.
PIECE_ORDERS = ("sequential", "rarest-first")
# A new torrent is resumed when libtorrent says it is set up, or after this long at most.
RESUME_WAIT = 0.2
# A peer expected to dial this host (a hint) is dialled back only this long after the
# resume, or after the hint if that came later: by then its own dial is through the TLS and
# BitTorrent handshakes, and libtorrent skips a peer it is connected to. libtorrent's own
# next connect round came 10-130 ms after the resume at 8 hosts, while a handshake took up
# to 130 ms on this busy 2-core machine, and two crossing dials can leave no connection.
ANSWER_DELAY = 0.5
# Why libtorrent closes a connection to a peer that has become a seed while this host is not
# interested in it. libtorrent 2.x (peer_connection::incoming_have) checks whether a peer is
# redundant as soon as its HAVE makes it a seed, before it updates its interest for the piece
# in that HAVE: a host that lacks exactly the piece the other host finished with closes the
# connection to the only peers that have it. In a small swarm the last piece to spread is
# often everyone's last, and every holder is closed in turn; libtorrent dials them again only
# after min_reconnect_time, in its connect round, which comes once a second. Seen with 8 hosts
# and a 1 MiB blob in 5 of 15 rollouts: up to 6 hosts that lacked one piece each closed every
# peer that got it and waited for the server's seed (SEED_AFTER): the last piece came at
# 2.4-3.3 s, against 0.7-1.8 s. After such a close, ``follow`` fetches the pieces no connected
# peer holds from the server over gRPC (``orphan_pieces``) at its next tick.
LOST_SEED = "uninteresting upload-only peer"
HASH_BATCH = 4 << 20  # the in-order hash reads the file in runs of at least this many bytes,
HASH_WAIT = 0.1  # or of what came in this many seconds
CHECKPOINT_BYTES = 16 << 20  # the in-order hash's state is saved this often

# (digest, max_bytes) -> [(piece index, bytes)]; no pieces when the server has none left.
ClaimPieces = Callable[[str, int], Awaitable[list[tuple[int, bytes]]]]


class FetchError(Exception):
    """A blob could not be fetched or failed its checks; str() is one line."""


class DigestMismatchError(FetchError):
    """A blob's bytes, every piece checked, do not hash to its digest: it was discarded."""


class BlobGoneError(FetchError):
    """The server no longer has the blob (its image was deleted): waiting cannot help."""


@dataclass(frozen=True)
class BlobSpec:
    digest: str
    size: int
    metainfo: bytes
    media_type: str = ""


@dataclass
class BlobDownload:
    """One blob in flight."""

    spec: BlobSpec
    handle: Any
    piece_count: int
    piece_length: int
    new_pieces: list[int] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None
    hash_failures: int = 0
    fallback_bytes: int = 0
    # Payload bytes received from each peer (endpoint), the most seen while connected.
    peer_bytes: dict[str, int] = field(default_factory=dict)
    server_endpoints: set[str] = field(default_factory=set)
    completion: asyncio.Future[Path] | None = None
    # Bytes of pieces the server handed out first (ClaimFirstPieces).
    first_piece_bytes: int = 0
    first_pieces: asyncio.Future[None] | None = None
    first_pieces_ended: float | None = None  # monotonic time the server ran out of pieces
    last_piece_time: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    first_piece_time: float | None = None  # monotonic time the first piece was in
    seed_released: float | None = None  # monotonic time the held-back peers were dialled
    lost_seeds: int = 0  # peers closed by libtorrent as they became seeds (LOST_SEED)
    lost_seeds_seen: int = 0  # ... of which ``follow`` has looked for orphaned pieces
    orphan_bytes: int = 0  # bytes of pieces fetched from the server after a LOST_SEED
    claim_workers: int = 0  # the most ClaimFirstPieces calls that were in flight at once
    first_claim: tuple[float, float] | None = None  # the first claim's call and answer
    # Peers dialled only once first pieces ran out and peers stopped delivering: the seed.
    held_peers: list[str] = field(default_factory=list)
    # Peers expected to dial this host, dialled only after the resume (BlobFetcher.answer).
    answer_peers: list[str] = field(default_factory=list)
    resumed: bool = False  # the torrent was added paused; resumed once libtorrent set it up
    # Connections to peers that ended while it was in flight, by why (for the log).
    disconnects: dict[str, int] = field(default_factory=dict)
    resume_timer: asyncio.TimerHandle | None = None
    answer_timers: list[asyncio.TimerHandle] = field(default_factory=list)
    # Set (and replaced) whenever a piece arrives or the download ends: what readers of its
    # pieces wait on (wait_for_piece).
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Pieces known held (from piece_finished alerts, or asked of libtorrent once): asking
    # libtorrent is a round trip to its network thread.
    held: set[int] = field(default_factory=set)
    deadlines: set[int] = field(default_factory=set)  # pieces given a deadline (prioritize)
    # The in-order sha256: pieces 0 .. hashed_pieces-1 are in it; ``sha256`` ends with the
    # blob's digest ("sha256:<hex>") once every piece is in; ``hashed`` is set (and replaced)
    # whenever hashed_pieces grows or the hash ends.
    hashed_pieces: int = 0
    sha256: asyncio.Task[str] | None = None
    hashed: asyncio.Event = field(default_factory=asyncio.Event)
    _status: Any = None

    def __post_init__(self) -> None:
        self._status = self.handle.status()

    def take_new_pieces(self) -> list[int]:
        pieces, self.new_pieces = self.new_pieces, []
        return pieces

    def status(self) -> Any:
        """libtorrent's status; the last one seen once the torrent is removed."""
        # (a handle valid when asked can be gone when used: its removal is libtorrent's, on
        # its own thread, so both are asked, and "invalid torrent handle" taken as gone)
        if self.handle.is_valid():
            with contextlib.suppress(RuntimeError):
                self._status = self.handle.status()
        return self._status

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def notify_hashed(self) -> None:
        hashed, self.hashed = self.hashed, asyncio.Event()
        hashed.set()

    def held_pieces(self) -> list[int]:
        """The pieces libtorrent holds, asked of it once (and remembered in ``held``)."""
        if self.handle.is_valid():
            pieces = self.handle.status(lt.status_flags_t.query_pieces).pieces
            self.held.update(i for i, have in enumerate(pieces) if have)
        return sorted(self.held)

    def missing_pieces(self) -> list[int]:
        return [i for i in range(self.piece_count) if not self.handle.have_piece(i)]

    def sample_peers(self) -> set[str]:
        """Updates peer_bytes from the connected peers; returns their endpoints."""
        if not self.handle.is_valid():
            return set()
        try:
            peers = self.handle.get_peer_info()
        except RuntimeError:  # removed meanwhile (an order failing drops its downloads)
            return set()
        connected: set[str] = set()
        for peer in peers:
            ip, port = peer.ip
            endpoint = f"{ip}:{port}"
            connected.add(endpoint)
            self.peer_bytes[endpoint] = max(self.peer_bytes.get(endpoint, 0), peer.total_download)
            client = peer.client
            if isinstance(client, bytes):
                client = client.decode(errors="replace")
            if client.startswith(SERVER_CLIENT):
                self.server_endpoints.add(endpoint)
        return connected

    @property
    def bittorrent_bytes(self) -> int:
        """Payload bytes received over BitTorrent, from every peer, for this blob."""
        return int(self.status().total_payload_download)

    @property
    def server_bytes(self) -> int:
        return sum(b for e, b in self.peer_bytes.items() if e in self.server_endpoints)

    def timeline(self) -> dict[str, object]:
        """When things happened, in seconds since the download started: for the log."""

        def since(t: float | None) -> float | None:
            return None if t is None else round(t - self.started, 3)

        return {
            "digest": self.spec.digest,
            "bytes": self.spec.size,
            "first_piece_s": since(self.first_piece_time),
            "last_piece_s": since(self.last_piece_time),
            "first_pieces_ended_s": since(self.first_pieces_ended),
            "seed_dialled_s": since(self.seed_released),
            "lost_seeds": self.lost_seeds,
            "orphan_bytes": self.orphan_bytes,
            "first_piece_bytes": self.first_piece_bytes,
            "claim_workers": self.claim_workers,
            "first_claim_s": None
            if self.first_claim is None
            else [since(self.first_claim[0]), since(self.first_claim[1])],
            "bittorrent_bytes": self.bittorrent_bytes,
            "disconnects": dict(self.disconnects),
        }


def _ask_for_piece(download: BlobDownload, index: int) -> None:
    """Asks libtorrent to read a piece (answered by a read_piece_alert); FetchError when the
    download was dropped meanwhile (its handle is no longer valid: a failed or cancelled
    order, while the registry face still streams it)."""
    try:
        download.handle.read_piece(index)
    except RuntimeError as e:  # libtorrent: "invalid torrent handle used"
        raise FetchError(f"the download of {download.spec.digest} was dropped") from e


class BlobFetcher(TorrentSession):
    """A libtorrent session that fetches blobs into a cache directory and seeds them."""

    # Its peers' connections too: why they end is counted (peer_disconnects).
    ALERTS = ALERT_MASK | lt.alert.category_t.connect_notification

    def __init__(
        self,
        listen: str,
        root: Path,
        *,
        user_agent: str,
        download_rate_limit: int = 0,
        upload_rate_limit: int = 0,
        piece_order: str = "sequential",
    ) -> None:
        if piece_order not in PIECE_ORDERS:
            raise ValueError(f"piece order {piece_order!r} is not one of {PIECE_ORDERS}")
        self.piece_order = piece_order
        super().__init__(
            listen,
            user_agent=user_agent,
            download_rate_limit=download_rate_limit,
            upload_rate_limit=upload_rate_limit,
        )
        self.blob_dir = root / "blobs" / "sha256"
        self.partial_dir = root / "partial"
        self._downloads: dict[str, BlobDownload] = {}
        self._seeding: dict[str, Any] = {}
        self._moves: dict[str, asyncio.Future[None]] = {}
        self._flushes: dict[str, asyncio.Future[None]] = {}
        self._reads: dict[tuple[str, int], list[asyncio.Future[bytes]]] = {}
        self.hash_failed_pieces = 0  # pieces peers sent that failed their hash (metrics)
        # Connections to peers that ended, by why (the error libtorrent gives), for metrics.
        self.peer_disconnects: Counter[str] = Counter()

    @property
    def downloads_in_flight(self) -> int:
        """How many blobs are being fetched now."""
        return len(self._downloads)

    def in_flight(self, digest: str) -> BlobDownload | None:
        """The download of a blob, while it is being fetched (not once it is cached)."""
        return self._downloads.get(digest)

    async def wait_for_piece(self, download: BlobDownload, index: int) -> None:
        """Waits until libtorrent holds the piece, checked against its SHA-1; FetchError when
        the download ends without it (failed, cancelled, dropped)."""
        # ``held`` follows libtorrent's alerts (pieces finished, and those a check of the
        # file found); asking libtorrent itself is a round trip to its network thread, done
        # once here and again only when the download has ended.
        ask = True
        while index not in download.held:
            if ask and download.handle.is_valid() and download.handle.have_piece(index):
                download.held.add(index)
                return
            if download.error is not None:
                raise FetchError(f"blob {download.spec.digest}: {download.error}")
            stopped = download.finished.is_set() and download.spec.digest not in self._downloads
            if stopped and (download.completion is None or not download.completion.done()):
                raise FetchError(f"blob {download.spec.digest}: the download stopped")
            if download.finished.is_set() and ask:  # asked once the download ended: not there
                raise FetchError(f"blob {download.spec.digest}: piece {index} did not come")
            changed = download.changed
            ask = download.finished.is_set()
            if not ask and index not in download.held:
                await changed.wait()

    def prioritize(self, download: BlobDownload, first: int, count: int) -> None:
        """Asks libtorrent for pieces first..first+count-1 before any other, in that order
        (deadlines 50 ms apart): what a reader streaming the blob needs next."""
        if not download.handle.is_valid():
            return
        for offset, index in enumerate(range(first, min(first + count, download.piece_count))):
            if index not in download.held and index not in download.deadlines:
                download.deadlines.add(index)
                download.handle.set_piece_deadline(index, 50 * offset)

    async def read_piece(self, download: BlobDownload, index: int) -> bytes:
        """A piece's bytes, once libtorrent holds it (checked): from its cache or the file.

        A read that libtorrent drops (one under way when the finished blob is moved into the
        cache) is asked for again, after READ_RETRY seconds at the latest."""
        await self.wait_for_piece(download, index)
        key = (hex_part(download.spec.digest), index)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        waiting = self._reads.setdefault(key, [])
        waiting.append(future)
        try:
            if len(waiting) == 1:
                _ask_for_piece(download, index)
            for _attempt in range(READ_ATTEMPTS):
                try:
                    async with asyncio.timeout(READ_RETRY):
                        return await asyncio.shield(future)
                except TimeoutError:
                    _ask_for_piece(download, index)
            raise FetchError(f"libtorrent did not read piece {index} of {download.spec.digest}")
        finally:
            if future in waiting:
                waiting.remove(future)
            # The list may be an answered one: a later read of the piece has its own.
            if not waiting and self._reads.get(key) is waiting:
                del self._reads[key]

    def blob_path(self, digest: str) -> Path:
        hexd = hex_part(digest)
        return self.blob_dir / hexd[:2] / hexd

    def partial_path(self, digest: str) -> Path:
        hexd = hex_part(digest)
        return self.partial_dir / hexd[:2] / hexd

    def download(
        self,
        spec: BlobSpec,
        peers: Iterable[str],
        hold: Iterable[str] = (),
        answer: Iterable[str] = (),
    ) -> BlobDownload:
        """Starts fetching a blob (or returns its fetch in flight) and dials the peers; the
        ``hold`` peers are dialled by ``follow`` once first pieces ran out (or at once, when
        none are claimed). The ``answer`` peers are expected to dial this host: they are
        dialled back only ANSWER_DELAY after the resume, by when their own dial is in (two
        hosts that dial each other at once can both lose both connections)."""
        current = self._downloads.get(spec.digest)
        if current is not None:
            self.add_peers(current, peers)
            self.answer(current, answer)
            self.hold(current, hold)
            return current
        info = lt.torrent_info(spec.metainfo)
        save_path = self.partial_path(spec.digest).parent
        save_path.mkdir(parents=True, exist_ok=True)
        params = lt.add_torrent_params()
        params.ti = info
        params.save_path = str(save_path)
        # Added paused and resumed once the peers are in: resuming connects to them at once.
        # Peers added to a running torrent wait for libtorrent's once-a-second connect round
        # (measured: 0.4-1 s before the first byte from a peer, at every rollout's start).
        # A resume dials at once only once libtorrent has set the torrent up: a new torrent
        # is set up within a millisecond or two, paused (torrent_checked_alert), and resumed
        # then; one with a partial file is checked only once resumed, so it is resumed at once.
        params.flags = (params.flags | lt.torrent_flags.paused) & ~lt.torrent_flags.auto_managed
        if self.piece_order == "sequential":
            params.flags |= lt.torrent_flags.sequential_download
        handle = self.add_torrent(params)
        download = BlobDownload(spec, handle, info.num_pieces(), info.piece_length())
        self._downloads[spec.digest] = download
        partial = self.partial_path(spec.digest).exists()
        self.add_peers(download, peers)
        self.hold(download, hold)
        self.answer(download, answer)
        if partial:
            self._resume(download)
        else:
            download.resume_timer = asyncio.get_running_loop().call_later(
                RESUME_WAIT, self._resume, download
            )
        download.sha256 = asyncio.ensure_future(self._hash_in_order(download))
        download.sha256.add_done_callback(lambda _task: download.notify_hashed())
        return download

    def checkpoint_path(self, digest: str) -> Path:
        path = self.partial_path(digest)
        return path.with_name(path.name + ".sha256")

    def _restore_hash(self, download: BlobDownload) -> tuple[ResumableSha256, int]:
        """The hash saved by an earlier run of this download, and how many pieces it has;
        a fresh hash when there is none (or it is unreadable, or of another piece size)."""
        path = self.checkpoint_path(download.spec.digest)
        if resumable_available():
            try:
                saved = json.loads(path.read_text())
                pieces = int(saved["pieces"])
                if saved["piece_length"] == download.piece_length and (
                    0 < pieces <= download.piece_count
                ):
                    sha = ResumableSha256(bytes.fromhex(saved["state"]))
                    log.info(
                        "going on with the sha256 saved before a restart",
                        digest=download.spec.digest,
                        pieces=pieces,
                    )
                    return sha, pieces
            except FileNotFoundError:
                pass
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring an unreadable saved sha256", path=str(path), error=str(e))
        return ResumableSha256(), 0

    def _save_hash(self, download: BlobDownload, sha: ResumableSha256) -> None:
        if not resumable_available():
            return
        path = self.checkpoint_path(download.spec.digest)
        tmp = path.with_name(path.name + ".tmp")
        state = {
            "pieces": download.hashed_pieces,
            "piece_length": download.piece_length,
            "state": sha.state().hex(),
        }
        try:
            tmp.write_text(json.dumps(state))
            tmp.replace(path)
        except OSError as e:  # a lost checkpoint only costs hashing again after a restart
            log.warning("cannot save the sha256 so far", path=str(path), error=str(e))

    async def _hash_in_order(self, download: BlobDownload) -> str:
        """Hashes the blob's pieces in index order as libtorrent gets them; its digest.

        libtorrent checks a piece's SHA-1 before its disk threads write it, so the file is
        read only up to the pieces held when libtorrent last said it had flushed them
        (``flush_cache``): in runs of at least HASH_BATCH bytes, or every HASH_WAIT seconds,
        hashed in a thread straight from the file (no copy through Python per piece)."""
        sha, download.hashed_pieces = self._restore_hash(download)
        saved_at = download.hashed_pieces
        length, size = download.piece_length, download.spec.size
        while download.hashed_pieces < download.piece_count:
            await self.wait_for_piece(download, download.hashed_pieces)
            end = self._held_prefix(download)
            if (end - download.hashed_pieces) * length < HASH_BATCH and end < download.piece_count:
                # Let a run gather: one flush for many pieces. Not past the last piece: the
                # blob's digest is what the order waits for then.
                await wait_event(download.finished, HASH_WAIT)
                end = self._held_prefix(download)
            await self._wait_for(self._flushes, download.spec.digest, download.handle.flush_cache)
            first, last = download.hashed_pieces * length, min(end * length, size)
            await asyncio.to_thread(
                _hash_file_range, self.partial_path(download.spec.digest), sha, first, last
            )
            download.hashed_pieces = end
            if (end - saved_at) * length >= CHECKPOINT_BYTES and end < download.piece_count:
                self._save_hash(download, sha)
                saved_at = end
            download.notify_hashed()
        return f"sha256:{sha.hexdigest()}"

    @staticmethod
    def _held_prefix(download: BlobDownload) -> int:
        """How many pieces from the start libtorrent holds without a gap."""
        end = download.hashed_pieces
        while end < download.piece_count and end in download.held:
            end += 1
        return end

    async def wait_hashed(self, download: BlobDownload, index: int) -> None:
        """Waits until piece ``index`` is in the blob's in-order sha256; FetchError when the
        download ends without it."""
        while download.hashed_pieces <= index:
            task = download.sha256
            if task is None:
                raise FetchError(f"blob {download.spec.digest} is not being hashed")
            if task.done():
                if task.cancelled():
                    raise FetchError(f"blob {download.spec.digest}: the download stopped")
                task.result()  # its FetchError, if it failed
                if download.hashed_pieces <= index:
                    raise FetchError(f"blob {download.spec.digest} has no piece {index}")
                return
            await download.hashed.wait()

    async def verified_piece(self, download: BlobDownload, index: int) -> bytes:
        """A piece's bytes once they are in the blob's sha256; the last piece only once the
        whole blob matched its digest (FetchError if it did not)."""
        await self.wait_hashed(download, index)
        data = await self.read_piece(download, index)
        if index == download.piece_count - 1:
            assert download.sha256 is not None
            await self.verified(download)
        return data

    async def verified(self, download: BlobDownload) -> None:
        """Waits for the in-order sha256 of every piece; FetchError unless it matches."""
        assert download.sha256 is not None
        try:
            actual = await asyncio.shield(download.sha256)
        except asyncio.CancelledError:
            if download.sha256.cancelled():
                raise FetchError(f"blob {download.spec.digest}: the download stopped") from None
            raise
        if actual != download.spec.digest:
            raise DigestMismatchError(
                f"blob {download.spec.digest} hashes to {actual} after download: discarded"
            )

    def answer(self, download: BlobDownload, peers: Iterable[str]) -> None:
        """Dials ``peers``, which are expected to dial this host, ANSWER_DELAY after the
        torrent's resume (or after now, if it is resumed): by then their own dial is in, and
        the dial back finds them connected; it still connects one whose dial failed (this
        host had not added the torrent yet). Two hosts that dial each other at once can both
        lose both connections (libtorrent 2.0's update_peer_port: each closes its incoming
        one as a duplicate of its outgoing one, and each incoming one is the other's
        outgoing one)."""
        if download.resumed:
            self._answer_later(download, list(peers))
        else:
            download.answer_peers += [p for p in peers if p not in download.answer_peers]

    def _answer_later(self, download: BlobDownload, peers: list[str]) -> None:
        if not peers or not download.handle.is_valid():
            return
        timer = asyncio.get_running_loop().call_later(
            ANSWER_DELAY, self._dial_answers, download, peers
        )
        download.answer_timers.append(timer)

    def _dial_answers(self, download: BlobDownload, peers: list[str]) -> None:
        if download.handle.is_valid():
            self.add_peers(download, peers)

    def _resume(self, download: BlobDownload) -> None:
        """Resumes a download's torrent (once): dials its peers at once, and the answers
        ANSWER_DELAY later."""
        if download.resumed:
            return
        download.resumed = True
        if download.resume_timer is not None:
            download.resume_timer.cancel()
        if not download.handle.is_valid():
            return
        download.handle.resume()
        self._answer_later(download, download.answer_peers)

    def hold(self, download: BlobDownload, peers: Iterable[str]) -> None:
        """Dials ``peers`` once the download's first pieces ran out (see ``follow``)."""
        if download.first_pieces is not None and download.first_pieces_ended is not None:
            self.add_peers(download, peers)  # first pieces already ran out
        else:
            download.held_peers += [p for p in peers if p not in download.held_peers]

    def claim_first_pieces(self, download: BlobDownload, claim: ClaimPieces) -> None:
        """Fetches the pieces the server hands out first, a few calls at a time, until it has
        none left (once per download, however many orders share it)."""
        if download.first_pieces is None:
            download.first_pieces = asyncio.ensure_future(self._first_pieces(download, claim))

    async def _first_pieces(self, download: BlobDownload, claim: ClaimPieces) -> None:
        workers: set[asyncio.Task[None]] = set()
        download.claim_workers = CLAIM_WORKERS

        async def worker() -> None:
            want = MIN_CLAIM_BYTES  # one piece first: it can be passed on soonest
            while not download.finished.is_set():
                started = time.monotonic()
                pieces = await claim(download.spec.digest, want)
                if download.first_claim is None:
                    download.first_claim = (started, time.monotonic())
                if not pieces:
                    return
                got = 0
                for index, data in pieces:
                    self._add_piece(download, index, data)
                    got += len(data)
                download.first_piece_bytes += got
                rate = got / max(time.monotonic() - started, 1e-3)
                want = min(max(int(rate * CLAIM_SECONDS), MIN_CLAIM_BYTES), MAX_CLAIM_BYTES)
                # The largest claims come back in under CLAIM_SECONDS: the link is faster
                # than calls one after another can fill (a 1 Gbit/s host alone): one more.
                if rate * CLAIM_SECONDS > MAX_CLAIM_BYTES and len(workers) < MAX_CLAIM_WORKERS:
                    workers.add(asyncio.ensure_future(worker()))
                    # Kept as it grows: the blob can be in, and its timeline logged, while
                    # the last claims (which come back empty) are still out.
                    download.claim_workers = max(download.claim_workers, len(workers))

        try:
            workers.update(asyncio.ensure_future(worker()) for _ in range(CLAIM_WORKERS))
            while workers:
                done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
                workers.difference_update(done)
                for task in done:
                    task.result()
        except BlobGoneError as e:  # nobody can deliver it any more
            download.error = str(e)
            download.finished.set()
        except Exception as e:  # the server or its answer failed: BitTorrent carries on alone
            log.warning(
                "the server's first pieces failed: fetching from peers and its seed",
                digest=download.spec.digest,
                error=str(e),
            )
            self.release_held(download)
        finally:
            for task in workers:
                task.cancel()
            download.first_pieces_ended = time.monotonic()

    def release_held(self, download: BlobDownload) -> None:
        """Dials the held-back peers now."""
        if download.held_peers and download.seed_released is None:
            download.seed_released = time.monotonic()
        held, download.held_peers = download.held_peers, []
        self.add_peers(download, held)

    def _add_piece(self, download: BlobDownload, index: int, data: bytes) -> None:
        """Hands a piece fetched outside BitTorrent to libtorrent, which checks its hash."""
        if not 0 <= index < download.piece_count:
            raise FetchError(f"piece {index} of {download.spec.digest} does not exist")
        length = min(download.piece_length, download.spec.size - index * download.piece_length)
        if len(data) != length:
            raise FetchError(
                f"piece {index} of {download.spec.digest} came with {len(data)} of {length} bytes"
            )
        if download.handle.is_valid():
            download.handle.add_piece(index, data, 0)

    def add_peers(self, download: BlobDownload, peers: Iterable[str]) -> None:
        for endpoint in peers:
            try:
                host, port = split_host_port(endpoint)
            except ValueError:
                log.warning("ignoring a malformed peer", peer=endpoint)
                continue
            download.handle.connect_peer((host, port))

    async def complete(self, download: BlobDownload) -> Path:
        """Waits for every piece, checks the sha256, moves the blob into the cache; its path.

        Several orders may wait on one blob: it is checked and moved once, for all of them.
        """
        if download.completion is None:
            download.completion = asyncio.ensure_future(self._complete(download))
        return await asyncio.shield(download.completion)

    async def _complete(self, download: BlobDownload) -> Path:
        await download.finished.wait()
        if download.error is not None:
            raise FetchError(f"blob {download.spec.digest}: {download.error}")
        digest = download.spec.digest
        assert download.sha256 is not None
        try:
            actual = await asyncio.shield(download.sha256)
        except (FetchError, OSError, TimeoutError) as e:
            actual = f"(not hashed in order: {e})"
        if actual != digest:
            # Hash the file itself before discarding it: a saved hash state that is wrong must
            # cost a pass over the blob, not the blob. libtorrent checks pieces in memory
            # before its disk threads write them: the file holds every byte once flushed.
            log.warning("the in-order sha256 does not match: hashing the file", digest=digest)
            await self._wait_for(self._flushes, digest, download.handle.flush_cache)
            actual = await asyncio.to_thread(_sha256_file, self.partial_path(digest))
            if actual != digest:
                self.drop(digest, delete_files=True)
                raise DigestMismatchError(
                    f"blob {digest} hashes to {actual} after download: discarded"
                )
        self.checkpoint_path(digest).unlink(missing_ok=True)
        final_dir = self.blob_path(digest).parent
        final_dir.mkdir(parents=True, exist_ok=True)
        await self._wait_for(
            self._moves,
            digest,
            lambda: download.handle.move_storage(
                str(final_dir), lt.move_flags_t.always_replace_files
            ),
        )
        del self._downloads[digest]
        self._seeding[digest] = download.handle
        return self.blob_path(digest)

    async def _wait_for(
        self, waiting: dict[str, asyncio.Future[None]], digest: str, start: Callable[[], None]
    ) -> None:
        """Starts a libtorrent operation and waits for the alert that says it is done."""
        done = asyncio.get_running_loop().create_future()
        waiting[hex_part(digest)] = done
        try:
            start()
            async with asyncio.timeout(60):
                await done
        finally:
            waiting.pop(hex_part(digest), None)

    def seed(self, spec: BlobSpec) -> None:
        """Seeds a blob already in the cache, without hashing it first."""
        if spec.digest in self._seeding or spec.digest in self._downloads:
            return
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(spec.metainfo)
        params.save_path = str(self.blob_path(spec.digest).parent)
        params.flags = (params.flags | lt.torrent_flags.seed_mode) & ~(
            lt.torrent_flags.auto_managed | lt.torrent_flags.paused
        )
        self._seeding[spec.digest] = self.add_torrent(params)

    def drop(self, digest: str, *, delete_files: bool = False) -> None:
        """Stops fetching or seeding a blob; with delete_files, removes a partial download."""
        handle = self._downloads.pop(digest, None) or self._seeding.pop(digest, None)
        if handle is None:
            return
        if isinstance(handle, BlobDownload):
            handle.resumed = True  # never: it is removed
            if handle.resume_timer is not None:
                handle.resume_timer.cancel()
            for timer in handle.answer_timers:
                timer.cancel()
            handle.error = handle.error or "dropped"
            handle.finished.set()
            handle.notify()
            if handle.first_pieces is not None:
                handle.first_pieces.cancel()
            if handle.sha256 is not None:
                handle.sha256.cancel()
            if delete_files:
                with contextlib.suppress(OSError):
                    self.checkpoint_path(digest).unlink(missing_ok=True)
            handle = handle.handle
        self.session.remove_torrent(handle, lt.options_t.delete_files if delete_files else 0)

    async def fill_missing(
        self,
        download: BlobDownload,
        read_range: Callable[[int, int], Awaitable[bytes]],
        pieces: Iterable[int] | None = None,
    ) -> int:
        """Fetches the pieces BitTorrent has not delivered (or those of ``pieces`` it has not)
        from ``read_range(offset, length)`` and hands them to libtorrent, which checks them.
        Returns the bytes fetched."""
        fetched = 0
        size = download.spec.size
        for piece in download.missing_pieces() if pieces is None else pieces:
            if download.finished.is_set():
                break
            if download.handle.have_piece(piece):  # BitTorrent brought it meanwhile
                continue
            offset = piece * download.piece_length
            length = min(download.piece_length, size - offset)
            data = await read_range(offset, length)
            self._add_piece(download, piece, data)
            fetched += length
        download.fallback_bytes += fetched
        return fetched

    def orphan_pieces(self, download: BlobDownload) -> list[int]:
        """The pieces the download lacks that no connected peer holds (two questions to
        libtorrent: its peers, and the pieces it holds)."""
        if not download.handle.is_valid():
            return []
        try:
            peers = download.handle.get_peer_info()
            held = set(download.held_pieces())
        except RuntimeError:  # removed meanwhile
            return []
        offered: set[int] = set()
        for peer in peers:
            offered.update(i for i, has in enumerate(peer.pieces) if has)
        return [i for i in range(download.piece_count) if i not in held and i not in offered]

    def on_alert(self, alert: Any) -> None:
        name = getattr(alert, "torrent_name", "")
        download = self._downloads.get(f"sha256:{name}") if name else None
        if isinstance(alert, lt.piece_finished_alert):
            if download is not None:
                download.new_pieces.append(int(alert.piece_index))
                download.held.add(int(alert.piece_index))
                download.last_piece_time = time.monotonic()
                if download.first_piece_time is None:
                    download.first_piece_time = download.last_piece_time
                download.notify()
        elif isinstance(alert, lt.torrent_checked_alert):
            if download is not None:
                self._resume(download)  # set up: a resume now dials the peers at once
                download.held_pieces()
                download.notify()
        elif isinstance(alert, lt.read_piece_alert):
            self._piece_read(name, alert)
        elif isinstance(alert, lt.torrent_finished_alert):
            if download is not None:
                download.finished.set()
                download.notify()
        elif isinstance(alert, lt.peer_disconnected_alert):
            # The error's message: the bindings report close reason 0 for every disconnect.
            reason = alert.error.message().lower() or "unknown"
            self.peer_disconnects[reason] += 1
            if download is not None:
                download.disconnects[reason] = download.disconnects.get(reason, 0) + 1
                if reason == LOST_SEED and not download.finished.is_set():
                    download.lost_seeds += 1
        elif isinstance(alert, lt.hash_failed_alert):
            self.hash_failed_pieces += 1
            if download is not None:
                download.hash_failures += 1
            log.warning("piece failed its hash: dropping what the peer sent", blob=name)
        elif isinstance(alert, lt.cache_flushed_alert):
            future = self._flushes.get(name)
            if future is not None and not future.done():
                future.set_result(None)
        elif isinstance(alert, lt.storage_moved_alert):
            future = self._moves.get(name)
            if future is not None and not future.done():
                future.set_result(None)
            # Reads under way when the file moved may have been dropped: ask again.
            handle = (
                download.handle if download is not None else self._seeding.get(f"sha256:{name}")
            )
            for read_name, index in list(self._reads):
                if read_name == name and handle is not None and handle.is_valid():
                    handle.read_piece(index)
        elif isinstance(alert, lt.storage_moved_failed_alert):
            future = self._moves.get(name)
            if future is not None and not future.done():
                future.set_exception(FetchError(f"cannot move blob {name}: {alert.message()}"))
        elif isinstance(alert, lt.torrent_error_alert | lt.file_error_alert):
            if download is not None:
                download.error = alert.message()
                download.finished.set()
                download.notify()
            log.error("torrent failed", blob=name, error=alert.message())

    def _piece_read(self, name: str, alert: Any) -> None:
        waiting = self._reads.pop((name, int(alert.piece)), [])
        error = alert.error
        failed = bool(error.value()) if hasattr(error, "value") else bool(error)
        for future in waiting:
            if future.done():
                continue
            if failed:
                future.set_exception(
                    FetchError(f"cannot read piece {alert.piece} of blob {name}: {error.message()}")
                )
            else:
                future.set_result(bytes(alert.buffer))


def verified_stream(
    fetcher: BlobFetcher, download: BlobDownload, loop: asyncio.AbstractEventLoop
) -> Iterator[bytes]:
    """A blob's bytes, in order, as they pass its in-order sha256 (the last piece once the
    whole blob matched), for a reader in another thread (a `docker load` body). They are read
    from the file, which holds every hashed byte. OSError when they cannot come: the download
    failed, was dropped, or the event loop stopped."""

    def wait(coro: Coroutine[Any, Any, None]) -> None:
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        while True:
            try:
                future.result(timeout=1.0)
                return
            except concurrent.futures.TimeoutError:
                if loop.is_closed() or not loop.is_running():
                    future.cancel()
                    raise OSError("the agent is stopping") from None
            except FetchError as e:
                raise OSError(str(e)) from e
            except concurrent.futures.CancelledError:
                raise OSError(f"blob {download.spec.digest}: the download stopped") from None

    size, length = download.spec.size, download.piece_length
    digest = download.spec.digest
    pos = 0
    file: BinaryIO | None = None
    try:
        while pos < size:
            wait(fetcher.wait_hashed(download, pos // length))
            end = min(download.hashed_pieces * length, size)
            if end >= size:
                wait(fetcher.verified(download))
            if file is None:  # the file exists once a piece is written; a move keeps it open
                try:
                    file = fetcher.partial_path(digest).open("rb", buffering=0)
                except FileNotFoundError:
                    file = fetcher.blob_path(digest).open("rb", buffering=0)
            file.seek(pos)
            while pos < end:
                chunk = file.read(min(end - pos, 1 << 20))
                if not chunk:
                    raise OSError(f"blob {digest} ended at {pos} of {end} verified bytes")
                pos += len(chunk)
                yield chunk
    finally:
        if file is not None:
            file.close()


def _hash_file_range(path: Path, sha: ResumableSha256, first: int, last: int) -> None:
    """Feeds bytes first..last-1 of the file to ``sha`` (in a thread: neither the reads nor
    the hash hold the GIL)."""
    with path.open("rb", buffering=0) as fh:
        fh.seek(first)
        left = last - first
        while left > 0:
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                raise FetchError(f"{path} ended {left} bytes short of what libtorrent holds")
            sha.update(chunk)
            left -= len(chunk)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


ReadRange = Callable[[str, int, int], Awaitable[bytes]]
TICK = 0.25  # how often follow() calls on_tick: an agent's reports come at most this often


def _release_held(fetcher: BlobFetcher, downloads: list[BlobDownload]) -> None:
    """Dials the held-back seed of each download the server has no first piece left for and
    whose peers have delivered nothing for SEED_AFTER seconds (or that claims none)."""
    now = time.monotonic()
    for download in downloads:
        if not download.held_peers or download.finished.is_set():
            continue
        ended = download.first_pieces_ended
        if download.first_pieces is None or (
            ended is not None and now - max(ended, download.last_piece_time) >= SEED_AFTER
        ):
            fetcher.release_held(download)


async def _fetch_orphans(
    fetcher: BlobFetcher, downloads: list[BlobDownload], read_range: ReadRange
) -> None:
    """After libtorrent closed peers of a download as they became seeds (LOST_SEED), fetches
    the pieces no connected peer holds from the server, once the server's first pieces ran out
    (until then it may still hand them to this host)."""
    for download in downloads:
        if download.lost_seeds == download.lost_seeds_seen or download.finished.is_set():
            continue
        if download.first_pieces is not None and download.first_pieces_ended is None:
            continue
        lost = download.lost_seeds - download.lost_seeds_seen
        download.lost_seeds_seen = download.lost_seeds
        pieces = fetcher.orphan_pieces(download)
        # A seed closed so lacked, before its last HAVE, nothing this host lacks: this host
        # lacks at most that last piece. More orphans than closed seeds say something else
        # (a peer that is upload-only without being a seed, say, in libtorrent's upload mode
        # after a disk error): the pieces are elsewhere in the swarm, not the server's to send.
        if not pieces or len(pieces) > lost:
            continue
        digest = download.spec.digest
        log.info(
            "pieces no connected peer holds (libtorrent closed the seeds that had them): "
            "fetching them from the server over gRPC",
            digest=digest,
            pieces=len(pieces),
        )
        try:
            read = functools.partial(read_range, digest)
            download.orphan_bytes += await fetcher.fill_missing(download, read, pieces)
        except BlobGoneError:
            raise
        except FetchError as e:
            log.warning(
                "fetching orphaned pieces failed: waiting for peers", digest=digest, error=str(e)
            )


async def follow(
    fetcher: BlobFetcher,
    downloads: Iterable[BlobDownload],
    *,
    read_range: ReadRange,
    fallback_after: float,
    on_tick: Callable[[], None],
) -> None:
    """Waits for every download, calling ``on_tick`` every TICK; returns as soon as the last
    one ends, not at the next tick. When no byte arrives for ``fallback_after`` seconds,
    fetches the missing pieces with ``read_range(digest, offset, length)`` (the server's
    ReadBlob); a failing fallback is logged and waiting goes on."""
    downloads = list(downloads)
    ended = asyncio.ensure_future(asyncio.gather(*(d.finished.wait() for d in downloads)))
    last_done = -1
    last_change = asyncio.get_running_loop().time()
    try:
        while True:
            await asyncio.wait({ended}, timeout=TICK)
            if ended.done():
                return
            on_tick()
            _release_held(fetcher, downloads)
            await _fetch_orphans(fetcher, downloads, read_range)
            now = asyncio.get_running_loop().time()
            done = sum(d.status().total_wanted_done for d in downloads)
            if done != last_done:
                last_done, last_change = done, now
                continue
            if now - last_change < fallback_after:
                continue
            for download in downloads:
                if download.finished.is_set():
                    continue
                digest = download.spec.digest
                log.warning(
                    "no peer delivers: fetching the missing pieces from the server over gRPC",
                    digest=digest,
                    missing_pieces=len(download.missing_pieces()),
                )
                try:
                    await fetcher.fill_missing(download, functools.partial(read_range, digest))
                except BlobGoneError:
                    raise
                except FetchError as e:
                    log.warning("fallback failed: waiting for peers", digest=digest, error=str(e))
                on_tick()
            last_change = asyncio.get_running_loop().time()
    finally:
        ended.cancel()
