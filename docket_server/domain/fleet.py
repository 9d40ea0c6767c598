"""The fleet: every agent's one stream, its liveness, and the table operators read.

Each connected agent has a Session. Heartbeats flow both ways every interval: the fleet's
sweeper sends the server's and watches the agents'. An agent silent for two intervals is
STALE; for three, its stream is closed and it is OFFLINE. The interval grows with the fleet
(``interval_for_fleet``); agents that follow the server's heartbeats' interval are told,
and an agent older than that keeps the interval its welcome gave it.

The table lives in memory (one small record an agent) and is written behind: a connect, a
state change or a disconnect never waits for the database. The changes of the last
``WRITE_BEHIND_SECONDS`` are written together, one row per agent however often it changed, in
one transaction; last-seen times every ``LAST_SEEN_FLUSH_SECONDS``. 10,000 agents connecting
at once are 10,000 welcomes and a few transactions, not 20,000 round trips queued on a pool of
five connections. A crash loses at most that much of the table, and nothing that matters: a
restarted server holds every agent offline until it reconnects (``start``), and a reconnect
writes its row again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import structlog

from docket_common.digest import is_digest
from docket_common.errors import Reason
from docket_common.manifest import Platform
from docket_common.selector import InvalidSelectorError, Selector, is_label, is_name, parse_selector
from docket_server.domain.errors import (
    AlreadyExists,
    DeadlineExceeded,
    DocketError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)

log = structlog.get_logger()

STALE_AFTER_INTERVALS = 2
OFFLINE_AFTER_INTERVALS = 3
# The heartbeat interval grows with the fleet beyond this many heartbeats a second each way
# (2,500 agents at 5 s): a server reads about 2,500-3,000 agent messages a second on a core,
# and 10,000 agents at 5 s sent 2,000 a second and got as many back.
HEARTBEATS_PER_SECOND = 500
LAST_SEEN_FLUSH_SECONDS = 10.0
WRITE_BEHIND_SECONDS = 0.5


class AgentState(StrEnum):
    ONLINE = "online"
    STALE = "stale"
    OFFLINE = "offline"


@dataclass(frozen=True)
class AgentInfo:
    """What an agent says about itself in its hello."""

    name: str
    agent_id: str
    groups: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    version: str = ""
    bt_endpoint: str = ""
    docker_version: str = ""
    docker_error: str = ""
    disk_free_bytes: int = 0
    cached_digests: tuple[str, ...] = ()
    platform: str = ""  # "linux/amd64": what an index's image is chosen by


@dataclass(frozen=True)
class AgentRecord:
    info: AgentInfo
    state: AgentState
    peer_address: str
    connect_time: datetime
    last_seen_time: datetime
    create_time: datetime

    @property
    def name(self) -> str:
        return self.info.name


class FleetStore(Protocol):
    """What the fleet needs persisted (implemented by the SQL metadata store)."""

    async def upsert_agent(self, record: AgentRecord) -> None: ...

    async def save_agents(self, records: Sequence[AgentRecord]) -> None:
        """Writes every record (inserted or updated by name) in one transaction."""
        ...

    async def get_agent(self, name: str) -> AgentRecord | None: ...

    async def list_agents(self) -> list[AgentRecord]: ...

    async def touch_agents(self, last_seen: dict[str, datetime]) -> None: ...

    async def mark_all_offline(self) -> int: ...

    async def delete_agent(self, name: str) -> bool: ...


class Session:
    """One agent's connection: an outbox of messages for its stream, and how it ended."""

    MAX_OUTBOX = 1024

    def __init__(self, record: AgentRecord) -> None:
        self.id = uuid.uuid4().hex
        self.record = record
        self.last_heard = time.monotonic()
        self.outbox: deque[Any] = deque()
        self.closed = asyncio.Event()
        self.error: DocketError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # Blobs the agent finished fetching (an order that succeeded) on this connection:
        # with its hello's cached digests, what it holds and can serve.
        self.holds: set[str] = set()
        # Heartbeats: the interval the agent was told, whether it follows the interval the
        # server's heartbeats carry (Hello.follows_heartbeat_interval: an older agent keeps
        # its welcome's), and when the server last sent it one.
        self.interval = 0.0
        self.follows_interval = False
        self.beat_sent = time.monotonic()

    @property
    def name(self) -> str:
        return self.record.name

    def holds_any(self, digests: Iterable[str]) -> bool:
        """Whether the agent holds any of these blobs (its hello, or an order since)."""
        cached = self.record.info.cached_digests
        return any(d in self.holds or d in cached for d in digests)

    def send(self, message: Any) -> None:
        """Queues a message for the agent; an agent that stops reading is dropped."""
        if self.closed.is_set():
            return
        if len(self.outbox) >= self.MAX_OUTBOX:
            self.close(
                DeadlineExceeded(
                    Reason.HEARTBEAT_TIMEOUT,
                    f"agent {self.name} stopped reading its stream",
                    agent=self.name,
                )
            )
            return
        self.outbox.append(message)
        self._wake()

    def close(self, error: DocketError | None = None) -> None:
        if not self.closed.is_set():
            self.error = error
            self.closed.set()
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_message(self) -> Any | None:
        """The next message to send, or None once the session is closed (one future per
        wait, not two tasks per message: 10,000 streams are sent to from one loop)."""
        while not self.closed.is_set():
            if self.outbox:
                return self.outbox.popleft()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return None


