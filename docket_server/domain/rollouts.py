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
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

import structlog

from docket_common.aio import wait_event
from docket_common.errors import Reason
from docket_common.manifest import Descriptor, Platform, select_platform
from docket_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from docket_server.domain.fleet import Fleet
from docket_server.domain.models import Blob, Image
from docket_server.domain.orders import OrderBook, Task, TaskState, retired
from docket_server.domain.registry import Registry

log = structlog.get_logger()

# A watcher gets at most one update per host per interval (the agents report every 250 ms):
# what changed meanwhile is coalesced, the host's latest state sent once (see WatchQueue).
WATCH_INTERVAL = 0.25
DEFAULT_TIMEOUT = timedelta(minutes=30)
MAX_TIMEOUT = timedelta(days=7)
# The writer takes everything queued, up to this many changes, into one transaction; a
# failed one is tried again (WRITE_ATTEMPTS in all, backing off) before it is given up.
WRITE_BATCH = 5000
WRITE_ATTEMPTS = 8
# Hosts are started (each an order, peers, hints) for at most this long at a time, then the
# rest after a turn of the event loop: 10,000 at once held it for 20-40 s on 2 loaded cores,
# reading no agent's stream, and the fleet then ended every stream as silent.
START_SLICE_SECONDS = 0.05


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


class WatchQueue:
    """One watcher's pending events, bounded by the rollout's hosts: at most one per host
    (the host's latest state: a task is sent as it is when it is sent, so no terminal state
    can be lost), then the rollout's end after every host event before it.

    A watcher that keeps up gets each change; one that falls behind (a slow link, a busy
    terminal) gets fewer, fresher updates instead of a backlog, and is never dropped.
    """

    def __init__(self) -> None:
        self._hosts: dict[str, tuple[Task, datetime]] = {}
        self._end: RolloutEvent | None = None
        self._closed = False
        self._ready = asyncio.Event()
        self._ending = asyncio.Event()  # the end (or a close) is pending: it goes out at once
        self.peak = 0  # the most host events ever pending at once

    def __len__(self) -> int:
        return len(self._hosts) + (self._end is not None)

    def put_task(self, task: Task, when: datetime) -> None:
        self._hosts.pop(task.order_id, None)  # to the back: the others have waited longer
        self._hosts[task.order_id] = (task, when)
        self.peak = max(self.peak, len(self._hosts))
        self._ready.set()

    def put_end(self, event: RolloutEvent) -> None:
        self._end = event
        self._ready.set()
        self._ending.set()

    def close(self) -> None:
        """Ends the watch (the server stops) after what is pending."""
        self._closed = True
        self._ready.set()
        self._ending.set()

    async def pause(self, seconds: float) -> None:
        """Sleeps between rounds, for ``seconds`` or until the end is pending: a watcher
        learns the rollout ended (and the host changes that ended it) without waiting out
        the round."""
        await wait_event(self._ending, seconds)

    def take(self) -> tuple[list[RolloutEvent], bool]:
        """Everything pending, without waiting; and whether the watch is over."""
        hosts, self._hosts = self._hosts, {}
        events = [RolloutEvent(when, task=task) for task, when in hosts.values()]
        end = self._end is not None or self._closed
        if self._end is not None:
            events.append(self._end)
            self._end = None
        self._ready.clear()
        return events, end

    async def get(self) -> tuple[list[RolloutEvent], bool]:
        """Waits until something is pending, then takes it all."""
        await self._ready.wait()
        return self.take()


