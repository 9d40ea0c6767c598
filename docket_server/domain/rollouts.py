"""Rollouts: one image to every host a selector picks, paced, recorded, and watched live.

A rollout starts its canaries first (alone), then the rest, at most ``max_parallel`` hosts
fetching at once. Once more than ``max_failures`` hosts have failed (or any canary has), no new
host starts and the rollout ends failed when the hosts in flight are done. At the deadline,
every host not done is cancelled and the rollout has timed out.

A rollout lives on the server, not in the client that made it: every state change is written
to the store (with a record of it, for `rollouts show`), and after a server restart the
rollouts that were running go on. Their hosts get their orders again when they reconnect;
agents carry out each order once, so nothing finished is fetched twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

import structlog

from docket_common.errors import Reason
from docket_common.manifest import Descriptor, Platform, select_platform
from docket_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from docket_server.domain.fleet import Fleet
from docket_server.domain.models import Blob, Image
from docket_server.domain.orders import OrderBook, Task, TaskState
from docket_server.domain.registry import Registry

log = structlog.get_logger()

WATCH_QUEUE = 10_000
DEFAULT_TIMEOUT = timedelta(minutes=30)
MAX_TIMEOUT = timedelta(days=7)


class RolloutState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


@dataclass
class Rollout:
    id: str
    image: Image
    selector: str
    prefetch_only: bool
    tasks: dict[str, Task]  # by agent name
    canary: int = 0
    max_parallel: int = 0
    max_failures: int = 0
    deadline: datetime = field(default_factory=lambda: datetime.now(UTC) + DEFAULT_TIMEOUT)
    state: RolloutState = RolloutState.RUNNING
    reason: str = ""
    cancelled: bool = False
    create_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    end_time: datetime | None = None

    @property
    def canaries(self) -> list[Task]:
        return [self.tasks[name] for name in sorted(self.tasks)[: self.canary]]

    @property
    def failed(self) -> int:
        return sum(1 for t in self.tasks.values() if t.state is TaskState.FAILED)


@dataclass(frozen=True)
class RolloutEvent:
    time: datetime
    snapshot: Rollout | None = None
    task: Task | None = None
    state: RolloutState | None = None


@dataclass(frozen=True)
class RolloutRecord:
    """A recorded state change of a rollout (agent empty) or of one of its hosts."""

    time: datetime
    agent: str
    task_state: TaskState | None
    rollout_state: RolloutState | None
    message: str


@dataclass(frozen=True)
class _Record:
    rollout_id: str
    record: RolloutRecord


class RolloutStore(Protocol):
    """What rollouts keep (implemented by the SQL metadata store)."""

    async def save_rollout(self, rollout: Rollout) -> None: ...

    async def save_task(self, task: Task) -> None: ...

    async def add_record(self, rollout_id: str, record: RolloutRecord) -> None: ...

    async def list_records(self, rollout_id: str) -> list[RolloutRecord]: ...

    async def load_rollout(self, rollout_id: str) -> Rollout | None: ...

    async def running_rollout_ids(self) -> list[str]: ...

    async def list_rollout_ids(self, offset: int, limit: int) -> list[str]: ...


class Rollouts:
    def __init__(
        self, registry: Registry, fleet: Fleet, orders: OrderBook, store: RolloutStore
    ) -> None:
        self.registry = registry
        self.fleet = fleet
        self.orders = orders
        self.store = store
        self.rollouts: dict[str, Rollout] = {}  # the running ones, and any looked at lately
        self._recorded: dict[str, TaskState] = {}  # the last state written, by order id
        self._watchers: dict[str, list[asyncio.Queue[RolloutEvent | None]]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._writes: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        orders.listen(self._task_changed)

    # Life cycle

    async def start(self) -> None:
        """Picks up the rollouts that were running when the server stopped."""
        self._writer = asyncio.create_task(self._write_forever(), name="rollout-writer")
        for rollout_id in await self.store.running_rollout_ids():
            rollout = await self.store.load_rollout(rollout_id)
            if rollout is None:
                continue
            self.rollouts[rollout.id] = rollout
            gone = False
            for task in rollout.tasks.values():
                task.blobs = await self._blobs(task.image, missing_ok=True)
                if not task.state.terminal and len(task.blobs) < len(set(task.image.blob_digests)):
                    gone = True
                self._recorded[task.order_id] = task.state
                self.orders.add(task)
            log.info("rollout resumed", rollout=rollout.id, image=rollout.image.name)
            self._arm_deadline(rollout)
            if gone:
                self._stop(rollout, "the image's blobs are gone from the server")
            self._advance(rollout)

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for watchers in self._watchers.values():
            for queue in watchers:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)
        await self._writes.join()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    # Commands

    async def create(
        self,
        image_name: str,
        selector: str,
        *,
        prefetch_only: bool = False,
        canary: int = 0,
        max_parallel: int = 0,
        max_failures: int = 0,
        time_limit: timedelta | None = None,
    ) -> Rollout:
        if canary < 0 or max_parallel < 0 or max_failures < 0:
            raise InvalidArgument(
                Reason.INVALID_ROLLOUT,
                "canary, max_parallel and max_failures cannot be negative",
            )
        time_limit = time_limit or DEFAULT_TIMEOUT
        if not timedelta(0) < time_limit <= MAX_TIMEOUT:
            raise InvalidArgument(
                Reason.INVALID_ROLLOUT, f"the timeout must be between 0 and {MAX_TIMEOUT}"
            )
        image = await self.registry.get_image(image_name)
        if not image.is_index and not image.runnable:
            raise InvalidArgument(
                Reason.INVALID_IMAGE,
                f"{image.name} is not an image a Docker engine runs "
                f"({image.artifact_type or image.media_type})",
                name=image.name,
            )
        agents = await self.fleet.list(selector)
        if not agents:
            raise FailedPrecondition(
                Reason.NO_HOSTS, f"no host matches {selector!r}", selector=selector
            )
        blobs: dict[str, dict[str, Blob]] = {}
        for candidate in image.manifests if image.is_index else (image,):
            if candidate.runnable:
                blobs[candidate.digest] = await self._blobs(candidate)
        now = datetime.now(UTC)
        rollout = Rollout(
            id=uuid.uuid4().hex[:12],
            image=image,
            selector=selector,
            prefetch_only=prefetch_only,
            tasks={},
            canary=min(canary, len(agents)),
            max_parallel=max_parallel,
            max_failures=max_failures,
            deadline=now + time_limit,
            create_time=now,
        )
        for agent in agents:
            host_image, why = platform_image(image, agent.info.platform)
            task = Task(
                order_id=uuid.uuid4().hex[:16],
                rollout_id=rollout.id,
                agent=agent.name,
                image=host_image or image,
                blobs=blobs[host_image.digest] if host_image else {},
                load=not prefetch_only,
                index_digest=image.digest if image.is_index else "",
            )
            if host_image is None:
                task.state = TaskState.FAILED
                task.error = why
                task.end_time = now
            rollout.tasks[agent.name] = task
            self.orders.add(task)
            self._recorded[task.order_id] = task.state
        self.rollouts[rollout.id] = rollout
        await self.store.save_rollout(rollout)
        for task in rollout.tasks.values():
            await self.store.save_task(task)
        offline = sorted(a.name for a in agents if a.name not in self.fleet.sessions)
        await self.store.add_record(
            rollout.id,
            RolloutRecord(
                now,
                "",
                None,
                RolloutState.RUNNING,
                f"started: {image.name} to {len(agents)} hosts"
                + (f"; offline for now: {', '.join(offline)}" if offline else ""),
            ),
        )
        for task in rollout.tasks.values():
            if task.state is TaskState.FAILED:  # no image for its platform
                await self.store.add_record(
                    rollout.id, RolloutRecord(now, task.agent, task.state, None, task.error)
                )
        log.info(
            "rollout started",
            rollout=rollout.id,
            image=image.name,
            hosts=len(agents),
            offline=offline,
        )
        self._arm_deadline(rollout)
        self._advance(rollout)
        return rollout

    async def cancel(self, rollout_id: str) -> Rollout:
        rollout = await self.get(rollout_id)
        if rollout.state is RolloutState.RUNNING:
            rollout.cancelled = True
            self._stop(rollout, "cancelled on request")
            for task in rollout.tasks.values():
                self.orders.cancel(task, "the rollout was cancelled")
            self._finish_if_done(rollout)
        return rollout

    async def get(self, rollout_id: str) -> Rollout:
        rollout = self.rollouts.get(rollout_id) or await self.store.load_rollout(rollout_id)
        if rollout is None:
            raise NotFound(
                Reason.ROLLOUT_NOT_FOUND, f"rollout {rollout_id} not found", rollout=rollout_id
            )
        return rollout

    async def page(self, offset: int, limit: int) -> list[Rollout]:
        ids = await self.store.list_rollout_ids(offset, limit)
        return [await self.get(i) for i in ids]

    async def records(self, rollout_id: str) -> list[RolloutRecord]:
        await self.get(rollout_id)
        await self._writes.join()  # what happened so far is written
        return await self.store.list_records(rollout_id)

    async def watch(self, rollout_id: str) -> AsyncIterator[RolloutEvent]:
        rollout = await self.get(rollout_id)
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

    # Pacing

    def _advance(self, rollout: Rollout) -> None:
        """Starts the hosts whose turn it is, and ends the rollout once nothing is left."""
        if rollout.state is not RolloutState.RUNNING:
            return
        canaries = rollout.canaries
        if any(t.state in (TaskState.FAILED, TaskState.CANCELLED) for t in canaries):
            self._stop(rollout, "a canary failed: the other hosts were not started")
        elif rollout.failed > rollout.max_failures:
            self._stop(
                rollout,
                f"{rollout.failed} hosts failed, more than --max-failures {rollout.max_failures}",
            )
        if not rollout.reason:
            if all(t.state is TaskState.SUCCEEDED for t in canaries):
                candidates = sorted(rollout.tasks.values(), key=lambda t: t.agent)
            else:
                candidates = canaries
            active = sum(
                1
                for t in rollout.tasks.values()
                if t.state is not TaskState.QUEUED and not t.state.terminal
            )
            for task in candidates:
                if rollout.max_parallel and active >= rollout.max_parallel:
                    break
                if task.state is TaskState.QUEUED:
                    self.orders.start(task)
                    active += 1
        self._finish_if_done(rollout)

    def _stop(self, rollout: Rollout, reason: str) -> None:
        """No new host starts: the queued ones are cancelled with the reason."""
        if rollout.reason:
            return
        rollout.reason = reason
        log.warning("rollout stops starting hosts", rollout=rollout.id, reason=reason)
        for task in rollout.tasks.values():
            if task.state is TaskState.QUEUED:
                self.orders.cancel(task, f"not started: {reason}")

    def _finish_if_done(self, rollout: Rollout) -> None:
        if rollout.state is not RolloutState.RUNNING:
            return
        if not all(t.state.terminal for t in rollout.tasks.values()):
            return
        states = {t.state for t in rollout.tasks.values()}
        if rollout.cancelled:
            final = RolloutState.CANCELLED
        elif states == {TaskState.SUCCEEDED}:
            final = RolloutState.SUCCEEDED
        else:
            final = RolloutState.FAILED
            if not rollout.reason:
                failed = sorted(
                    t.agent for t in rollout.tasks.values() if t.state is TaskState.FAILED
                )
                rollout.reason = f"failed on {', '.join(failed)}"
        self._end(rollout, final)

    def _end(self, rollout: Rollout, state: RolloutState) -> None:
        now = datetime.now(UTC)
        rollout.state = state
        rollout.end_time = now
        timer = self._timers.pop(rollout.id, None)
        if timer is not None:
            timer.cancel()
        log.info("rollout ended", rollout=rollout.id, state=str(state), reason=rollout.reason)
        self._write("rollout", rollout)
        self._write(
            "record", _Record(rollout.id, RolloutRecord(now, "", None, state, rollout.reason))
        )
        self._emit(rollout, RolloutEvent(now, state=state))

    def _arm_deadline(self, rollout: Rollout) -> None:
        delay = max((rollout.deadline - datetime.now(UTC)).total_seconds(), 0)
        loop = asyncio.get_running_loop()
        self._timers[rollout.id] = loop.call_later(delay, self._time_out, rollout)

    def _time_out(self, rollout: Rollout) -> None:
        self._timers.pop(rollout.id, None)
        if rollout.state is not RolloutState.RUNNING:
            return
        late = [
            t for t in sorted(rollout.tasks.values(), key=lambda t: t.agent) if not t.state.terminal
        ]
        rollout.reason = f"timed out waiting for {', '.join(t.agent for t in late)}"
        self._end(rollout, RolloutState.TIMED_OUT)
        for task in late:
            if task.agent not in self.fleet.sessions and task.state is not TaskState.QUEUED:
                # Offline all along (or since): it counts as failed, and its order is void.
                self.orders.fail(task, "offline until the rollout's timeout")
            else:
                self.orders.cancel(task, "the rollout timed out")

    # Events

    def _task_changed(self, task: Task) -> None:
        rollout = self.rollouts.get(task.rollout_id)
        if rollout is None:
            return
        now = datetime.now(UTC)
        if self._recorded.get(task.order_id) != task.state:
            self._recorded[task.order_id] = task.state
            self._write("task", task)
            self._write(
                "record",
                _Record(rollout.id, RolloutRecord(now, task.agent, task.state, None, task.error)),
            )
        self._emit(rollout, RolloutEvent(now, task=task))
        if task.state.terminal:
            self._advance(rollout)

    def _emit(self, rollout: Rollout, event: RolloutEvent) -> None:
        for queue in list(self._watchers.get(rollout.id, [])):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # Too slow: end its stream (it can watch again, from a fresh snapshot).
                log.warning("a rollout watcher is too slow: dropping it", rollout=rollout.id)
                self._watchers[rollout.id].remove(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    def _write(self, kind: str, item: object) -> None:
        self._writes.put_nowait((kind, item))

    async def _write_forever(self) -> None:
        """Writes state changes in the order they happened, off the callers' paths."""
        while True:
            kind, item = await self._writes.get()
            try:
                if kind == "task":
                    assert isinstance(item, Task)
                    await self.store.save_task(item)
                elif kind == "rollout":
                    assert isinstance(item, Rollout)
                    await self.store.save_rollout(item)
                else:
                    assert isinstance(item, _Record)
                    await self.store.add_record(item.rollout_id, item.record)
            except Exception:
                log.exception("cannot record a rollout change", kind=kind)
            finally:
                self._writes.task_done()

    async def _blobs(self, image: Image, missing_ok: bool = False) -> dict[str, Blob]:
        blobs: dict[str, Blob] = {}
        for digest in image.blob_digests:
            blob = await self.registry.metadata.get_blob(digest)
            if blob is None:
                if missing_ok:
                    continue
                raise NotFound(Reason.BLOB_NOT_FOUND, f"blob {digest} is gone", digest=digest)
            blobs[digest] = blob
        return blobs


def platform_image(image: Image, platform: str) -> tuple[Image | None, str]:
    """The image a host of ``platform`` gets from ``image``: the image itself, or from an
    index the image for that platform (named as the index is); else None and why."""
    if not image.is_index:
        return image, ""
    if not platform:
        return None, f"{image.name} is a multi-platform index and the host did not say its platform"
    want = Platform.parse(platform)
    entries = [
        Descriptor(m.digest, m.size, m.media_type, parsed)
        for m in image.manifests
        if m.runnable and (parsed := parse_platform(m.platform)) is not None
    ]
    chosen = select_platform(entries, want)
    if chosen is None:
        offered = ", ".join(m.platform for m in image.manifests if m.platform) or "none"
        return None, f"{image.name} has no image for {want} (it has {offered})"
    child = next(m for m in image.manifests if m.digest == chosen.digest)
    return child.with_name(image.repository, image.tag), ""


def parse_platform(text: str) -> Platform | None:
    try:
        return Platform.parse(text)
    except ValueError:
        return None
