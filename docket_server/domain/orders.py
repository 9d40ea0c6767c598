"""Pull orders: one per (host, rollout). The server sends them down the agents' streams,
hands out peers (it is the tracker: it knows who holds and who fetches each blob), and keeps
every task's state and the pieces its host holds.

Orders outlive connections: an order whose host is offline is sent when it connects, and an
order in flight is sent again after a reconnect (the agent carries out each order once).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol, TypeVar

import structlog

from docket_common.fetch import TICK
from docket_server.domain.fleet import Fleet, Session
from docket_server.domain.models import Blob, Image

log = structlog.get_logger()
_T = TypeVar("_T")

MAX_PEERS = 50
# Beyond this many hosts on a blob, an order's peers are a random sample of them rather than
# the first ones (which would put every later host on the same few), and a new host is
# announced to the last MAX_PEERS that started rather than to every one: both bounded, so
# that starting N hosts costs O(N), not O(N^2) messages and scans.
SAMPLE_ABOVE = 4 * MAX_PEERS
# An ended task leaves the book this long after it ended (its rollout or pull keeps its own
# copy, and the database its record): a server up for months would otherwise hold every task
# it ever ran, and look through all of them for every first-piece claim.
RETIRE_SECONDS = 600.0
# ...in batches at most this often: each batch filters the per-blob lists of started tasks
# once (a rollout to 10,000 hosts ends 10,000 tasks within seconds).
RETIRE_EVERY_SECONDS = 10.0
# Agents report a fetch's progress every PROGRESS_EVERY seconds, or less often when so many
# hosts fetch at once that the fleet would send more than PROGRESS_REPORTS_PER_SECOND: one
# server reads about 2,500-3,000 agent messages a second on a core, and 10,000 hosts at four
# reports a second each had their messages wait in its buffers until the fleet took them
# for silent.
PROGRESS_EVERY = TICK  # the most often an agent reports: every tick of its follow()
PROGRESS_REPORTS_PER_SECOND = 2000


def retired(ended: deque[tuple[float, _T]], now: float) -> Iterator[_T]:
    """Takes from ``ended`` (what ended, oldest first, with when on the same clock as
    ``now``) everything that ended RETIRE_SECONDS before ``now`` or earlier."""
    until = now - RETIRE_SECONDS
    while ended and ended[0][0] <= until:
        yield ended.popleft()[1]


class TaskState(StrEnum):
    QUEUED = "queued"  # not sent yet: waiting for its turn
    PENDING = "pending"  # sent (or to be sent when the host connects), not acknowledged
    ACCEPTED = "accepted"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    LOADING = "loading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


_NOT_SHARING = frozenset((TaskState.QUEUED, TaskState.FAILED, TaskState.CANCELLED))


class PeerSource(StrEnum):
    SERVER = "server"  # the server hands out peers
    TRACKER = "tracker"  # only the torrents' tracker does
    BOTH = "both"


@dataclass(frozen=True)
class PeerRef:
    endpoint: str
    name: str


@dataclass(frozen=True)
class OrderPlan:
    """What an order tells its host besides the image: where to fetch, and how."""

    peers: list[PeerRef]
    first_pieces: bool  # whether it claims first pieces from the server
    progress_interval: float  # seconds between its progress reports while it fetches


@dataclass
class BlobProgress:
    digest: str
    new_pieces: list[int]
    done_pieces: int
    total_pieces: int
    done_bytes: int


@dataclass
class ProgressReport:
    order_id: str
    blobs: list[BlobProgress]
    rate: int
    peer_count: int
    peer_bytes: dict[str, int]
    fallback_bytes: int


@dataclass
class TaskReport:
    order_id: str
    state: TaskState
    error: str = ""
    image_id: str = ""
    cached_bytes: int = 0
    bittorrent_bytes: int = 0
    server_bytes: int = 0
    fallback_bytes: int = 0
    first_piece_bytes: int = 0


@dataclass
class Task:
    order_id: str
    rollout_id: str
    agent: str
    image: Image
    blobs: dict[str, Blob]
    load: bool
    state: TaskState = TaskState.QUEUED
    error: str = ""
    image_id: str = ""
    pieces: dict[str, bytearray] = field(default_factory=dict)
    done_bytes: dict[str, int] = field(default_factory=dict)
    rate: int = 0
    peer_count: int = 0
    peer_bytes: dict[str, int] = field(default_factory=dict)
    cached_bytes: int = 0
    bittorrent_bytes: int = 0
    server_bytes: int = 0
    fallback_bytes: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    first_piece_bytes: int = 0
    # When the rollout's image is an index: its digest (``image`` is then this host's
    # platform's image from it).
    index_digest: str = ""
    pull: bool = False  # a pull a host's registry face asked for (pulls.py), not a rollout's

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blobs.values())

    @property
    def total_pieces(self) -> int:
        return sum(b.torrent.piece_count for b in self.blobs.values() if b.torrent)

    def _cached(self) -> list[Blob]:
        """Blobs the host already held: once it downloads, it reports every blob it fetches."""
        if self.state not in (TaskState.DOWNLOADING, TaskState.VERIFYING, TaskState.LOADING):
            return []
        return [b for d, b in self.blobs.items() if d not in self.pieces]

    @property
    def done_pieces(self) -> int:
        if self.state is TaskState.SUCCEEDED:
            return self.total_pieces
        held = sum(int.from_bytes(bits, "little").bit_count() for bits in self.pieces.values())
        return held + sum(b.torrent.piece_count for b in self._cached() if b.torrent)

    @property
    def held_bytes(self) -> int:
        if self.state is TaskState.SUCCEEDED:
            return self.total_bytes
        return sum(self.done_bytes.values()) + sum(b.size for b in self._cached())


class OrderSink(Protocol):
    """How orders reach agents (the API layer encodes them for the stream)."""

    def send_order(self, session: Session, task: Task, plan: OrderPlan) -> None: ...

    def send_peers(self, session: Session, task: Task, peers: list[PeerRef]) -> None: ...

    def send_cancel(self, session: Session, task: Task, reason: str) -> None: ...


class OrderBook:
    def __init__(
        self,
        fleet: Fleet,
        seed_endpoint: str,
        peer_source: PeerSource = PeerSource.SERVER,
        clock: Callable[[], float] = time.monotonic,
        progress_reports_per_second: float = PROGRESS_REPORTS_PER_SECOND,
    ) -> None:
        self.fleet = fleet
        self.progress_reports_per_second = progress_reports_per_second
        self.clock = clock
        self._ended: deque[tuple[float, Task]] = deque()  # ended tasks, by when, to retire
        self._next_retire = 0.0
        self.seed_endpoint = seed_endpoint
        self.peer_source = peer_source
        self.sink: OrderSink | None = None
        self.tasks: dict[str, Task] = {}
        self._listeners: list[Callable[[Task], None]] = []
        self._by_agent: dict[str, dict[str, Task]] = {}
        # Every task that was started, per blob, in the order they started (once each).
        self._started: dict[str, list[Task]] = {}
        self._random = random.Random()
        # While hints are batched (hints_batched): the peers to tell each started task
        # about, by order id, sent as one PeerHint each at the end.
        self._hints: dict[str, tuple[Session, Task, list[PeerRef]]] | None = None
        self._fetching = 0  # tasks started and not ended
        self._starting = 0  # hosts a rollout is about to start (starting())

    def blobs_in_flight(self) -> set[str]:
        """The blobs of every task not done yet (queued ones too: they will fetch them)."""
        return {d for t in self.tasks.values() if not t.state.terminal for d in t.blobs}

    def listen(self, callback: Callable[[Task], None]) -> None:
        self._listeners.append(callback)

    def _changed(self, task: Task) -> None:
        for callback in self._listeners:
            callback(task)

    def add(self, task: Task) -> None:
        """Takes a task (queued, or in flight after a server restart) into the book."""
        self._retire_ended()
        self.tasks[task.order_id] = task
        self._by_agent.setdefault(task.agent, {})[task.order_id] = task
        if task.state.terminal:  # an ended host of a rollout still running at a restart
            self._ended.append((self.clock(), task))
        if task.state is not TaskState.QUEUED:
            self._index_started(task)
            if not task.state.terminal:
                self._fetching += 1

    def _retire_ended(self) -> None:
        """Drops the tasks that ended RETIRE_SECONDS ago or more from the book."""
        now = self.clock()
        if now < self._next_retire or not self._ended or self._ended[0][0] > now - RETIRE_SECONDS:
            return
        self._next_retire = now + RETIRE_EVERY_SECONDS
        gone: set[str] = set()
        digests: set[str] = set()
        for task in retired(self._ended, now):
            if self.tasks.get(task.order_id) is not task:
                continue
            del self.tasks[task.order_id]
            mine = self._by_agent.get(task.agent, {})
            mine.pop(task.order_id, None)
            if not mine:
                self._by_agent.pop(task.agent, None)
            gone.add(task.order_id)
            digests.update(task.blobs)
        for digest in digests:
            kept = [t for t in self._started.get(digest, ()) if t.order_id not in gone]
            if kept:
                self._started[digest] = kept
            else:
                self._started.pop(digest, None)

    def _index_started(self, task: Task) -> None:
        for digest in task.blobs:
            self._started.setdefault(digest, []).append(task)

    def start(self, task: Task, *, send: bool = True) -> None:
        """Sends a queued task's order now, or when its host connects; with ``send`` False
        the caller hands the agent the order (order_for) and only peers are told."""
        if task.state is not TaskState.QUEUED:
            return
        task.state = TaskState.PENDING
        task.start_time = datetime.now(UTC)
        self._index_started(task)
        self._fetching += 1
        self._starting = max(self._starting - 1, 0)
        session = self.fleet.sessions.get(task.agent)
        if session is not None:
            self._send(session, task, send_order=send)
        log.info(
            "order sent" if session else "order waits for its host",
            order=task.order_id,
            agent=task.agent,
            image=task.image.name,
        )
        self._changed(task)

    @contextlib.contextmanager
    def hints_batched(self) -> Iterator[None]:
        """Within it, the hosts that start are announced to the others in one PeerHint per
        host told, at the end (1000 hosts starting at once: 1000 messages, not 49,000)."""
        if self._hints is not None:  # already batching: the outer one sends
            yield
            return
        self._hints = {}
        try:
            yield
        finally:
            hints, self._hints = self._hints, None
            if self.sink is not None:
                for session, task, peers in hints.values():
                    self.sink.send_peers(session, task, peers)

    @contextlib.contextmanager
    def starting(self, hosts: int) -> Iterator[None]:
        """Within it, orders pace their hosts' reports as if ``hosts`` more were fetching
        already (each start counts one off): a rollout starting 10,000 hosts in slices
        gives its first hosts the interval its last will have."""
        before, self._starting = self._starting, hosts
        try:
            yield
        finally:
            self._starting = before  # (0 but when nested)

    def progress_interval(self) -> float:
        """How often a host that starts now reports its progress."""
        fetching = self._fetching + self._starting
        return max(PROGRESS_EVERY, fetching / self.progress_reports_per_second)

    def order_for(self, task: Task) -> OrderPlan:
        """A task's order's peers, whether its agent claims first pieces (where the server
        hands out peers, it also hands out the first copies of the pieces, first_pieces.py;
        a tracker's peers include the seed, which would send more), and its report pace."""
        return OrderPlan(
            self.peers_for(task),
            self.peer_source is PeerSource.SERVER,
            self.progress_interval(),
        )

    def _send(self, session: Session, task: Task, *, send_order: bool = True) -> None:
        if self.sink is None:
            return
        if send_order:
            self.sink.send_order(session, task, self.order_for(task))
        # Tell the others fetching the same blobs about this host.
        me = self._agent_peer(task.agent)
        if me is None or self.peer_source is PeerSource.TRACKER:
            return
        told = 0
        for other in self._latest_sharing(task):
            other_session = self.fleet.sessions.get(other.agent)
            if other_session is not None:
                self._hint(other_session, other, me)
                told += 1
                if told >= MAX_PEERS - 1:
                    break

    def _hint(self, session: Session, task: Task, peer: PeerRef) -> None:
        if self.sink is None:
            return
        if self._hints is None:
            self.sink.send_peers(session, task, [peer])
            return
        held = self._hints.get(task.order_id)
        if held is None or held[0] is not session or len(held[2]) >= MAX_PEERS:
            if held is not None:  # a full one (or for an old stream) goes now
                self.sink.send_peers(*held)
            self._hints[task.order_id] = (session, task, [peer])
        else:
            held[2].append(peer)

    def _latest_sharing(self, task: Task) -> Iterator[Task]:
        """The other started tasks on any of ``task``'s blobs, the latest started first."""
        seen = {task.order_id}
        for digest in task.blobs:
            for other in reversed(self._started.get(digest, ())):
                if other.order_id not in seen and other.agent != task.agent:
                    seen.add(other.order_id)
                    if other.state not in _NOT_SHARING:
                        yield other

    def _sharing_agents(self, digests: Iterable[str], asking: str | None) -> Iterator[str]:
        """Hosts fetching or holding (through an order) any of these blobs: all of them in
        the order they started, or with many, a random sample."""
        lists = [self._started.get(d, []) for d in digests]
        if sum(len(x) for x in lists) <= SAMPLE_ABOVE:
            candidates: Iterable[Task] = (t for x in lists for t in x)
        else:
            candidates = (
                x[self._random.randrange(len(x))] for x in lists if x for _ in range(SAMPLE_ABOVE)
            )
        seen = {asking}
        for t in candidates:
            if t.agent not in seen and t.state not in _NOT_SHARING:
                seen.add(t.agent)
                yield t.agent

    def _agent_peer(self, agent: str) -> PeerRef | None:
        session = self.fleet.sessions.get(agent)
        if session is None or not session.record.info.bt_endpoint:
            return None
        return PeerRef(session.record.info.bt_endpoint, agent)

    def peers_for(self, task: Task) -> list[PeerRef]:
        """The server's seed, then hosts fetching or holding the same blobs."""
        return self._peers(
            set(task.blobs), self._sharing_agents(task.blobs, task.agent), task.agent
        )

    def blob_peers(self, digest: str) -> list[PeerRef]:
        """Where one blob can be fetched (for clients outside any order, like `pull`)."""
        return self._peers({digest}, self._sharing_agents([digest], None), None)

    def _peers(
        self, digests: set[str], fetching: Iterable[str], asking: str | None
    ) -> list[PeerRef]:
        if self.peer_source is PeerSource.TRACKER:
            return []
        peers = [PeerRef(self.seed_endpoint, "server")]
        holding = (
            name for name, session in self.fleet.sessions.items() if session.holds_any(digests)
        )
        seen = {asking}
        for source in (fetching, holding):  # lazily: the holders only when fetchers are few
            for name in source:
                ref = self._agent_peer(name) if name not in seen else None
                if ref is not None:
                    seen.add(name)
                    peers.append(ref)
                    if len(peers) >= MAX_PEERS:
                        return peers
        return peers

    def agent_connected(self, session: Session) -> None:
        """Sends the agent every order of its that is not done."""
        for task in list(self._by_agent.get(session.name, {}).values()):
            if task.state is not TaskState.QUEUED and not task.state.terminal:
                self._send(session, task)

    def cancel(self, task: Task, reason: str) -> None:
        if task.state.terminal:
            return
        if task.state is TaskState.QUEUED:  # never sent: nothing to stop
            self._finish(task, TaskState.CANCELLED, reason)
            return
        session = self.fleet.sessions.get(task.agent)
        if session is not None and self.sink is not None:
            self.sink.send_cancel(session, task, reason)
        else:  # nobody to tell: the order is void
            self._finish(task, TaskState.CANCELLED, reason)

    def fail(self, task: Task, reason: str) -> None:
        """Ends a task as failed on the server's word (its host never came back)."""
        if not task.state.terminal:
            self._finish(task, TaskState.FAILED, reason)

    def on_progress(self, agent: str, report: ProgressReport) -> None:
        task = self.tasks.get(report.order_id)
        if task is None or task.agent != agent or task.state.terminal:
            return
        if task.state is TaskState.QUEUED:
            return
        for blob in report.blobs:
            meta = task.blobs.get(blob.digest)
            if meta is None or meta.torrent is None:
                continue
            count = meta.torrent.piece_count
            bits = task.pieces.setdefault(blob.digest, bytearray((count + 7) // 8))
            for index in blob.new_pieces:
                if 0 <= index < count:
                    bits[index >> 3] |= 1 << (index & 7)
            task.done_bytes[blob.digest] = min(max(blob.done_bytes, 0), meta.size)
        task.rate = report.rate
        task.peer_count = report.peer_count
        task.peer_bytes = report.peer_bytes
        task.fallback_bytes = report.fallback_bytes
        self._changed(task)

    def on_update(self, agent: str, report: TaskReport) -> None:
        task = self.tasks.get(report.order_id)
        if task is None or task.agent != agent:
            log.warning("update for an unknown order", agent=agent, order=report.order_id)
            return
        if task.state is TaskState.QUEUED:
            return
        if task.state.terminal:
            return
        task.cached_bytes = report.cached_bytes
        task.bittorrent_bytes = report.bittorrent_bytes
        task.server_bytes = report.server_bytes
        task.fallback_bytes = report.fallback_bytes
        task.first_piece_bytes = report.first_piece_bytes
        task.image_id = report.image_id or task.image_id
        if report.state.terminal:
            self._finish(task, report.state, report.error)
            return
        task.state = report.state
        task.error = report.error
        self._changed(task)

    def _finish(self, task: Task, state: TaskState, error: str) -> None:
        if task.state is not TaskState.QUEUED:
            self._fetching -= 1
        task.state = state
        task.error = error
        task.rate = 0
        task.end_time = datetime.now(UTC)
        if state is TaskState.SUCCEEDED:
            session = self.fleet.sessions.get(task.agent)
            if session is not None:  # it holds the blobs now, after the task leaves the book
                session.holds.update(task.blobs)
        self._ended.append((self.clock(), task))
        self._retire_ended()
        log.info(
            "order ended",
            order=task.order_id,
            agent=task.agent,
            state=str(state),
            error=error or None,
        )
        self._changed(task)