class RolloutStore(Protocol):
    """What rollouts keep (implemented by the SQL metadata store)."""

    async def save_rollout(self, rollout: Rollout) -> None: ...

    async def save_task(self, task: Task) -> None: ...

    async def add_record(self, rollout_id: str, record: RolloutRecord) -> None: ...

    async def save_rollout_changes(
        self,
        rollouts_: Sequence[Rollout],
        tasks: Sequence[Task],
        records: Sequence[tuple[str, RolloutRecord]],
    ) -> None:
        """Writes rollouts, then tasks (each inserted or updated), then appends records: all
        in one transaction."""
        ...

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
        self._watchers: dict[str, list[WatchQueue]] = {}
        self.watch_interval = WATCH_INTERVAL
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._writes: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self._unsaved: set[str] = set()  # order ids with a save queued: one is enough
        # Per running rollout: its hosts by state, its canaries, and its hosts not started
        # yet in the order they start (so a host's end costs O(1), not a scan of them all).
        self._counts: dict[str, Counter[TaskState]] = {}
        self._canaries: dict[str, list[Task]] = {}
        self._queued: dict[str, deque[Task]] = {}
        self._advancing: set[str] = set()  # rollouts with hosts to start on the next turn
        self._ended: deque[tuple[float, str]] = deque()  # ended rollouts, by when, to retire
        self._writer: asyncio.Task[None] | None = None
        self.on_end: Callable[[Rollout], None] = lambda _rollout: None  # metrics watch this
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
            self._track(rollout)
            log.info("rollout resumed", rollout=rollout.id, image=rollout.image.name)
            self._arm_deadline(rollout)
            if gone:
                self._stop(rollout, "the image's blobs are gone from the server")
            self._advance_now_and_later(rollout)

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for watchers in self._watchers.values():
            for queue in watchers:
                queue.close()
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
        offline = sorted(a.name for a in agents if a.name not in self.fleet.sessions)
        records = [
            (
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
        ]
        records += [
            (rollout.id, RolloutRecord(now, t.agent, t.state, None, t.error))
            for t in rollout.tasks.values()
            if t.state is TaskState.FAILED  # no image for its platform
        ]
        # The rollout, its hosts and its start in one transaction, before any order goes
        # out: a crash leaves all of it or none (10,000 hosts: one executemany, not 10,000
        # awaited round trips).
        await self.store.save_rollout_changes([rollout], list(rollout.tasks.values()), records)
        self._retire_ended()
        for task in rollout.tasks.values():
            self.orders.add(task)
            self._recorded[task.order_id] = task.state
        self.rollouts[rollout.id] = rollout
        self._track(rollout)
        log.info(
            "rollout started",
            rollout=rollout.id,
            image=image.name,
            hosts=len(agents),
            offline=offline,
        )
        self._arm_deadline(rollout)
        # Every host that may start has its order when this returns, the loop turning
        # between slices (the agents' streams are read meanwhile).
        more = self._advance(rollout)
        while more:
            await asyncio.sleep(0)
            more = self._advance(rollout)
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

    async def watch(self, rollout_id: str) -> AsyncIterator[list[RolloutEvent]]:
        """A snapshot, then the changes in rounds: each round is everything pending (each host
        at most once, as it is when the caller reads it), the rounds ``watch_interval``
        apart. The caller sends a round before it asks for the next, so a slow watcher's
        rounds come further apart and hold fresher states, not more of them."""
        rollout = await self.get(rollout_id)
        queue = WatchQueue()
        watchers = self._watchers.setdefault(rollout_id, [])
        watchers.append(queue)
        try:
            yield [RolloutEvent(datetime.now(UTC), snapshot=rollout)]
            if rollout.state is not RolloutState.RUNNING:
                yield [RolloutEvent(datetime.now(UTC), state=rollout.state)]
                return
            while True:
                events, end = await queue.get()
                began = time.monotonic()
                if events:
                    yield events
                if end:
                    return
                # What changes meanwhile waits, coalesced, for the next round.
                await queue.pause(self.watch_interval - (time.monotonic() - began))
        finally:
            watchers.remove(queue)
            if not watchers:
                self._watchers.pop(rollout_id, None)

    def watch_backlog(self, rollout_id: str) -> list[int]:
        """How many events each watcher of a rollout has pending (for tests and metrics)."""
        return [len(q) for q in self._watchers.get(rollout_id, [])]

    def _track(self, rollout: Rollout) -> None:
        """Starts the bookkeeping that _advance reads instead of scanning every host."""
        self._counts[rollout.id] = Counter(t.state for t in rollout.tasks.values())
        self._canaries[rollout.id] = rollout.canaries
        self._queued[rollout.id] = deque(
            t
            for t in sorted(rollout.tasks.values(), key=lambda t: t.agent)
            if t.state is TaskState.QUEUED
        )

    # Pacing

    def _advance(self, rollout: Rollout) -> bool:
        """Starts the hosts whose turn it is, and ends the rollout once nothing is left.
        True when it stopped after START_SLICE_SECONDS with hosts left to start now: the
        caller lets the event loop turn, then calls again."""
        if rollout.state is not RolloutState.RUNNING:
            return False
        more = False
        counts = self._counts[rollout.id]
        canaries = self._canaries[rollout.id]
        failed = counts[TaskState.FAILED]
        if any(t.state in (TaskState.FAILED, TaskState.CANCELLED) for t in canaries):
            self._stop(rollout, "a canary failed: the other hosts were not started")
        elif failed > rollout.max_failures:
            self._stop(
                rollout,
                f"{failed} hosts failed, more than --max-failures {rollout.max_failures}",
            )
        if not rollout.reason and rollout.state is RolloutState.RUNNING:
            active = len(rollout.tasks) - counts[TaskState.QUEUED] - _terminal(counts)

            def room() -> bool:
                return not rollout.max_parallel or active < rollout.max_parallel

            queued = self._queued[rollout.id]
            past_canaries = all(t.state is TaskState.SUCCEEDED for t in canaries)
            # What may start now, counted in when orders set their hosts' report pace.
            starting = len(queued) if past_canaries else len(canaries)
            if rollout.max_parallel:
                starting = min(starting, max(rollout.max_parallel - active, 0))
            with self.orders.hints_batched(), self.orders.starting(starting):
                if past_canaries:
                    until = time.monotonic() + START_SLICE_SECONDS
                    while queued and room():
                        task = queued.popleft()
                        if task.state is TaskState.QUEUED:  # (a canary has gone already)
                            self.orders.start(task)
                            active += 1
                        if queued and time.monotonic() > until:  # the rest after a turn
                            more = True
                            break
                else:
                    for task in canaries:
                        if not room():
                            break
                        if task.state is TaskState.QUEUED:
                            self.orders.start(task)
                            active += 1
        self._finish_if_done(rollout)
        return more

    def _advance_now_and_later(self, rollout: Rollout) -> None:
        """_advance, and what it left goes on after each turn of the event loop."""
        if rollout.id in self._advancing or not self._advance(rollout):
            return
        self._advancing.add(rollout.id)

        def advance() -> None:
            self._advancing.discard(rollout.id)
            self._advance_now_and_later(rollout)

        asyncio.get_running_loop().call_soon(advance)

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
        counts = self._counts.get(rollout.id)
        if counts is not None and _terminal(counts) < len(rollout.tasks):
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
        for table in (self._counts, self._canaries, self._queued):
            table.pop(rollout.id, None)
        log.info("rollout ended", rollout=rollout.id, state=str(state), reason=rollout.reason)
        self._ended.append((self.orders.clock(), rollout.id))
        self._retire_ended()
        self._write("rollout", rollout)
        self._write(
            "record", _Record(rollout.id, RolloutRecord(now, "", None, state, rollout.reason))
        )
        self._emit(rollout, RolloutEvent(now, state=state))
        self.on_end(rollout)

    def _retire_ended(self) -> None:
        """Forgets the rollouts that ended RETIRE_SECONDS ago or more (the store has them):
        a server up for months would otherwise keep every rollout it ran, with its hosts."""
        for rollout_id in retired(self._ended, self.orders.clock()):
            rollout = self.rollouts.get(rollout_id)
            if rollout is None or rollout.state is RolloutState.RUNNING:
                continue
            del self.rollouts[rollout_id]
            for task in rollout.tasks.values():
                self._recorded.pop(task.order_id, None)

    def running(self) -> int:
        """How many rollouts are running (for metrics)."""
        return len(self._counts)

    def host_states(self) -> Counter[TaskState]:
        """The hosts of the running rollouts by state (for metrics)."""
        total: Counter[TaskState] = Counter()
        for counts in self._counts.values():
            total.update(counts)
        return total

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
        before = self._recorded.get(task.order_id)
        if before != task.state:
            counts = self._counts.get(rollout.id)
            if counts is not None:
                if before is not None:
                    counts[before] -= 1
                counts[task.state] += 1
            self._recorded[task.order_id] = task.state
            self._write("task", task)
            self._write(
                "record",
                _Record(rollout.id, RolloutRecord(now, task.agent, task.state, None, task.error)),
            )
        self._emit(rollout, RolloutEvent(now, task=task))
        if task.state.terminal:
            self._advance_now_and_later(rollout)

    def _emit(self, rollout: Rollout, event: RolloutEvent) -> None:
        for queue in self._watchers.get(rollout.id, ()):
            if event.task is not None:
                queue.put_task(event.task, event.time)
            else:
                queue.put_end(event)

    def _write(self, kind: str, item: object) -> None:
        if isinstance(item, Task):
            if item.order_id in self._unsaved:  # the queued save will write it as it is then
                return
            self._unsaved.add(item.order_id)
        self._writes.put_nowait((kind, item))

    async def _write_forever(self) -> None:
        """Writes state changes in the order they happened, off the callers' paths: what
        queued while one transaction ran goes into the next (each host's row once, as it is
        then; every record, in order)."""
        while True:
            items = [await self._writes.get()]
            while not self._writes.empty() and len(items) < WRITE_BATCH:
                items.append(self._writes.get_nowait())
            rollouts: dict[str, Rollout] = {}
            tasks: dict[str, Task] = {}
            records: list[tuple[str, RolloutRecord]] = []
            for kind, item in items:
                if isinstance(item, Task):
                    self._unsaved.discard(item.order_id)  # a change from now on saves again
                    tasks[item.order_id] = item
                elif isinstance(item, Rollout):
                    rollouts[item.id] = item
                else:
                    assert isinstance(item, _Record), kind
                    records.append((item.rollout_id, item.record))
            try:
                await self._save(list(rollouts.values()), list(tasks.values()), records)
            finally:
                for _ in items:
                    self._writes.task_done()

    async def _save(
        self,
        rollouts: list[Rollout],
        tasks: list[Task],
        records: list[tuple[str, RolloutRecord]],
    ) -> None:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                await self.store.save_rollout_changes(rollouts, tasks, records)
                return
            except Exception:
                if attempt == WRITE_ATTEMPTS:
                    log.exception(
                        "cannot record rollout changes: given up",
                        tasks=len(tasks),
                        records=len(records),
                    )
                    return
                log.warning("cannot record rollout changes: trying again", attempt=attempt)
                await asyncio.sleep(min(0.1 * 2**attempt, 5.0))

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


def _terminal(counts: Counter[TaskState]) -> int:
    return counts[TaskState.SUCCEEDED] + counts[TaskState.FAILED] + counts[TaskState.CANCELLED]


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
