"""What keeps one server working at fleet scale: a watcher's events coalesced per host
(bounded, never losing a terminal state) and batched many to a message (under a size cap),
peers and peer hints bounded per host, and a rollout to many simulated hosts end to end with
watchers that keep up and that do not, batched and one event a message."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from docket_agent.orders import SETTLE, SOURCES, OrderManager, OrderRunner, OrderSettings
from docket_cli.rollout_view import FLOW
from docket_common.fetch import BlobDownload, BlobFetcher, ReadRange, follow
from docket_common.pb import agent_pb2, rollout_pb2
from docket_common.pb import agent_service_pb2 as pb
from docket_common.pb import rollout_service_pb2 as rpb
from docket_common.pb import rollout_service_pb2_grpc as rpb_grpc
from docket_common.pb.agent_service_pb2_grpc import AgentServiceStub
from docket_server.api.rollout_service import MAX_WATCH_BATCH_BYTES, batches
from docket_server.domain.fleet import AgentInfo, AgentRecord, AgentState, Fleet, Session
from docket_server.domain.models import Blob, Image
from docket_server.domain.orders import MAX_PEERS, OrderBook, OrderPlan, PeerRef, Task, TaskState
from docket_server.domain.rollouts import RolloutEvent, Rollouts, RolloutState, WatchQueue
from tests.support.agents import SimulatedAgent, StartAgent, sim_channel
from tests.support.archives import layer_tar, random_bytes, write_legacy_archive
from tests.support.server import ServerProcess, docketctl
from tests.support.sim_fleet import SimFleet

NOW = datetime.now(UTC)
IMAGE = Image(
    repository="app",
    tag="1",
    config=None,
    layers=(),
    diff_ids=(),
    build_time=None,
    create_time=NOW,
    platform="",
)
BLOB = Blob("sha256:" + "a" * 64, 1, NOW, None)


def task(i: int, state: TaskState = TaskState.QUEUED) -> Task:
    return Task(f"order{i}", "r1", f"h{i:03d}", IMAGE, {BLOB.digest: BLOB}, True, state=state)


# The watcher's queue


def test_a_watch_queue_holds_one_event_per_host_and_the_end_last() -> None:
    queue = WatchQueue()
    tasks = [task(i, TaskState.DOWNLOADING) for i in range(200)]
    for _ in range(10):  # ten reports from every host before the watcher reads
        for t in tasks:
            queue.put_task(t, NOW)
    assert len(queue) == 200
    tasks[7].state = TaskState.SUCCEEDED  # its last report: the one the watcher must see
    queue.put_task(tasks[7], NOW)
    queue.put_end(RolloutEvent(NOW, state=RolloutState.SUCCEEDED))
    events, end = queue.take()
    assert end
    assert len(events) == 201
    assert [e.task.order_id for e in events[:-1] if e.task] == sorted(
        {t.order_id for t in tasks}, key=lambda o: (o == "order7", int(o[5:]))
    )  # each host once; the one that just changed goes to the back
    assert events[-2].task is tasks[7]
    assert events[-2].task.state is TaskState.SUCCEEDED
    assert events[-1].state is RolloutState.SUCCEEDED
    assert queue.peak == 200
    assert len(queue) == 0


async def test_a_watch_queue_wakes_its_reader_and_closes() -> None:
    queue = WatchQueue()
    reader = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not reader.done()
    one = task(1)
    queue.put_task(one, NOW)
    events, end = await asyncio.wait_for(reader, 5)
    assert [e.task for e in events] == [one]
    assert not end
    queue.close()
    events, end = await asyncio.wait_for(queue.get(), 5)
    assert events == []
    assert end


async def test_a_watch_queue_pause_ends_when_the_rollout_does() -> None:
    """Between rounds the watch pauses; the rollout's end cuts the pause short, so the
    watcher hears of it at once, not a round later."""
    queue = WatchQueue()
    paused = asyncio.create_task(queue.pause(60))
    await asyncio.sleep(0.05)
    assert not paused.done()  # nothing ended: a pause is a pause
    queue.put_task(task(1, TaskState.SUCCEEDED), NOW)  # a host's change waits out the pause
    await asyncio.sleep(0.05)
    assert not paused.done()
    queue.put_end(RolloutEvent(NOW, state=RolloutState.SUCCEEDED))
    await asyncio.wait_for(paused, 5)
    events, end = queue.take()
    assert end
    assert [e.state for e in events if e.task is None] == [RolloutState.SUCCEEDED]


# Batches of watch events


def _host_event(i: int, note: str = "") -> rollout_pb2.RolloutEvent:
    event = rollout_pb2.RolloutEvent(
        host=rollout_pb2.RolloutHost(
            agent_name=f"h{i:05d}",
            order_id=f"order{i}",
            state=agent_pb2.TASK_STATE_DOWNLOADING,
            done_bytes=i * 1000,
            total_bytes=10**9,
            error=note,
        )
    )
    event.event_time.FromDatetime(NOW)
    return event


def test_batches_keep_every_event_in_order_under_the_cap() -> None:
    cap = 4096
    # Host events of many sizes (notes of 0 to 300 bytes), then the rollout's end.
    events = [_host_event(i, "x" * (i * 37 % 300)) for i in range(500)]
    events.append(rollout_pb2.RolloutEvent(state=rollout_pb2.ROLLOUT_STATE_SUCCEEDED))
    out = list(batches(events, cap))
    assert [e for batch in out for e in batch] == events  # all of them, in order, once
    sizes = [rpb.WatchRolloutResponse(events=batch).ByteSize() for batch in out]
    assert max(sizes) <= cap
    # Each batch is as full as the cap allows: with the next event it would be over.
    for batch, following in itertools.pairwise(out):
        assert rpb.WatchRolloutResponse(events=[*batch, following[0]]).ByteSize() > cap
    assert len(out) < len(events) / 10
    assert out[-1][-1].state == rollout_pb2.ROLLOUT_STATE_SUCCEEDED


def test_an_event_larger_than_the_cap_goes_alone() -> None:
    big = rollout_pb2.RolloutEvent(
        snapshot=rollout_pb2.Rollout(id="r", hosts=[_host_event(i).host for i in range(100)])
    )
    small = [_host_event(i) for i in range(3)]
    cap = big.ByteSize() // 4
    out = list(batches([small[0], big, small[1], small[2]], cap))
    assert out == [[small[0]], [big], small[1:]]
    assert list(batches([], cap)) == []


def test_batches_take_events_only_as_they_fill_one() -> None:
    taken = 0

    def lazily() -> Iterator[rollout_pb2.RolloutEvent]:
        nonlocal taken
        for i in range(1000):
            taken += 1
            yield _host_event(i)

    out = batches(lazily(), 2048)
    first = next(out)
    # The first batch, and the one event that did not fit: not the thousand.
    assert taken == len(first) + 1
    assert 1 < len(first) < 100
    assert sum(len(b) for b in out) + len(first) == 1000


def test_timestamps_are_those_of_from_datetime() -> None:
    from datetime import timedelta, timezone

    from google.protobuf.timestamp_pb2 import Timestamp

    from docket_server.api.convert import timestamp

    cases = [
        NOW,
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # before the epoch
        datetime(2026, 3, 1, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=-5))),
        datetime(2026, 3, 1, 12, 0, 0, 123_456),  # naive: taken as UTC
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ]
    for value in cases:
        want = Timestamp()
        want.FromDatetime(value)
        assert timestamp(value) == want, value


def test_a_hosts_pieces_are_counted_from_its_bitmaps() -> None:
    t = task(1, TaskState.DOWNLOADING)
    t.pieces = {BLOB.digest: bytearray(b"\xff\x01\x00\x80" + bytes(60))}
    assert t.done_pieces == 10
    t.pieces = {BLOB.digest: bytearray(b"\x0f"), "sha256:" + "b" * 64: bytearray(b"\x03\x00")}
    assert t.done_pieces == 6


# Starting many hosts


@contextlib.asynccontextmanager
async def rollouts_on_sqlite(
    tmp_path: Path, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[tuple[Fleet, OrderBook, Rollouts]]:
    """The rollout controller over a real SQLite store, with one image, "app:1" (a config
    blob alone), and no agent connected yet."""
    from docket_common.manifest import DOCKER_CONFIG
    from docket_server.domain.models import Descriptor
    from docket_server.domain.registry import Registry
    from docket_server.store.sql import SqlMetadataStore
    from tests.test_sql_store import _Registry

    config = Descriptor("sha256:" + "c" * 64, 10, DOCKER_CONFIG)
    image = Image("app", "1", config, (), (), None, NOW, "linux/amd64")
    store = SqlMetadataStore(f"sqlite+aiosqlite:///{tmp_path / 'docket.db'}")
    await store.open()
    try:
        fleet = Fleet(store, 60.0, lambda _interval: None)
        await fleet.start()
        orders = OrderBook(fleet, "server:6881", clock=clock)
        registry = _Registry(image, Blob(config.digest, 10, NOW, None))
        rollouts = Rollouts(cast(Registry, registry), fleet, orders, store)
        await rollouts.start()
        yield fleet, orders, rollouts
        await rollouts.stop()
        await fleet.stop()
    finally:
        await store.close()


async def test_a_rollout_starts_its_hosts_in_slices_and_lets_the_loop_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from docket_server.domain import rollouts as rollouts_module

    monkeypatch.setattr(rollouts_module, "START_SLICE_SECONDS", 0.0)  # one host a slice
    count = 40
    async with rollouts_on_sqlite(tmp_path) as (fleet, orders, rollouts):
        for i in range(count):
            fleet.connect(AgentInfo(f"h{i:03d}", f"id{i}"), "peer")
        seen: list[int] = []  # hosts started, at each turn of the loop while it starts

        async def watch_turns() -> None:
            while True:
                seen.append(sum(1 for t in orders.tasks.values() if t.state is TaskState.PENDING))
                await asyncio.sleep(0)

        turns = asyncio.create_task(watch_turns())
        rollout = await rollouts.create("app:1", "all", prefetch_only=True)
        turns.cancel()
        # Every host has its order once create returns, and the loop turned between them.
        assert {t.state for t in rollout.tasks.values()} == {TaskState.PENDING}
        assert len(set(seen)) > count / 2
        assert seen == sorted(seen)


async def test_orders_pace_their_hosts_reports_by_how_many_fetch_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the server's budget of progress reports, each order asks for them less often:
    every host of a rollout gets the interval its last host will have (the first ones too,
    started slices ahead), --max-parallel counts only the hosts that may fetch at once, and
    hosts that ended count no more."""
    from docket_server.domain import rollouts as rollouts_module
    from docket_server.domain.orders import PROGRESS_EVERY, TaskReport

    monkeypatch.setattr(rollouts_module, "START_SLICE_SECONDS", 0.0)  # one host a slice
    async with rollouts_on_sqlite(tmp_path) as (fleet, orders, rollouts):
        orders.progress_reports_per_second = 10
        sink = CountingSink()
        orders.sink = sink
        for i in range(40):
            fleet.connect(AgentInfo(f"h{i:03d}", f"id{i}"), "peer")

        def end(rollout_tasks: Iterable[Task]) -> None:
            for t in rollout_tasks:
                orders.on_update(t.agent, TaskReport(t.order_id, TaskState.SUCCEEDED))

        rollout = await rollouts.create("app:1", "all", prefetch_only=True)
        assert {p.progress_interval for p in sink.plans.values()} == {4.0}  # 40 hosts / 10
        assert len(sink.plans) == 40
        end(rollout.tasks.values())
        assert orders.progress_interval() == PROGRESS_EVERY  # none fetching

        sink.plans.clear()
        rollout = await rollouts.create("app:1", "all", prefetch_only=True, max_parallel=20)
        assert {p.progress_interval for p in sink.plans.values()} == {2.0}
        assert len(sink.plans) == 20
        first = {t.agent for t in rollout.tasks.values() if t.state is not TaskState.QUEUED}
        sink.plans.clear()
        end(t for t in rollout.tasks.values() if t.agent in sorted(first)[:10])
        await asyncio.sleep(0.1)  # ten ended: the ten that start next fetch beside ten
        assert len(sink.plans) == 10
        assert not first & set(sink.plans)
        assert {p.progress_interval for p in sink.plans.values()} == {2.0}
        while any(not t.state.terminal for t in rollout.tasks.values()):
            end(list(rollout.tasks.values()))
            await asyncio.sleep(0.01)
        assert rollout.state is RolloutState.SUCCEEDED
        assert orders.progress_interval() == PROGRESS_EVERY

        sink.plans.clear()
        await rollouts.create("app:1", "h000,h001", prefetch_only=True)  # few: the floor
        assert {p.progress_interval for p in sink.plans.values()} == {PROGRESS_EVERY}


