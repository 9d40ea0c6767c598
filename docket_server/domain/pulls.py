"""Pulls through the agents: what runtimes on the hosts pulled from their agents' registry
faces, recorded and watched live.

A pull is a task of the order book like one host of a rollout, started by the host itself:
its agent's registry face was asked for an image (or blobs) it lacks and asked the server for
an order (AgentService.StartPull). The order is scheduled as a rollout's (first pieces from
the server, peers that hold or fetch the same blobs), so many hosts pulling one new image at
once make the server send about one copy. Each pull is written to the store when its state
changes; watchers get every change of every pull.

A pull does not outlive its host's absence: once its agent has been offline for
OFFLINE_GRACE seconds it fails (the runtime's request is gone with the agent; its retry
starts another pull), and pulls a server restart cut short are failed at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from docket_common.errors import Reason
from docket_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from docket_server.domain.fleet import Fleet
from docket_server.domain.models import Blob, Descriptor, Image
from docket_server.domain.orders import OrderBook, Task, TaskState
from docket_server.domain.registry import Registry, valid_digest

log = structlog.get_logger()

OFFLINE_GRACE = 60.0
SWEEP_SECONDS = 5.0
RECENT = timedelta(minutes=10)  # what a watch's snapshot shows, besides the pulls in flight
SNAPSHOT_MAX = 1000
WATCH_QUEUE = 10_000
BLOB_MEDIA_TYPE = "application/octet-stream"


@dataclass
class Pull:
    id: str  # the order's id
    image_name: str  # as the runtime named it; the repository, for blobs alone
    task: Task
    create_time: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def agent(self) -> str:
        return self.task.agent

    @property
    def image_digest(self) -> str:
        """The image manifest's digest; "" for blobs alone."""
        return self.task.image.digest if self.task.image.config is not None else ""

    @property
    def blob_digests(self) -> list[str]:
        return self.task.image.blob_digests


@dataclass(frozen=True)
class PullEvent:
    time: datetime
    snapshot: list[Pull] | None = None
    pull: Pull | None = None


class PullStore(Protocol):
    """What pulls keep (implemented by the SQL metadata store)."""

    async def save_pull(self, pull: Pull) -> None: ...

    async def list_pulls(self, agents: Sequence[str] | None, offset: int, limit: int) -> list[Pull]:
        """Pulls newest first; of those agents only, unless None."""

    async def fail_unfinished_pulls(self, reason: str) -> int: ...