class Fleet:
    def __init__(
        self,
        store: FleetStore,
        heartbeat_interval: float,
        make_heartbeat: Callable[[float], Any],
        heartbeats_per_second: float = HEARTBEATS_PER_SECOND,
    ) -> None:
        self.store = store
        self.heartbeats_per_second = heartbeats_per_second
        self.heartbeat_interval = heartbeat_interval  # the shortest: --heartbeat-interval
        # The interval in force: what the last sweep told every agent that follows it, and
        # what a welcome tells a new one (interval_for_fleet at each sweep).
        self.interval = heartbeat_interval
        # After the interval shrinks, the one before and until when agents are judged by it:
        # one told the shorter interval may still be sleeping out the longer one.
        self._longer = (0.0, 0.0)
        self._make_heartbeat = make_heartbeat
        self._sessions: dict[str, Session] = {}
        self._records: dict[str, AgentRecord] = {}  # every known agent, as last changed
        self._dirty: dict[str, AgentRecord] = {}  # changed since the last write, by name
        self._dirty_seen: dict[str, datetime] = {}
        self._wrote = asyncio.Lock()  # one write at a time; a delete waits for it
        self._wake_writer = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None

    @property
    def sessions(self) -> dict[str, Session]:
        return self._sessions

    async def start(self) -> None:
        count = await self.store.mark_all_offline()
        if count:
            log.info("agents offline until they reconnect", count=count)
        self._records = {r.name: r for r in await self.store.list_agents()}
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="fleet-sweeper")
        self._writer = asyncio.create_task(self._write_forever(), name="fleet-writer")

    async def stop(self) -> None:
        for task in (self._sweeper, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for session in list(self._sessions.values()):
            session.close()
            self.disconnect(session, "server shutting down")
        try:
            await self.flush()
            await self._flush_last_seen()
        except Exception:
            # The shutdown goes on: the next start marks every agent offline anyway.
            log.exception("cannot write the agents table at shutdown: the last changes are lost")

    def connect(self, info: AgentInfo, peer: str) -> Session:
        """The agent's new session, at once: its row is written behind."""
        validate(info)
        now = datetime.now(UTC)
        current = self._sessions.get(info.name)
        if current is not None:
            if current.record.info.agent_id != info.agent_id:
                raise AlreadyExists(
                    Reason.AGENT_NAME_TAKEN,
                    f"another agent is online as {info.name!r} (from "
                    f"{current.record.peer_address}); give this one another --name",
                    agent=info.name,
                    peer=current.record.peer_address,
                )
            log.info("agent reconnected: replacing its old stream", agent=info.name)
            current.close(
                DocketError(
                    Reason.AGENT_REPLACED,
                    f"agent {info.name} connected again: this stream is replaced",
                    agent=info.name,
                )
            )
        previous = self._records.get(info.name)
        if previous is not None and previous.info.agent_id != info.agent_id:
            log.warning(
                "a different install takes over an offline agent's name",
                agent=info.name,
                old_agent_id=previous.info.agent_id,
                new_agent_id=info.agent_id,
            )
        record = AgentRecord(
            info=info,
            state=AgentState.ONLINE,
            peer_address=peer,
            connect_time=now,
            last_seen_time=now,
            create_time=previous.create_time if previous else now,
        )
        session = Session(record)
        session.interval = self.interval  # (welcome() says whether it follows a change)
        self._sessions[info.name] = session
        self._changed(record)
        log.info(
            "agent online",
            agent=info.name,
            peer=peer,
            groups=list(info.groups),
            docker=info.docker_version or info.docker_error,
            cached_blobs=len(info.cached_digests),
        )
        return session

    def heard(self, session: Session, disk_free_bytes: int | None = None) -> None:
        """Any message from the agent: it is alive."""
        session.last_heard = time.monotonic()
        now = datetime.now(UTC)
        record = replace(session.record, last_seen_time=now)
        if disk_free_bytes is not None:
            record = replace(record, info=replace(record.info, disk_free_bytes=disk_free_bytes))
        session.record = record
        if record.state is AgentState.STALE:
            session.record = record = replace(record, state=AgentState.ONLINE)
            self._changed(record)
            log.info("agent answering again", agent=session.name)
            return
        self._dirty_seen[session.name] = now

    def disconnect(self, session: Session, why: str) -> None:
        """The stream ended. The agent goes offline unless a newer stream replaced it."""
        if self._sessions.get(session.name) is not session:
            return
        del self._sessions[session.name]
        self._dirty_seen.pop(session.name, None)
        self._changed(replace(session.record, state=AgentState.OFFLINE))
        log.info("agent offline", agent=session.name, why=why)

    async def remove(self, name: str) -> bool:
        """Forgets an agent: its stream is closed and its row deleted; whether there was one."""
        session = self._sessions.pop(name, None)
        known = self._records.pop(name, None) is not None
        self._dirty.pop(name, None)
        self._dirty_seen.pop(name, None)
        if session is not None:
            session.close(
                Unauthenticated(
                    Reason.AGENT_REMOVED,
                    f"agent {name} was removed from the fleet by an operator",
                    agent=name,
                )
            )
            log.info("agent removed: its stream is closed", agent=name)
        async with self._wrote:  # a write of its row already under way lands first
            deleted = await self.store.delete_agent(name)
        return deleted or known or session is not None

    async def list(self, selector: str) -> list[AgentRecord]:
        try:
            chosen: Selector = parse_selector(selector)
        except InvalidSelectorError as e:
            raise InvalidArgument(Reason.INVALID_SELECTOR, str(e), selector=selector) from e
        return [
            r
            for r in (self._current(self._records[n]) for n in sorted(self._records))
            if chosen.matches(r.name, r.info.groups, r.info.labels)
        ]

    def count_by_state(self) -> dict[AgentState, int]:
        """How many known agents are in each state, as ``list`` shows them (for metrics)."""
        counts = dict.fromkeys(AgentState, 0)
        for record in self._records.values():
            counts[self._current(record).state] += 1
        return counts

    async def get(self, name: str) -> AgentRecord:
        record = self._records.get(name)
        if record is None:
            raise NotFound(Reason.AGENT_NOT_FOUND, f"agent {name} not found", agent=name)
        return self._current(record)

    def _current(self, known: AgentRecord) -> AgentRecord:
        """The live record of a connected agent; any other is offline, whatever it says."""
        session = self._sessions.get(known.name)
        if session is not None:
            return session.record
        if known.state is not AgentState.OFFLINE:
            return replace(known, state=AgentState.OFFLINE)
        return known

    def _changed(self, record: AgentRecord) -> None:
        """A state change: kept, and written with the next batch."""
        self._records[record.name] = record
        self._dirty[record.name] = record
        self._wake_writer.set()

    async def flush(self) -> None:
        """Writes every change so far (one transaction); on failure they wait for the next."""
        async with self._wrote:
            if not self._dirty:
                return
            batch, self._dirty = self._dirty, {}
            try:
                await self.store.save_agents(list(batch.values()))
            except BaseException:
                for name, record in batch.items():  # a newer change of the same agent wins
                    if name in self._records:
                        self._dirty.setdefault(name, record)
                self._wake_writer.set()
                raise

    async def _write_forever(self) -> None:
        while True:
            await self._wake_writer.wait()
            await asyncio.sleep(WRITE_BEHIND_SECONDS)  # what else changes meanwhile joins
            self._wake_writer.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("cannot write the agents table: retrying")
                await asyncio.sleep(1)

    def interval_for_fleet(self) -> float:
        """The heartbeat interval for the agents connected now: --heartbeat-interval, or
        longer once they would send more than heartbeats_per_second. In whole seconds past
        the shortest, and down only once 1.5 s too long: a fleet that hovers around a size
        does not change it (and write a line in every agent's log) at every sweep."""
        needed = len(self._sessions) / self.heartbeats_per_second
        if needed <= self.heartbeat_interval:
            return self.heartbeat_interval
        if self.interval - 1.5 < needed <= self.interval:
            return self.interval
        return float(math.ceil(needed))

    def welcome(self, session: Session, *, follows_interval: bool) -> float:
        """The heartbeat interval to tell a new session (connect() kept it as what it was
        told), and whether the agent follows the interval's changes."""
        session.follows_interval = follows_interval
        return session.interval

    async def _sweep_forever(self) -> None:
        last_flush = time.monotonic()
        while True:
            # Every shortest interval, whatever the fleet's: agents older than
            # Heartbeat.interval keep theirs, and each sweep sends only what is due.
            await asyncio.sleep(self.heartbeat_interval)
            try:
                self._sweep()
                if time.monotonic() - last_flush >= LAST_SEEN_FLUSH_SECONDS:
                    await self._flush_last_seen()
                    last_flush = time.monotonic()
            except Exception:
                log.exception("fleet sweep failed")

    def _sweep(self) -> None:
        now = time.monotonic()
        interval = self.interval_for_fleet()
        longer = self._longer[0] if now < self._longer[1] else 0.0
        if interval != self.interval:
            log.info("heartbeat interval", seconds=round(interval, 2), agents=len(self._sessions))
            if interval < self.interval:  # (the longest of two shrinks close together)
                longer = max(self.interval, longer)
                self._longer = (longer, now + OFFLINE_AFTER_INTERVALS * longer)
            self.interval = interval
        followers_judged = max(interval, longer)
        beats: dict[float, Any] = {}  # one message for each interval told
        for session in list(self._sessions.values()):
            judged = followers_judged if session.follows_interval else session.interval
            silent = now - session.last_heard
            if silent > OFFLINE_AFTER_INTERVALS * judged:
                session.close(
                    DeadlineExceeded(
                        Reason.HEARTBEAT_TIMEOUT,
                        f"agent {session.name} silent for {silent:.1f}s",
                        agent=session.name,
                    )
                )
                self.disconnect(session, f"no heartbeat for {silent:.1f}s")
                continue
            if (
                silent > STALE_AFTER_INTERVALS * judged
                and session.record.state is AgentState.ONLINE
            ):
                session.record = replace(session.record, state=AgentState.STALE)
                self._changed(session.record)
                log.warning(
                    "agent missed heartbeats", agent=session.name, silent_s=round(silent, 1)
                )
            due = now - session.beat_sent >= session.interval - self.heartbeat_interval / 2
            if session.follows_interval and session.interval != interval:
                session.interval = interval  # told at once
                due = True
            if due:
                beat = beats.get(session.interval)
                if beat is None:
                    beat = beats[session.interval] = self._make_heartbeat(session.interval)
                session.send(beat)
                session.beat_sent = now

    async def _flush_last_seen(self) -> None:
        if self._dirty_seen:
            batch, self._dirty_seen = self._dirty_seen, {}
            await self.store.touch_agents(batch)


def validate(info: AgentInfo) -> None:
    """INVALID_ARGUMENT (INVALID_AGENT) for a hello that does not make an agent."""

    def bad(message: str) -> InvalidArgument:
        return InvalidArgument(Reason.INVALID_AGENT, message, agent=info.name)

    if not is_name(info.name):
        raise bad(
            f"invalid agent name {info.name!r}: letters, digits, '.', '_', '-', up to 64 characters"
        )
    if not info.agent_id or len(info.agent_id) > 64:
        raise bad("the hello carries no agent_id (up to 64 characters)")
    for group in info.groups:
        if not is_name(group) or group == "all":
            raise bad(f"invalid group {group!r}: letters, digits, '.', '_', '-'; not 'all'")
    for key, value in info.labels.items():
        if not is_label(key, value):
            raise bad(f"invalid label {key}={value}")
    for digest in info.cached_digests:
        if not is_digest(digest):
            raise bad(f"invalid cached digest {digest!r}")
    if info.platform:
        try:
            Platform.parse(info.platform)
        except ValueError as e:
            raise bad(str(e)) from None