async def test_the_heartbeat_interval_grows_with_the_fleet_and_shrinks_with_it(
    tmp_path: Path,
) -> None:
    """Past the server's budget of heartbeats the interval grows, and the agents that follow
    the server's heartbeats' interval are told at once; an agent older than that keeps the
    interval of its welcome, and is heartbeaten and judged by it. When the interval shrinks,
    an agent still sleeping out the longer one is judged by it for three of it, not taken
    for silent."""
    sent: dict[str, list[float]] = {}  # the interval each heartbeat said, by agent
    async with rollouts_on_sqlite(tmp_path) as (fleet, _, _):
        fleet.heartbeats_per_second = 10
        fleet.heartbeat_interval = fleet.interval = 0.5
        fleet._make_heartbeat = lambda interval: interval

        def connect(name: str, follows: bool = True) -> Session:
            session = fleet.connect(AgentInfo(name, f"id-{name}"), "p")
            fleet.welcome(session, follows_interval=follows)
            return session

        def sweep(ago: float = 0.0) -> None:
            """A sweep ``ago`` seconds after the last heartbeat each agent was sent."""
            for session in fleet.sessions.values():
                session.beat_sent = time.monotonic() - ago
                session.last_heard = max(session.last_heard, time.monotonic() - ago)
            fleet._sweep()
            for session in fleet.sessions.values():
                while session.outbox:
                    sent.setdefault(session.name, []).append(session.outbox.popleft())

        old = connect("old", follows=False)
        sessions = [connect(f"h{i:03d}") for i in range(39)]
        sweep()
        assert fleet.interval == 4.0  # 40 agents / 10 a second
        assert sent["h000"] == [4.0]  # told at once
        assert "old" not in sent  # not due yet: 0.5 s, not 0
        sweep(ago=1.0)
        assert sent["h000"] == [4.0]  # not due again
        assert sent["old"] == [0.5]  # its own interval, as often
        sessions.append(connect("h039"))
        sessions.append(connect("h040"))
        sweep(ago=1.0)
        assert fleet.interval == 5.0  # 4.2 s needed: in whole seconds
        assert sent["h039"] == [5.0]
        fleet.disconnect(sessions.pop(), "gone")
        sweep()
        assert fleet.interval == 5.0  # 4.1 s needed: not 1.5 s too long, kept
        for session in sessions[29:]:
            fleet.disconnect(session, "gone")
        del sessions[29:]
        sweep()
        assert fleet.interval == 3.0  # 30 agents: 3 s needed
        for session in sessions[1:]:
            fleet.disconnect(session, "gone")
        lone = sessions[0]
        lone.last_heard = time.monotonic() - 6.0  # told 5 s before: a beat late, not silent
        old.last_heard = time.monotonic() - 1.0  # told 0.5 s: two beats late, not silent yet
        sweep()
        assert fleet.interval == 0.5  # two agents: the shortest
        assert sent["h000"][-1] == 0.5
        assert not lone.closed.is_set()
        assert not old.closed.is_set()
        old.last_heard = time.monotonic() - 2.0  # past 3 x its 0.5 s, whatever the others'
        lone.last_heard = time.monotonic() - 6.0
        fleet._sweep()
        assert old.closed.is_set()
        assert not lone.closed.is_set()  # judged by the 5 s of two shrinks ago, for 15 s
        assert fleet._longer[0] == 5.0
        fleet._longer = (5.0, time.monotonic())  # ...and once those are over
        fleet._sweep()
        assert lone.closed.is_set()  # 6 s silent, past 3 x 0.5 s