class Pulls:
    def __init__(
        self, registry: Registry, fleet: Fleet, orders: OrderBook, store: PullStore
    ) -> None:
        self.registry = registry
        self.fleet = fleet
        self.orders = orders
        self.store = store
        self.pulls: dict[str, Pull] = {}  # in flight, and ended lately (for watches)
        self._recorded: dict[str, TaskState] = {}
        self._watchers: list[tuple[set[str] | None, asyncio.Queue[PullEvent | None]]] = []
        self._offline_since: dict[str, float] = {}
        self._writes: asyncio.Queue[Pull] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        orders.listen(self._task_changed)

    async def start(self) -> None:
        failed = await self.store.fail_unfinished_pulls("the server restarted during the pull")
        if failed:
            log.info("pulls cut short by a restart marked failed", count=failed)
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="pull-writer"),
            asyncio.create_task(self._sweep_forever(), name="pull-sweeper"),
        ]

    async def stop(self) -> None:
        for _agents, queue in self._watchers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        await self._writes.join()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # Commands

    async def create(
        self,
        agent: str,
        image_name: str,
        repository: str,
        blob_digests: Sequence[str],
        display_name: str = "",
    ) -> Pull:
        """A pull for ``agent`` of an image (its config and layers) or of blobs; the pull in
        progress when the agent already pulls those blobs."""
        if agent not in self.fleet.sessions:
            raise FailedPrecondition(
                Reason.AGENT_NOT_FOUND,
                f"agent {agent!r} has no stream open: pulls are for connected agents",
                agent=agent,
            )
        if image_name:
            image = await self.registry.get_image(image_name)
            if not image.runnable:
                raise InvalidArgument(
                    Reason.INVALID_IMAGE,
                    f"{image.name} is not an image a runtime runs "
                    f"({image.artifact_type or image.media_type}): pull its platform's image",
                    name=image.name,
                )
            name = image_name
        else:
            self.registry.check_repository(repository)
            if not blob_digests:
                raise InvalidArgument(
                    Reason.INVALID_DIGEST, "a pull names an image or at least one blob"
                )
            layers = []
            for digest in dict.fromkeys(blob_digests):
                blob = await self._blob(valid_digest(digest))
                layers.append(Descriptor(blob.digest, blob.size, BLOB_MEDIA_TYPE))
            image = Image(
                repository=repository,
                tag="",
                config=None,
                layers=tuple(layers),
                diff_ids=(),
                build_time=None,
                create_time=datetime.now(UTC),
                platform="",
            )
            name = repository
        blobs = {}
        for digest in image.blob_digests:
            blobs[digest] = await self._blob(digest)
        for pull in self.pulls.values():
            if (
                pull.agent == agent
                and not pull.task.state.terminal
                and set(blobs) == set(pull.task.blobs)
            ):
                return pull
        task = Task(
            order_id=uuid.uuid4().hex[:16],
            rollout_id="",
            agent=agent,
            image=image,
            blobs=blobs,
            load=False,
            pull=True,
        )
        pull = Pull(task.order_id, display_name or name, task)
        self.pulls[pull.id] = pull
        self._recorded[pull.id] = task.state
        self.orders.add(task)
        self.orders.start(task, send=False)  # the answer to StartPull carries the order
        log.info("pull started", pull=pull.id, agent=agent, image=name, blobs=len(blobs))
        return pull

    async def _blob(self, digest: str) -> Blob:
        blob = await self.registry.metadata.get_blob(digest)
        if blob is None:
            raise NotFound(Reason.BLOB_NOT_FOUND, f"blob {digest} not found", digest=digest)
        return blob

    async def page(self, selector: str, page_size: int, page_token: str) -> tuple[list[Pull], str]:
        size = min(page_size or 100, 1000)
        try:
            offset = int(page_token or "0")
        except ValueError:
            offset = -1
        if offset < 0 or page_size < 0:
            raise InvalidArgument(
                Reason.INVALID_PAGE_TOKEN, "page_token is not one ListPulls returned"
            )
        agents = await self._agents(selector)
        found = await self.store.list_pulls(agents, offset, size + 1)
        # What is in memory is fresher (progress is not written on every piece).
        page = [self.pulls.get(p.id, p) for p in found[:size]]
        return page, str(offset + size) if len(found) > size else ""

    async def watch(self, selector: str) -> AsyncIterator[PullEvent]:
        agents = await self._agents(selector)
        queue: asyncio.Queue[PullEvent | None] = asyncio.Queue(WATCH_QUEUE)
        watcher = (None if agents is None else set(agents), queue)
        self._watchers.append(watcher)
        try:
            since = datetime.now(UTC) - RECENT
            recent = [
                p
                for p in self.pulls.values()
                if (agents is None or p.agent in agents)
                and (not p.task.state.terminal or (p.task.end_time or since) > since)
            ]
            recent.sort(key=lambda p: p.create_time, reverse=True)
            yield PullEvent(datetime.now(UTC), snapshot=recent[:SNAPSHOT_MAX])
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._watchers.remove(watcher)

    async def _agents(self, selector: str) -> list[str] | None:
        if not selector or selector == "all":
            return None
        return [a.name for a in await self.fleet.list(selector)]

    # Events

    def _task_changed(self, task: Task) -> None:
        pull = self.pulls.get(task.order_id) if task.pull else None
        if pull is None:
            return
        if self._recorded.get(pull.id) != task.state:
            self._recorded[pull.id] = task.state
            self._writes.put_nowait(pull)
            if task.state.terminal:
                log.info(
                    "pull ended",
                    pull=pull.id,
                    agent=pull.agent,
                    image=pull.image_name,
                    state=str(task.state),
                    error=task.error or None,
                )
        event = PullEvent(datetime.now(UTC), pull=pull)
        for agents, queue in list(self._watchers):
            if agents is not None and pull.agent not in agents:
                continue
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("a pull watcher is too slow: dropping it")
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    async def _write_forever(self) -> None:
        while True:
            pull = await self._writes.get()
            try:
                await self.store.save_pull(pull)
            except Exception:
                log.exception("cannot record a pull", pull=pull.id)
            finally:
                self._writes.task_done()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self._sweep(time.monotonic())

    def _sweep(self, now: float) -> None:
        """Fails the pulls of hosts offline for OFFLINE_GRACE; forgets old ended pulls."""
        online = self.fleet.sessions
        for pull in list(self.pulls.values()):
            task = pull.task
            if task.state.terminal:
                if task.end_time is not None and datetime.now(UTC) - task.end_time > RECENT:
                    del self.pulls[pull.id]
                    self._recorded.pop(pull.id, None)
                continue
            if pull.agent in online:
                self._offline_since.pop(pull.id, None)
                continue
            since = self._offline_since.setdefault(pull.id, now)
            if now - since >= OFFLINE_GRACE:
                self._offline_since.pop(pull.id, None)
                self.orders.fail(task, f"the host was offline for {OFFLINE_GRACE:g}s")
