"""The fleet: every agent's one stream, its liveness, and the table operators read.

Each connected agent has a Session. Heartbeats flow both ways every interval: the fleet's
sweeper sends the server's and watches the agents'. An agent silent for two intervals is
STALE; for three, its stream is closed and it is OFFLINE. The table is persisted on every state
change; last-seen times are written in batches, not on every heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
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
LAST_SEEN_FLUSH_SECONDS = 10.0


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

    async def get_agent(self, name: str) -> AgentRecord | None: ...

    async def list_agents(self) -> list[AgentRecord]: ...

    async def touch_agents(self, last_seen: dict[str, datetime]) -> None: ...

    async def mark_all_offline(self) -> int: ...

    async def delete_agent(self, name: str) -> bool: ...


class Session:
    """One agent's connection: an outbox of messages for its stream, and how it ended."""

    def __init__(self, record: AgentRecord) -> None:
        self.id = uuid.uuid4().hex
        self.record = record
        self.last_heard = time.monotonic()
        self.outbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=1024)
        self.closed = asyncio.Event()
        self.error: DocketError | None = None

    @property
    def name(self) -> str:
        return self.record.name

    def send(self, message: Any) -> None:
        """Queues a message for the agent; an agent that stops reading is dropped."""
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.close(
                DeadlineExceeded(
                    Reason.HEARTBEAT_TIMEOUT,
                    f"agent {self.name} stopped reading its stream",
                    agent=self.name,
                )
            )

    def close(self, error: DocketError | None = None) -> None:
        if not self.closed.is_set():
            self.error = error
            self.closed.set()

    async def next_message(self) -> Any | None:
        """The next message to send, or None once the session is closed."""
        if self.closed.is_set():
            return None
        get = asyncio.ensure_future(self.outbox.get())
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            done, _ = await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (get, closed):
                if not task.done():
                    task.cancel()
        if get in done and not self.closed.is_set():
            return get.result()
        return None


class Fleet:
    def __init__(
        self,
        store: FleetStore,
        heartbeat_interval: float,
        make_heartbeat: Callable[[], Any],
    ) -> None:
        self.store = store
        self.heartbeat_interval = heartbeat_interval
        self._make_heartbeat = make_heartbeat
        self._sessions: dict[str, Session] = {}
        self._dirty_seen: dict[str, datetime] = {}
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def sessions(self) -> dict[str, Session]:
        return self._sessions

    async def start(self) -> None:
        count = await self.store.mark_all_offline()
        if count:
            log.info("agents offline until they reconnect", count=count)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="fleet-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for session in list(self._sessions.values()):
            session.close()
            await self.disconnect(session, "server shutting down")

    async def connect(self, info: AgentInfo, peer: str) -> Session:
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
        previous = await self.store.get_agent(info.name)
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
        self._sessions[info.name] = session
        await self.store.upsert_agent(record)
        log.info(
            "agent online",
            agent=info.name,
            peer=peer,
            groups=list(info.groups),
            docker=info.docker_version or info.docker_error,
            cached_blobs=len(info.cached_digests),
        )
        return session

    async def heard(self, session: Session, disk_free_bytes: int | None = None) -> None:
        """Any message from the agent: it is alive."""
        session.last_heard = time.monotonic()
        now = datetime.now(UTC)
        record = replace(session.record, last_seen_time=now)
        if disk_free_bytes is not None:
            record = replace(record, info=replace(record.info, disk_free_bytes=disk_free_bytes))
        if record.state is AgentState.STALE:
            record = replace(record, state=AgentState.ONLINE)
            session.record = record
            await self.store.upsert_agent(record)
            log.info("agent answering again", agent=session.name)
            return
        session.record = record
        self._dirty_seen[session.name] = now

    async def disconnect(self, session: Session, why: str) -> None:
        """The stream ended. The agent goes offline unless a newer stream replaced it."""
        if self._sessions.get(session.name) is not session:
            return
        del self._sessions[session.name]
        self._dirty_seen.pop(session.name, None)
        record = replace(session.record, state=AgentState.OFFLINE)
        await self.store.upsert_agent(record)
        log.info("agent offline", agent=session.name, why=why)

    async def remove(self, name: str) -> bool:
        """Forgets an agent: its stream is closed and its row deleted; whether there was one."""
        session = self._sessions.pop(name, None)
        if session is not None:
            self._dirty_seen.pop(name, None)
            session.close(
                Unauthenticated(
                    Reason.AGENT_REMOVED,
                    f"agent {name} was removed from the fleet by an operator",
                    agent=name,
                )
            )
            log.info("agent removed: its stream is closed", agent=name)
        return await self.store.delete_agent(name) or session is not None

    async def list(self, selector: str) -> list[AgentRecord]:
        try:
            chosen: Selector = parse_selector(selector)
        except InvalidSelectorError as e:
            raise InvalidArgument(Reason.INVALID_SELECTOR, str(e), selector=selector) from e
        records = {r.name: self._current(r) for r in await self.store.list_agents()}
        return [
            r
            for r in sorted(records.values(), key=lambda r: r.name)
            if chosen.matches(r.name, r.info.groups, r.info.labels)
        ]

    async def get(self, name: str) -> AgentRecord:
        record = await self.store.get_agent(name)
        if record is None:
            raise NotFound(Reason.AGENT_NOT_FOUND, f"agent {name} not found", agent=name)
        return self._current(record)

    def _current(self, stored: AgentRecord) -> AgentRecord:
        """The live record of a connected agent; a stored one is offline, whatever it says.

        Only a session makes an agent online: a write that a crash or a cancelled task cut
        short cannot leave a ghost online.
        """
        session = self._sessions.get(stored.name)
        if session is not None:
            return session.record
        if stored.state is not AgentState.OFFLINE:
            return replace(stored, state=AgentState.OFFLINE)
        return stored

    async def _sweep_forever(self) -> None:
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self._sweep()
                if time.monotonic() - last_flush >= LAST_SEEN_FLUSH_SECONDS:
                    await self._flush_last_seen()
                    last_flush = time.monotonic()
            except Exception:
                log.exception("fleet sweep failed")

    async def _sweep(self) -> None:
        now = time.monotonic()
        heartbeat = self._make_heartbeat()
        for session in list(self._sessions.values()):
            silent = now - session.last_heard
            if silent > OFFLINE_AFTER_INTERVALS * self.heartbeat_interval:
                session.close(
                    DeadlineExceeded(
                        Reason.HEARTBEAT_TIMEOUT,
                        f"agent {session.name} silent for {silent:.1f}s",
                        agent=session.name,
                    )
                )
                await self.disconnect(session, f"no heartbeat for {silent:.1f}s")
                continue
            if (
                silent > STALE_AFTER_INTERVALS * self.heartbeat_interval
                and session.record.state is AgentState.ONLINE
            ):
                session.record = replace(session.record, state=AgentState.STALE)
                await self.store.upsert_agent(session.record)
                log.warning(
                    "agent missed heartbeats", agent=session.name, silent_s=round(silent, 1)
                )
            session.send(heartbeat)

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