async def test_a_server_up_for_long_forgets_ended_work_and_still_knows_who_holds_what(
    tmp_path: Path,
) -> None:
    """Ended tasks and rollouts leave memory RETIRE_SECONDS after they end (the store keeps
    them): the book, the first-piece claims' scan of it, and the rollouts held stay the size
    of the work in flight, not of every rollout ever run. A host that succeeded is still
    offered as a peer of the blobs it holds."""
    from docket_server.domain.orders import RETIRE_SECONDS, TaskReport

    now = [1000.0]
    async with rollouts_on_sqlite(tmp_path, clock=lambda: now[0]) as (fleet, orders, rollouts):
        sink = CountingSink()
        orders.sink = sink
        for i in range(3):
            fleet.connect(AgentInfo(f"h{i}", f"id{i}", bt_endpoint=f"10.0.0.{i}:6881"), "p")
        ids = []
        for _ in range(20):  # a rollout every minute, each to h0 and h1
            rollout = await rollouts.create("app:1", "h0,h1", prefetch_only=True)
            for t in rollout.tasks.values():
                orders.on_update(t.agent, TaskReport(t.order_id, TaskState.SUCCEEDED))
            assert rollout.state is RolloutState.SUCCEEDED
            ids.append(rollout.id)
            now[0] += 60
        # Only the last RETIRE_SECONDS of rollouts are held, 2 hosts each.
        held = int(RETIRE_SECONDS // 60) + 1
        assert held < 20  # so that some have left
        assert len(rollouts.rollouts) <= held
        assert len(orders.tasks) <= 2 * held < 40
        assert len(orders.blobs_in_flight()) == 0
        now[0] += RETIRE_SECONDS
        await rollouts.create("app:1", "h2", prefetch_only=True)  # h2 asks: who holds it?
        assert [t.agent for t in orders.tasks.values()] == ["h2"]  # the ended ones left
        assert {p.name for p in sink.orders["h2"]} == {"server", "h0", "h1"}
        # The ended ones are still there to look at, from the store.
        first = await rollouts.get(ids[0])
        assert first.state is RolloutState.SUCCEEDED
        assert {t.agent for t in first.tasks.values()} == {"h0", "h1"}


# What an agent sends, and when


def _order_runner(sent: list[pb.ConnectRequest]) -> OrderRunner:
    manager = SimpleNamespace(
        send=sent.append,
        remember=lambda *_: None,
        received=dict.fromkeys(SOURCES, 0),
        settings=OrderSettings(),
    )
    return OrderRunner(cast(OrderManager, manager), agent_pb2.PullOrder(order_id="o1"))


async def test_an_agent_sends_a_passing_state_only_once_it_lasts() -> None:
    """Accepted, verifying and loading often pass in milliseconds: one that a later state
    replaces within SETTLE is never sent; one that lasts is; the rest go at once."""
    sent: list[pb.ConnectRequest] = []
    runner = _order_runner(sent)

    def states() -> list[str]:
        return [agent_pb2.TaskState.Name(m.task_update.state)[11:] for m in sent]

    runner.update(agent_pb2.TASK_STATE_ACCEPTED)
    assert states() == []
    runner.update(agent_pb2.TASK_STATE_DOWNLOADING)
    assert states() == ["DOWNLOADING"]
    runner.update(agent_pb2.TASK_STATE_VERIFYING)
    runner.update(agent_pb2.TASK_STATE_LOADING)  # a load that takes a while
    await asyncio.sleep(SETTLE * 2)
    assert states() == ["DOWNLOADING", "LOADING"]  # verifying passed, loading lasted
    runner.update(agent_pb2.TASK_STATE_SUCCEEDED)
    assert states() == ["DOWNLOADING", "LOADING", "SUCCEEDED"]
    assert runner.last is sent[-1]

    sent.clear()
    failing = _order_runner(sent)
    failing.update(agent_pb2.TASK_STATE_ACCEPTED)
    assert failing.last is not None  # a reconnect reports it, sent or not
    failing.update(agent_pb2.TASK_STATE_FAILED, "no room")
    await asyncio.sleep(SETTLE * 2)
    assert states() == ["FAILED"]  # the accepted never follows it
    assert sent[0].task_update.error == "no room"


async def test_following_downloads_ends_with_the_last_not_at_the_next_tick() -> None:
    """follow() returns when the last download ends: the order's next state does not wait
    out the rest of a progress tick (up to 250 ms added to every order)."""
    downloads = [
        SimpleNamespace(finished=asyncio.Event(), status=lambda: SimpleNamespace())
        for _ in range(2)
    ]
    ticks: list[float] = []
    following = asyncio.create_task(
        follow(
            cast(BlobFetcher, None),
            cast(list[BlobDownload], downloads),
            read_range=cast(ReadRange, None),
            fallback_after=60,
            on_tick=lambda: ticks.append(time.monotonic()),
        )
    )
    await asyncio.sleep(0.01)
    downloads[0].finished.set()
    await asyncio.sleep(0.01)
    assert not following.done()  # one of two ended
    downloads[1].finished.set()
    await asyncio.wait_for(following, 5)
    assert ticks == []  # both ended inside the first tick, and nothing waited for it


# Peers and peer hints


class CountingSink:
    def __init__(self) -> None:
        self.orders: dict[str, list[PeerRef]] = {}
        self.plans: dict[str, OrderPlan] = {}
        self.hints: dict[str, int] = {}  # by the host told
        self.hint_messages = 0

    def send_order(self, session: Session, task: Task, plan: OrderPlan) -> None:
        self.orders[task.agent] = plan.peers
        self.plans[task.agent] = plan

    def send_peers(self, session: Session, task: Task, peers: list[PeerRef]) -> None:
        self.hints[task.agent] = self.hints.get(task.agent, 0) + len(peers)
        self.hint_messages += 1

    def send_cancel(self, session: Session, task: Task, reason: str) -> None:
        pass


def book_with(count: int) -> tuple[OrderBook, CountingSink, list[Task]]:
    fleet = cast(Fleet, type("F", (), {"sessions": {}})())
    for i in range(count):
        info = AgentInfo(name=f"h{i:03d}", agent_id=str(i), bt_endpoint=f"10.0.0.{i}:6881")
        record = AgentRecord(info, AgentState.ONLINE, "peer", NOW, NOW, NOW)
        fleet.sessions[info.name] = Session(record)
    book = OrderBook(fleet, "server:6881")
    sink = CountingSink()
    book.sink = sink
    tasks = [task(i) for i in range(count)]
    for t in tasks:
        book.add(t)
    return book, sink, tasks


def test_ended_tasks_leave_the_book_in_batches_also_those_taken_in_ended() -> None:
    """A task that ended (also one the book took in already ended, from a rollout running at a
    restart) leaves it RETIRE_SECONDS later, in batches at most every RETIRE_EVERY_SECONDS;
    the tasks in flight stay, in the blob's list of started tasks too."""
    from docket_server.domain.orders import RETIRE_EVERY_SECONDS, RETIRE_SECONDS

    now = [0.0]
    fleet = cast(Fleet, type("F", (), {"sessions": {}})())
    book = OrderBook(fleet, "server:6881", clock=lambda: now[0])

    def ended(i: int) -> None:
        t = task(i, TaskState.DOWNLOADING)
        book.add(t)
        book.fail(t, "gone")

    def started() -> list[str]:
        return [t.order_id for t in book._started.get(BLOB.digest, [])]

    book.add(task(0, TaskState.SUCCEEDED))  # taken in ended, at 0
    ended(1)  # at 0
    now[0] = RETIRE_EVERY_SECONDS / 2
    ended(2)
    book.add(task(3, TaskState.DOWNLOADING))  # in flight
    now[0] = RETIRE_SECONDS - 1
    book.add(task(4))
    assert set(book.tasks) == {"order0", "order1", "order2", "order3", "order4"}
    now[0] = RETIRE_SECONDS
    book.add(task(5))  # a batch: the two that ended at 0
    assert set(book.tasks) == {"order2", "order3", "order4", "order5"}
    assert started() == ["order2", "order3"]
    now[0] = RETIRE_SECONDS + RETIRE_EVERY_SECONDS / 2  # order2 is due; the last batch too near
    book.add(task(6))
    assert "order2" in book.tasks
    now[0] = RETIRE_SECONDS + RETIRE_EVERY_SECONDS
    book.add(task(7))
    assert "order2" not in book.tasks
    assert started() == ["order3"]


def test_a_few_hosts_all_hear_of_each_other() -> None:
    book, sink, tasks = book_with(10)
    for t in tasks:
        book.start(t)
    # Each host's order names the seed and every host that started before it, and each host
    # is told of every one that started after it: 10 hosts, 45 pairs, each pair once.
    for i, t in enumerate(tasks):
        names = [p.name for p in sink.orders[t.agent]]
        assert names == ["server"] + [f"h{j:03d}" for j in range(i)]
        assert sink.hints.get(t.agent, 0) == 9 - i
    assert book.peers_for(tasks[0])[0] == PeerRef("server:6881", "server")
    assert len(book.peers_for(tasks[0])) == 10


def test_many_hosts_get_bounded_peers_and_hints() -> None:
    count = 300
    book, sink, tasks = book_with(count)
    for t in tasks:
        book.start(t)
    assert all(len(peers) <= MAX_PEERS for peers in sink.orders.values())
    assert all(p.name != t.agent for t in tasks for p in sink.orders[t.agent])
    # Not every host hears of every later one: at most MAX_PEERS - 1 hints per new host
    # (all of them would be 300 * 299 / 2 = 44850).
    assert sum(sink.hints.values()) <= count * (MAX_PEERS - 1)
    assert max(sink.hints.values()) <= MAX_PEERS - 1
    # The late hosts' orders are a sample of the fleet, not all the first 49.
    late = {p.name for t in tasks[-20:] for p in sink.orders[t.agent]}
    assert len(late - {f"h{j:03d}" for j in range(MAX_PEERS)} - {"server"}) > 0
    # Failed hosts are not handed out.
    for t in tasks[:-1]:
        t.state = TaskState.FAILED
    assert [p.name for p in book.peers_for(tasks[-1])] == ["server"]
    # A reconnecting agent gets its own orders again, only its own.
    sink.orders.clear()
    book.agent_connected(book.fleet.sessions[tasks[-1].agent])
    assert list(sink.orders) == [tasks[-1].agent]


def test_hosts_starting_together_are_announced_in_one_hint_per_host_told() -> None:
    count = 300
    one_by_one, one_sink, tasks = book_with(count)
    for t in tasks:
        one_by_one.start(t)
    batched, sink, tasks = book_with(count)
    with batched.hints_batched():
        for t in tasks:
            batched.start(t)
        assert sink.hint_messages == 0  # held until the batch ends
    # The same peers told to the same hosts, each host told in one message per MAX_PEERS.
    assert sink.hints == one_sink.hints
    assert one_sink.hint_messages == sum(one_sink.hints.values())
    assert sink.hint_messages <= count
    assert sink.hint_messages < one_sink.hint_messages / 10


# End to end: a real server, simulated hosts in their own process


@pytest.fixture(scope="module")
def scale_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("scale")
    server = ServerProcess(
        data_dir=tmp / "server", extra_args=["--heartbeat-interval", "2", "--log-level", "info"]
    ).start()
    data = random_bytes(1024 * 1024, 5)
    archive = write_legacy_archive(tmp / "app.tar", "scale/app:1", [layer_tar({"f": data})])
    pushed = docketctl("push", "scale/app:1", "--archive", str(archive.path), "-q", server=server)
    assert pushed.returncode == 0, pushed.stderr
    yield server
    server.stop()


def _json_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.timeout(120)
async def test_past_the_servers_message_budget_agents_beat_and_report_less_often(
    tmp_path: Path, agents: StartAgent
) -> None:
    """A real agent among 20 simulated ones, on a server paced for 50 agent messages a
    second. The heartbeat interval grows from 0.3 s to 3 s (21 agents, 10 heartbeats a
    second: 2.1 s, in whole seconds), and the agents that follow it do: one that kept to
    0.3 s would give the server up after 0.9 s of quiet, and reconnect. One simulated agent
    is as old as before Heartbeat.interval: it keeps its welcome's 0.3 s, and the server
    heartbeats it that often. In a rollout to the other 20, each host reports its progress
    every 0.5 s (20 hosts, 40 reports a second), not every 0.25 s."""
    args = ["--heartbeat-interval", "0.3", "--agent-messages-per-second", "50"]
    server = ServerProcess(data_dir=tmp_path / "server", extra_args=args).start()
    try:
        data = random_bytes(4 * 1024 * 1024, 7)
        archive = write_legacy_archive(tmp_path / "a.tar", "pace/app:1", [layer_tar({"f": data})])
        pushed = docketctl(
            "push", "pace/app:1", "--archive", str(archive.path), "-q", server=server
        )
        assert pushed.returncode == 0, pushed.stderr
        # Slow enough (seed only, 1 MiB/s) that its reports' pace shows.
        agent = agents(
            server, "real", groups=["pace"], extra_args=["--max-download-rate", str(1 << 20)]
        )
        names = [f"p{i:02d}" for i in range(19)]
        fleet = SimFleet(server, names, 1, mode="rollout", groups=("pace",), download_seconds=4)
        channel = await sim_channel(server, "old")
        old = SimulatedAgent(
            AgentServiceStub(channel), "old", groups=("old",), follows_heartbeat_interval=False
        )
        old_stream = asyncio.create_task(old.run())
        try:
            await asyncio.wait_for(old.welcomed.wait(), 10)
            await fleet.start()
            _, refused = await fleet.connect()
            assert refused == 0
            deadline = time.monotonic() + 20
            while not any(
                e.get("event") == "heartbeat interval changed" and e["heartbeat_s"] == 3.0
                for e in _json_log(agent.log_path)
            ):
                assert time.monotonic() < deadline, agent.log_tail()
                await asyncio.sleep(0.2)
            beats, started = old.heartbeats_received, time.monotonic()
            rolled = await asyncio.to_thread(
                docketctl, "rollout", "pace/app:1", "--hosts", "pace", "--prefetch-only",
                server=server, timeout=90,
            )  # fmt: skip
            assert rolled.returncode == 0, rolled.stdout + rolled.stderr
            old_beats = (old.heartbeats_received - beats) / (time.monotonic() - started)
            report = await fleet.report()
            log = _json_log(agent.log_path)  # (before the server stops, and the agent's stream)
        finally:
            old_stream.cancel()
            await channel.close()
            await fleet.stop()
    finally:
        server.stop()
    assert report.ended == 0  # no simulated stream was ended either
    assert old.ended is None
    assert old_beats > 1.5  # about 3 a second (0.3 s, sweeps included), not one in 3 s
    events = [e["event"] for e in log]
    assert events.count("connected to server") == 1, agent.log_tail()
    assert "disconnected from server" not in events
    order = next(e for e in log if e["event"] == "order received")
    assert order["progress_s"] == pytest.approx(20 / 40)
    fetched = next(e for e in log if e["event"] == "blobs in the cache")
    assert fetched["download_s"] > 2  # (else the count below says little)
    assert 2 <= fetched["reports"] <= fetched["download_s"] / (20 / 40) + 3


async def _watch(
    stub: rpb_grpc.RolloutServiceStub, rollout_id: str, md: Any, pause: asyncio.Event | None
) -> tuple[dict[str, int], int, int]:
    """Follows a rollout; with ``pause``, reads the snapshot and then nothing until it is
    set. The hosts' last states, the host events and the rollout's final state."""
    last: dict[str, int] = {}
    events = 0
    final = 0
    async for response in stub.WatchRollout(rpb.WatchRolloutRequest(id=rollout_id), metadata=md):
        event = response.event
        kind = event.WhichOneof("change")
        if kind == "snapshot" and pause is not None:
            await pause.wait()
        elif kind == "host":
            events += 1
            last[event.host.agent_name] = event.host.state
        elif kind == "state":
            final = event.state
    return last, events, final


@pytest.mark.timeout(120)
async def test_a_rollout_to_many_hosts_with_a_fast_and_a_stalled_watcher(
    scale_server: ServerProcess, tmp_path: Path
) -> None:
    count, parallel = 120, 25
    names = [f"s{i:03d}" for i in range(count)]
    fleet = SimFleet(
        scale_server, names, 2, mode="rollout", groups=("scale",), download_seconds=1.5
    )
    md = (("authorization", f"Bearer {scale_server.admin_token}"),)
    try:
        await fleet.start()
        latencies, refused = await fleet.connect()
        assert refused == 0
        assert len(latencies) == count
        # The stalled watcher's window is small, so that gRPC cannot buffer what it does
        # not read (it would take hundreds of events into its own buffers).
        small: dict[str, Any] = {"grpc.http2.lookahead_bytes": 1024, "grpc.http2.bdp_probe": 0}
        async with (
            scale_server.aio_channel() as channel,
            scale_server.aio_channel(None, **small) as small_channel,
        ):
            stub = rpb_grpc.RolloutServiceStub(channel)
            stalled_stub = rpb_grpc.RolloutServiceStub(small_channel)
            created = await stub.CreateRollout(
                rpb.CreateRolloutRequest(
                    image_name="scale/app:1", selector="scale", max_parallel=parallel
                ),
                metadata=md,
            )
            rollout_id = created.rollout.id
            pause = asyncio.Event()
            fast = asyncio.create_task(_watch(stub, rollout_id, md, None))
            stalled = asyncio.create_task(_watch(stalled_stub, rollout_id, md, pause))
            last, fast_events, final = await asyncio.wait_for(fast, 90)
            pause.set()  # the stalled watcher reads only now, after the end
            slow_last, slow_events, slow_final = await asyncio.wait_for(stalled, 30)
            # Every host's every state change was recorded (the writer batches them).
            history = await stub.ListRolloutRecords(
                rpb.ListRolloutRecordsRequest(id=rollout_id), metadata=md, timeout=60
            )
        report = await fleet.report()
    finally:
        await fleet.stop()
    succeeded = agent_pb2.TASK_STATE_SUCCEEDED
    assert final == slow_final == rollout_pb2.ROLLOUT_STATE_SUCCEEDED
    assert last == slow_last == {name: succeeded for name in names}
    # The stalled watcher was not dropped, and got far fewer events than the hosts sent
    # reports: what it missed was coalesced to each host's latest state.
    assert len(report.sends) > 5 * count
    assert slow_events < len(report.sends) / 2
    # max_parallel held: never more than `parallel` hosts between their order and the end.
    spans = sorted((report.order_times[a], t) for a, s, _, t in report.sends if s == "succeeded")
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= parallel
    assert fast_events >= count  # every host's change reached the watcher that kept up
    per_host: dict[str, list[int]] = {}
    for record in history.records:
        if record.agent_name:
            per_host.setdefault(record.agent_name, []).append(record.task_state)
    # The simulated hosts send what docket-agent sends when verifying and loading pass
    # within SETTLE: neither, nor the accepted before its download.
    states = [agent_pb2.TASK_STATE_PENDING, agent_pb2.TASK_STATE_DOWNLOADING, succeeded]
    assert per_host == {name: states for name in names}
    assert len(history.records) == 3 * count + 2  # and the rollout's start and end


@dataclass
class _Seen:
    """What one watcher got: each host's events in order, and the stream's messages."""

    hosts: dict[str, list[rollout_pb2.RolloutHost]] = field(default_factory=dict)
    snapshot: rollout_pb2.Rollout | None = None
    final: int = 0
    final_last: bool = False  # the rollout's end came after every other event
    messages: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (bytes, events) a message
    wrong_shape: int = 0  # messages in the other shape than the one asked for


async def _watch_all(
    stub: rpb_grpc.RolloutServiceStub, rollout_id: str, md: Any, batched: bool
) -> _Seen:
    seen = _Seen()
    async for response in stub.WatchRollout(
        rpb.WatchRolloutRequest(id=rollout_id, batched=batched), metadata=md
    ):
        seen.messages += 1
        if batched:
            events = list(response.events)
            seen.wrong_shape += response.HasField("event") or not events
        else:
            events = [response.event]
            seen.wrong_shape += len(response.events) > 0
        seen.sizes.append((response.ByteSize(), len(events)))
        for event in events:
            kind = event.WhichOneof("change")
            seen.final_last = kind == "state"
            if kind == "snapshot":
                seen.snapshot = event.snapshot
            elif kind == "host":
                seen.hosts.setdefault(event.host.agent_name, []).append(event.host)
            elif kind == "state":
                seen.final = event.state
    return seen


@pytest.mark.timeout(300)
async def test_a_batched_watch_of_many_hosts_sees_every_host_to_its_end(
    scale_server: ServerProcess,
) -> None:
    # Enough hosts reporting at once that a round of their changes is over the cap.
    count = 600
    names = [f"b{i:03d}" for i in range(count)]
    fleet = SimFleet(scale_server, names, 2, mode="rollout", groups=("batch",), download_seconds=2)
    md = (("authorization", f"Bearer {scale_server.admin_token}"),)
    try:
        await fleet.start()
        _, refused = await fleet.connect()
        assert refused == 0
        async with scale_server.aio_channel() as channel:
            stub = rpb_grpc.RolloutServiceStub(channel)
            created = await stub.CreateRollout(
                rpb.CreateRolloutRequest(image_name="scale/app:1", selector="batch"), metadata=md
            )
            rollout_id = created.rollout.id
            batched, single = await asyncio.wait_for(
                asyncio.gather(
                    _watch_all(stub, rollout_id, md, batched=True),
                    _watch_all(stub, rollout_id, md, batched=False),
                ),
                240,
            )
        report = await fleet.report()
    finally:
        await fleet.stop()
    assert report.ended == 0
    for seen in (batched, single):
        assert seen.wrong_shape == 0
        assert seen.snapshot is not None
        assert sorted(h.agent_name for h in seen.snapshot.hosts) == names
        assert seen.final == rollout_pb2.ROLLOUT_STATE_SUCCEEDED
        assert seen.final_last
        # Every host's last event is its end, and its events never go backwards.
        assert sorted(seen.hosts) == names
        for name, events in seen.hosts.items():
            assert events[-1].state == agent_pb2.TASK_STATE_SUCCEEDED, name
            flow = [FLOW.index(e.state) for e in events]
            assert flow == sorted(flow), (name, flow)
            done = [e.done_bytes for e in events]
            assert done == sorted(done), (name, done)
    # The batched watcher got the same hosts' changes in far fewer messages, none over the
    # cap but the snapshot (alone in the first), and some rounds filled messages to near it.
    assert batched.sizes[0][1] == 1
    assert all(size <= MAX_WATCH_BATCH_BYTES for size, _ in batched.sizes[1:])
    assert max(size for size, _ in batched.sizes[1:]) > MAX_WATCH_BATCH_BYTES / 2
    host_events = sum(len(e) for e in batched.hosts.values())
    assert host_events >= count
    assert batched.messages < host_events / 20
    assert single.messages == sum(len(e) for e in single.hosts.values()) + 2


# The live view with many hosts


class _NoLive:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def start(self, refresh: bool = False) -> None:
        pass

    def update(self, renderable: Any, refresh: bool = False) -> None:
        pass

    def stop(self) -> None:
        pass


def test_the_live_view_of_1000_hosts_fits_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from docket_cli import render, rollout_view

    monkeypatch.setattr(rollout_view, "Live", _NoLive)
    monkeypatch.setattr(render.stderr, "size", (120, 40))
    mb = 1_000_000
    states = (
        [agent_pb2.TASK_STATE_FAILED] * 10
        + [agent_pb2.TASK_STATE_SUCCEEDED] * 500
        + [agent_pb2.TASK_STATE_DOWNLOADING] * 300
        + [agent_pb2.TASK_STATE_QUEUED] * 190
    )
    hosts = [
        rollout_pb2.RolloutHost(
            agent_name=f"h{i:04d}",
            state=state,
            total_bytes=10 * mb,
            done_bytes=(i % 300) * 10_000 if state == agent_pb2.TASK_STATE_DOWNLOADING else 0,
            rate_bytes_per_second=mb if state == agent_pb2.TASK_STATE_DOWNLOADING else 0,
            error="boom" if state == agent_pb2.TASK_STATE_FAILED else "",
        )
        for i, state in enumerate(states)
    ]
    view = rollout_view.LiveView(rollout_pb2.Rollout(id="r", image_name="app:1", hosts=hosts))
    shown, folded = view.shown()
    assert len(shown) + 1 <= 40 - view.RESERVED_LINES  # the hosts and the fold line
    assert folded == 1000 - len(shown)
    names = {h.agent_name for h in shown}
    assert {f"h{i:04d}" for i in range(10)} <= names  # every failed host is in view
    downloading = [h for h in shown if h.state == agent_pb2.TASK_STATE_DOWNLOADING]
    assert downloading
    slowest = max(h.done_bytes for h in downloading)
    others = [h for h in hosts[510:810] if h.agent_name not in names]
    assert all(h.done_bytes >= slowest for h in others)  # the slowest are the ones shown
    assert view.tally() == [
        ("queued", 190),
        ("downloading", 300),
        ("succeeded", 500),
        ("failed", 10),
    ]

    # Totals kept as events arrive agree with a sum over the hosts.
    for i in range(510, 810):
        done = rollout_pb2.RolloutHost()
        done.CopyFrom(hosts[i])
        done.state = agent_pb2.TASK_STATE_SUCCEEDED
        done.rate_bytes_per_second = 0
        view.event(rollout_pb2.RolloutEvent(host=done))
    assert view._done == sum(
        h.total_bytes if h.state == agent_pb2.TASK_STATE_SUCCEEDED else h.done_bytes
        for h in view.hosts.values()
    )
    assert view._rate == 0
    assert view.tally() == [("queued", 190), ("succeeded", 800), ("failed", 10)]
    out = io.StringIO()
    Console(file=out, width=120, height=40).print(view._render())
    lines = out.getvalue().splitlines()
    assert len(lines) <= 40 - 2
    assert "800/1000 done, 10 failed" in lines[0]
    assert lines[-1].startswith("… ")
