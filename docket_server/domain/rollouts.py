"""Rollouts: one image to every host a selector picks, each host a pull order, watched live.

Every change of a rollout's tasks is an event; watchers get a snapshot and then the events.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import structlog

from docket_common.errors import Reason
from docket_server.domain.errors import FailedPrecondition, NotFound
from docket_server.domain.fleet import Fleet
from docket_server.domain.models import Blob, Image
from docket_server.domain.orders import OrderBook, Task, TaskState
from docket_server.domain.registry import Registry

log = structlog.get_logger()

WATCH_QUEUE = 10_000


class RolloutState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class Rollout:
    id: str
    image: Image
    selector: str
    prefetch_only: bool
    tasks: dict[str, Task]  # by agent name
    state: RolloutState = RolloutState.RUNNING
    create_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    end_time: datetime | None = None


@dataclass(frozen=True)
class RolloutEvent:
    time: datetime
    snapshot: Rollout | None = None
    task: Task | None = None
    state: RolloutState | None = None


class Rollouts:
    def __init__(self, registry: Registry, fleet: Fleet, orders: OrderBook) -> None:
        self.registry = registry
        self.fleet = fleet
        self.orders = orders
        self.rollouts: dict[str, Rollout] = {}
        self._watchers: dict[str, list[asyncio.Queue[RolloutEvent | None]]] = {}
        orders.listen(self._task_changed)

    async def create(self, image_name: str, selector: str, prefetch_only: bool) -> Rollout:
        image = await self.registry.get_image(image_name)
        agents = await self.fleet.list(selector)
        if not agents:
            raise FailedPrecondition(
                Reason.NO_HOSTS, f"no host matches {selector!r}", selector=selector
            )
        blobs: dict[str, Blob] = {}
        for digest in image.blob_digests:
            blob = await self.registry.metadata.get_blob(digest)
            if blob is None:
                raise NotFound(Reason.BLOB_NOT_FOUND, f"blob {digest} is gone", digest=digest)
            blobs[digest] = blob
        rollout = Rollout(uuid.uuid4().hex[:12], image, selector, prefetch_only, {})
        self.rollouts[rollout.id] = rollout
        for agent in agents:
            rollout.tasks[agent.name] = self.orders.create(
                agent.name, image, blobs, load=not prefetch_only, rollout_id=rollout.id
            )
        log.info("rollout started", rollout=rollout.id, image=image.name, hosts=len(agents))
        return rollout

    def get(self, rollout_id: str) -> Rollout:
        rollout = self.rollouts.get(rollout_id)
        if rollout is None:
            raise NotFound(
                Reason.ROLLOUT_NOT_FOUND, f"rollout {rollout_id} not found", rollout=rollout_id
            )
        return rollout

    async def watch(self, rollout_id: str) -> AsyncIterator[RolloutEvent]:
        rollout = self.get(rollout_id)
        queue: asyncio.Queue[RolloutEvent | None] = asyncio.Queue(WATCH_QUEUE)
        watchers = self._watchers.setdefault(rollout_id, [])
        watchers.append(queue)
        try:
            yield RolloutEvent(datetime.now(UTC), snapshot=rollout)
            if rollout.state is not RolloutState.RUNNING:
                yield RolloutEvent(datetime.now(UTC), state=rollout.state)
                return
            while (event := await queue.get()) is not None:
                yield event
                if event.state is not None:
                    return
        finally:
            watchers.remove(queue)

    def _emit(self, rollout: Rollout, event: RolloutEvent) -> None:
        for queue in self._watchers.get(rollout.id, []):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                queue.put_nowait(None) if queue.empty() else None
                log.warning("a rollout watcher is too slow: dropping it", rollout=rollout.id)

    def _task_changed(self, task: Task) -> None:
        rollout = self.rollouts.get(task.rollout_id)
        if rollout is None:
            return
        now = datetime.now(UTC)
        self._emit(rollout, RolloutEvent(now, task=task))
        if rollout.state is RolloutState.RUNNING and all(
            t.state.terminal for t in rollout.tasks.values()
        ):
            states = {t.state for t in rollout.tasks.values()}
            rollout.state = (
                RolloutState.SUCCEEDED
                if states == {TaskState.SUCCEEDED}
                else RolloutState.CANCELLED
                if TaskState.CANCELLED in states and TaskState.FAILED not in states
                else RolloutState.FAILED
            )
            rollout.end_time = now
            log.info("rollout ended", rollout=rollout.id, state=str(rollout.state))
            self._emit(rollout, RolloutEvent(now, state=rollout.state))
