"""Pull orders on the agent: fetch what the cache lacks, report every piece, verify, load.

An order runs once: a second copy of an order in flight is merged into it, and the final
update of a finished order is kept on disk (``orders/<id>.json``) and sent again if the server
sends the order again (after a reconnect or a restart of either side).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from google.protobuf import json_format

from docket_agent.cache import BlobCache, CacheFullError
from docket_common.fetch import (
    TICK,
    BlobDownload,
    BlobFetcher,
    BlobSpec,
    FetchError,
    ReadRange,
    follow,
    verified_stream,
)
from docket_common.loadable import LoadError, PendingBlob
from docket_common.pb import agent_pb2
from docket_common.pb import agent_service_pb2 as pb
from docket_common.readblob import ClaimForOrder

log = structlog.get_logger()

SEED_NAME = "server"  # how orders name the server's seed among their peers
# Where an order's bytes came from (metrics): other hosts, the server's first pieces, the
# server's seed, the gRPC fallback, and the cache (already held).
SOURCES = ("peers", "first_pieces", "seed", "fallback", "cache")
TERMINAL = {
    agent_pb2.TASK_STATE_SUCCEEDED,
    agent_pb2.TASK_STATE_FAILED,
    agent_pb2.TASK_STATE_CANCELLED,
}
# States an order often passes through in milliseconds: accepted (it downloads at once),
# verifying (the sha256 ends with the last piece) and loading (a small image). Each is sent
# only once it has lasted SETTLE: one a later state replaces before then is not sent at all,
# and the server's next update says where the order went. DOWNLOADING and the end go at once.
# At 10,000 hosts this is about three messages an order fewer, in the two waves (the orders
# arrive, the downloads end) where the server reads the most.
PASSING = {
    agent_pb2.TASK_STATE_ACCEPTED,
    agent_pb2.TASK_STATE_VERIFYING,
    agent_pb2.TASK_STATE_LOADING,
}
SETTLE = TICK

Send = Callable[[pb.ConnectRequest], None]
# (order, the path of each blob in the cache, blobs still arriving) -> the loaded image's id
Loader = Callable[
    [agent_pb2.PullOrder, list[Path], dict[str, PendingBlob]], Coroutine[Any, Any, str]
]


@dataclass
class OrderSettings:
    fallback_after: float = 30.0  # seconds without a new byte before gRPC fills the gaps
    docker_error: str = ""  # why this agent cannot load images ("" when it can)
    # Whether to take first pieces from the server when an order offers them. Not under
    # --max-download-rate: gRPC bytes would bypass libtorrent's limiter.
    claim_first_pieces: bool = True
    # Start `docker load` while the layers download, fed their bytes as they pass the
    # sha256 in order, rather than once every blob is in the cache.
    overlap_load: bool = True


def _spec(blob: agent_pb2.OrderBlob) -> BlobSpec:
    return BlobSpec(blob.digest, blob.size_bytes, blob.metainfo, blob.media_type)


class OrderRunner:
    def __init__(self, manager: OrderManager, order: agent_pb2.PullOrder) -> None:
        self.m = manager
        self.order = order
        self.id = order.order_id
        # A pull of blobs alone (an agent's registry face asked for them) has no config.
        self.blobs = [*([order.config] if order.HasField("config") else []), *order.layers]
        self.unique = list({b.digest: b for b in self.blobs}.values())
        self.downloads: dict[str, BlobDownload] = {}
        self.last: pb.ConnectRequest | None = None
        self.cached_bytes = 0
        self.task: asyncio.Task[None] | None = None
        self.loading: asyncio.Task[str] | None = None  # a load started while blobs arrive
        self.claims = order.claim_first_pieces and manager.settings.claim_first_pieces
        self.counted = dict.fromkeys(SOURCES, 0)  # of the bytes reported, those counted
        self.peers, self.held = self.split_peers(order)
        # Peers the server told this host about after its order (PeerHint): hosts that
        # started later, whose own orders name this one, so they dial it.
        self.hinted: list[str] = []
        # Progress goes up every tick of follow() (TICK), or as seldom as the server asks
        # when many hosts fetch at once.
        self.progress_every = TICK
        if order.HasField("progress_interval"):
            self.progress_every = max(order.progress_interval.ToTimedelta().total_seconds(), TICK)
        self.progress_sent = 0.0  # monotonic time of the last report
        self.reports = 0  # progress reports sent
        self.held_update: asyncio.TimerHandle | None = None  # a PASSING state not sent yet

    def split_peers(self, order: agent_pb2.PullOrder) -> tuple[list[str], list[str]]:
        """The peers to dial now, and those held back: with first pieces from the server, its
        seed waits until they run out."""
        held = [p.endpoint for p in order.peers if p.name == SEED_NAME and self.claims]
        return [p.endpoint for p in order.peers if p.endpoint not in held], held

    def update(self, state: int, error: str = "", image_id: str = "") -> None:
        downloads = list(self.downloads.values())
        for download in downloads:
            download.sample_peers()
        update = self._byte_counts(sum(d.bittorrent_bytes for d in downloads))
        update.state = state  # type: ignore[assignment]
        update.error = error
        update.image_id = image_id
        self._count_received(update)
        message = pb.ConnectRequest(task_update=update)
        self.last = message
        self._drop_held_update()
        if state in PASSING:
            self.held_update = asyncio.get_running_loop().call_later(SETTLE, self.m.send, message)
            return
        self.m.send(message)
        if state in TERMINAL:
            self.m.remember(self.id, message)

    def _drop_held_update(self) -> None:
        if self.held_update is not None:
            self.held_update.cancel()
            self.held_update = None

    def _byte_counts(self, bittorrent_bytes: int) -> agent_pb2.TaskUpdate:
        """This order's bytes by source, as its task updates report them."""
        downloads = self.downloads.values()
        return agent_pb2.TaskUpdate(
            order_id=self.id,
            cached_bytes=self.cached_bytes,
            bittorrent_bytes=bittorrent_bytes,
            server_bytes=sum(d.server_bytes for d in downloads),
            fallback_bytes=sum(d.fallback_bytes for d in downloads),
            first_piece_bytes=sum(d.first_piece_bytes for d in downloads),
        )

    def _count_received(self, now: agent_pb2.TaskUpdate) -> None:
        """Adds what arrived since the last count to the agent's bytes by source: the numbers
        this order reports, so that the metrics and the rollout's report agree."""
        counted = self.counted
        bt = now.bittorrent_bytes
        values = {
            "first_pieces": now.first_piece_bytes,
            "fallback": now.fallback_bytes,
            "cache": now.cached_bytes,
        }
        if bt >= counted["seed"] + counted["peers"]:
            # The seed's share of the BitTorrent bytes (sampled from its connection): never
            # less than counted before, nor so much that the peers' share shrinks. Each source
            # only grows, and seed and peers add up to the BitTorrent bytes.
            seed = min(max(min(now.server_bytes, bt), counted["seed"]), bt - counted["peers"])
            values["seed"], values["peers"] = seed, bt - seed
        received = self.m.received
        for source, value in values.items():
            if value > counted[source]:
                received[source] += value - counted[source]
                counted[source] = value

    async def run(self) -> None:
        log.info(
            "order received",
            order=self.id,
            image=self.order.image_name,
            load=self.order.load,
            progress_s=self.progress_every,
        )
        for blob in self.unique:
            self.m.cache.pin(blob.digest)
        try:
            await self._run()
        except asyncio.CancelledError:
            if self.id in self.m.cancel_reasons:  # cancelled by the server, not a shutdown
                self._drop_downloads()
                self.update(agent_pb2.TASK_STATE_CANCELLED, self.m.cancel_reasons.pop(self.id))
            # On shutdown, partial downloads stay: the order resumes when it comes again.
            raise
        except (FetchError, CacheFullError, LoadError, OSError) as e:
            log.error("order failed", order=self.id, error=str(e))
            self._fail(str(e))
        except Exception as e:  # a bug: say so, rather than leave the order hanging
            log.exception("order failed: internal error", order=self.id)
            self._fail(f"internal error in the agent: {e!r}")
        finally:
            self._drop_held_update()  # a shutdown: the order is reported again when it resumes
            for blob in self.unique:
                self.m.cache.unpin(blob.digest)

    def _drop_downloads(self) -> None:
        """Drops this order's partial downloads, but not one another order also waits for."""
        for digest in self.downloads:
            # A blob already verified into the cache stays (and seeds); anything short of that
            # is partial work.
            if not self.m.cache.shared(digest) and not self.m.cache.has(digest):
                self.m.fetcher.drop(digest, delete_files=True)

    def _fail(self, error: str) -> None:
        self._drop_downloads()
        self.update(agent_pb2.TASK_STATE_FAILED, error)

    async def _run(self) -> None:
        for blob in self.unique:
            if blob.size_bytes == 0 and not self.m.cache.has(blob.digest, 0):
                self.m.cache.put_empty(blob.digest)  # no torrent for no bytes
        missing = [b for b in self.unique if not self.m.cache.has(b.digest, b.size_bytes)]
        self.cached_bytes = sum(b.size_bytes for b in self.unique if b not in missing)
        for blob in self.unique:
            if blob not in missing:
                self.m.cache.touch(blob.digest)
                if blob.size_bytes:  # the empty blob has no torrent
                    self.m.fetcher.seed(_spec(blob))
                    self.m.keep_torrent(_spec(blob))
        self.update(agent_pb2.TASK_STATE_ACCEPTED)
        started = time.monotonic()
        try:
            if missing:
                await self._download(missing)
            await self._finish(started)
        finally:
            loading = self.loading
            if loading is not None:
                if not loading.done():
                    loading.cancel()
                # Its outcome, taken: a load that failed because the order had (a sha256 that
                # did not match) is part of that failure, not an error never retrieved.
                with contextlib.suppress(BaseException):
                    await loading

    async def _download(self, missing: list[agent_pb2.OrderBlob]) -> None:
        """Fetches the blobs the cache lacks into it, starting the load while they arrive."""
        if missing:
            for digest in self.m.cache.make_room(sum(b.size_bytes for b in missing)):
                self.m.fetcher.drop(digest)
            blobs = [(b.digest, b.size_bytes) for b in missing]
            for digest in self.m.cache.make_disk_room(blobs):
                self.m.fetcher.drop(digest)
            for blob in missing:
                download = self.m.fetcher.download(
                    _spec(blob), self.peers, hold=self.held, answer=self.hinted
                )
                self.downloads[blob.digest] = download
                if not self.claims:
                    continue
                self.m.fetcher.claim_first_pieces(
                    download,
                    lambda digest, max_bytes: self.m.claim(digest, self.id, max_bytes),
                )
                # This blob's claims go out now, before the next blob's torrent is added and
                # before the questions to libtorrent below: each is a round trip to its
                # network thread, busy at a rollout's start with the TLS handshakes of every
                # peer dialling in. The questions held the first claim back by about 0.2 s
                # on most hosts (8 hosts, 1 MiB), and the adds of an 8-layer image's nine
                # torrents, 20-160 ms in all, by 0.02-0.16 s (4 hosts). A timer, not
                # sleep(0): the loop runs every task that becomes ready before it fires, and
                # a claim is sent a few tasks deep (the claim worker, then grpc.aio's call).
                await asyncio.sleep(0.001)
        # Pieces first: the server then knows which blobs this host still lacks.
        self._send_progress(full=True)
        self.update(agent_pb2.TASK_STATE_DOWNLOADING)
        if self.m.settings.overlap_load:
            self.loading = self._start_load()
        started = time.monotonic()
        await follow(
            self.m.fetcher,
            self.downloads.values(),
            read_range=self.m.read_range,
            fallback_after=self.m.settings.fallback_after,
            on_tick=self._tick,
        )
        last_piece = time.monotonic()
        self.update(agent_pb2.TASK_STATE_VERIFYING)
        for download in self.downloads.values():
            await self.m.fetcher.complete(download)
            self.m.keep_torrent(download.spec)
        self._send_progress(full=False)
        log.info(
            "blobs in the cache",
            order=self.id,
            blobs=len(self.downloads),
            download_s=round(last_piece - started, 3),
            verify_s=round(time.monotonic() - last_piece, 3),
            reports=self.reports,
            timelines=[d.timeline() for d in self.downloads.values()],
        )

    def _start_load(self) -> asyncio.Task[str] | None:
        """Starts `docker load` now, while the blobs arrive, when the order loads and the
        engine can take them (zstd layers for engines that cannot read zstd wait)."""
        if not self.order.load or self.m.settings.docker_error:
            return None
        loop = asyncio.get_running_loop()
        pending: dict[str, PendingBlob] = {}
        for blob in self.blobs:
            download = self.downloads.get(blob.digest)
            if download is None or download.spec.digest in pending:
                continue
            if "zstd" in blob.media_type:
                return None  # the engine may need it expanded: load once it is in the cache

            def body(_chunk: int, download: BlobDownload = download) -> Iterator[bytes]:
                return verified_stream(self.m.fetcher, download, loop)

            pending[blob.digest] = PendingBlob(blob.size_bytes, body)
        paths = [self.m.cache.path(b.digest) for b in self.blobs]
        log.info("loading while the layers arrive", order=self.id, pending_blobs=len(pending))
        return asyncio.create_task(self.m.load(self.order, paths, pending))

    async def _finish(self, started: float) -> None:
        """Loads the image (or waits for the load under way), or stops at cached."""
        paths = [self.m.cache.path(b.digest) for b in self.blobs]
        if not self.order.load:
            self.update(agent_pb2.TASK_STATE_SUCCEEDED, "prefetched: cached and seeding")
            return
        if self.m.settings.docker_error:
            self.update(
                agent_pb2.TASK_STATE_FAILED,
                f"downloaded, but not loaded: {self.m.settings.docker_error}",
            )
            return
        self.update(agent_pb2.TASK_STATE_LOADING)
        loaded_from = time.monotonic()
        loading = self.loading
        image_id = await (loading if loading is not None else self.m.load(self.order, paths, {}))
        log.info(
            "image loaded",
            order=self.id,
            image=self.order.image_name,
            image_id=image_id,
            overlapped=loading is not None,
            load_s=round(time.monotonic() - loaded_from, 3),
            order_s=round(time.monotonic() - started, 3),
        )
        self.m.observe_load(time.monotonic() - loaded_from)
        self.update(agent_pb2.TASK_STATE_SUCCEEDED, image_id=image_id)

    def _tick(self) -> None:
        # (a tick comes every TICK, late or early by a little: not a tick short)
        if time.monotonic() - self.progress_sent >= self.progress_every - TICK / 2:
            self._send_progress(full=False)
        if self.m.cache.min_free_bytes:
            # What the partial files still lack, by the disk they take (written pieces, not
            # only verified ones): what the downloads will still take of the disk.
            cache = self.m.cache
            remaining = sum(
                max(d.spec.size - cache.partial_bytes(d.spec.digest), 0)
                for d in self.downloads.values()
                if not d.finished.is_set()
            )
            cache.check_disk(remaining)

    def _send_progress(self, full: bool) -> None:
        blobs: list[agent_pb2.BlobProgress] = []
        rate = 0
        bittorrent_bytes = 0
        peers = 0  # the largest swarm among the blobs: the same host is in each of them
        for download in self.downloads.values():
            new = download.take_new_pieces()
            if full:  # one question to libtorrent, not one a piece
                new = download.held_pieces()
            status = download.status()
            bittorrent_bytes += int(status.total_payload_download)  # as bittorrent_bytes says
            rate += status.download_payload_rate
            peers = max(peers, len(download.sample_peers()))
            if new or full:
                blobs.append(
                    agent_pb2.BlobProgress(
                        digest=download.spec.digest,
                        new_pieces=new,
                        done_pieces=status.num_pieces,
                        total_pieces=download.piece_count,
                        done_bytes=status.total_wanted_done,
                    )
                )
        if not blobs and not full:
            return
        self.progress_sent = time.monotonic()
        self.reports += 1
        self._count_received(self._byte_counts(bittorrent_bytes))
        self.m.send(
            pb.ConnectRequest(
                piece_progress=agent_pb2.PieceProgress(
                    order_id=self.id,
                    blobs=blobs,
                    rate_bytes_per_second=rate,
                    peer_count=peers,
                    peers=[
                        agent_pb2.PeerBytes(endpoint=e, received_bytes=b)
                        for d in self.downloads.values()
                        for e, b in d.peer_bytes.items()
                    ],
                    fallback_bytes=sum(d.fallback_bytes for d in self.downloads.values()),
                )
            )
        )


class OrderManager:
    def __init__(
        self,
        state_dir: Path,
        cache: BlobCache,
        fetcher: BlobFetcher,
        send: Send,
        read_range: ReadRange,
        claim: ClaimForOrder,
        load: Loader,
        settings: OrderSettings,
    ) -> None:
        self.state_dir = state_dir
        self.cache = cache
        self.fetcher = fetcher
        self.send = send
        self.read_range = read_range
        self.claim = claim
        self.load = load
        self.settings = settings
        self.runners: dict[str, OrderRunner] = {}
        self.cancel_reasons: dict[str, str] = {}
        # For metrics: the bytes of every order by source (SOURCES), and each load's seconds
        # from its last blob in the cache to the image loaded.
        self.received = dict.fromkeys(SOURCES, 0)
        self.observe_load: Callable[[float], None] = lambda _seconds: None
        state_dir.mkdir(parents=True, exist_ok=True)

    def keep_torrent(self, spec: BlobSpec) -> None:
        """Keeps a cached blob's metainfo, so that it is seeded again after a restart."""
        path = self.cache.torrent_path(spec.digest)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(spec.metainfo)
            tmp.replace(path)

    def seed_cache(self) -> int:
        """Seeds every cached blob whose metainfo is kept (at start-up)."""
        count = 0
        for blob in self.cache.blobs():
            try:
                metainfo = self.cache.torrent_path(blob.digest).read_bytes()
            except FileNotFoundError:
                continue
            self.fetcher.seed(BlobSpec(blob.digest, blob.size, metainfo))
            count += 1
        return count

    def remember(self, order_id: str, message: pb.ConnectRequest) -> None:
        path = self.state_dir / f"{order_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json_format.MessageToJson(message))
        tmp.replace(path)

    def recalled(self, order_id: str) -> pb.ConnectRequest | None:
        path = self.state_dir / f"{order_id}.json"
        try:
            return json_format.Parse(path.read_text(), pb.ConnectRequest())
        except (FileNotFoundError, json_format.ParseError, ValueError):
            return None

    def handle(self, message: Any) -> None:
        """A message from the server: an order, peers, or a cancel."""
        kind = message.WhichOneof("body")
        if kind == "pull_order":
            self.pull(message.pull_order)
        elif kind == "peer_hint":
            runner = self.runners.get(message.peer_hint.order_id)
            if runner is not None:
                endpoints = [p.endpoint for p in message.peer_hint.peers]
                runner.hinted += endpoints
                for download in runner.downloads.values():
                    self.fetcher.answer(download, endpoints)
        elif kind == "cancel_order":
            runner = self.runners.get(message.cancel_order.order_id)
            if runner is not None and runner.task is not None:
                self.cancel_reasons[runner.id] = message.cancel_order.reason or "cancelled"
                runner.task.cancel()

    def pull(self, order: agent_pb2.PullOrder) -> OrderRunner | None:
        """Carries out an order once: starts it, or (sent again) says where it stands. The
        order's runner; None for an order already done."""
        done = self.recalled(order.order_id)
        if done is not None:
            log.info("order already done: reporting its result again", order=order.order_id)
            self.send(done)
            return None
        runner = self.runners.get(order.order_id)
        if runner is not None:
            log.info("order already running: reporting where it stands", order=order.order_id)
            # Sent again after a reconnect: the peers may have come back (the server's seed
            # after a restart) or changed; dial them again.
            endpoints, held = runner.split_peers(order)
            runner.peers = list(dict.fromkeys([*runner.peers, *endpoints]))
            for download in runner.downloads.values():
                if not download.finished.is_set():
                    self.fetcher.add_peers(download, endpoints)
                    self.fetcher.hold(download, held)
            if runner.last is not None:
                self.send(runner.last)
            runner._send_progress(full=True)
            return runner
        runner = OrderRunner(self, order)
        self.runners[order.order_id] = runner
        runner.task = asyncio.create_task(runner.run(), name=f"order-{order.order_id}")
        runner.task.add_done_callback(lambda task: self._ended(order.order_id, task))
        return runner

    def _ended(self, order_id: str, task: asyncio.Task[None]) -> None:
        self.runners.pop(order_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("order crashed", order=order_id, exc_info=task.exception())

    def resend(self) -> None:
        """After a reconnect: where every order in flight stands, pieces included."""
        for runner in self.runners.values():
            if runner.last is not None:
                self.send(runner.last)
            if runner.downloads:
                runner._send_progress(full=True)

    async def close(self) -> None:
        """Stops every order for a shutdown: partial downloads stay for the next start."""
        tasks = [r.task for r in self.runners.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
