"""Agents against a real server: registration, selectors, liveness, reconnection, refusals,
and streams that misbehave."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from docket_common.errors import error_info
from docket_common.pb import agent_pb2
from docket_common.pb import agent_service_pb2 as pb
from docket_common.pb import agent_service_pb2_grpc as pb_grpc
from tests.support.agents import (
    AgentProcess,
    SimulatedAgent,
    agent_channel,
    agents_json,
    enroll,
    sim_channel,
    wait_for_states,
)
from tests.support.dockerd import DockerEngine
from tests.support.server import ServerProcess, docketctl

FAST = ["--heartbeat-interval", "0.5", "--hello-timeout", "1"]


@pytest.fixture
def fleet_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with 0.5 s heartbeats (stale after 1 s of silence, offline after 1.5 s)."""
    proc = ServerProcess(data_dir=tmp_path / "server", extra_args=FAST).start()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture
def start_agent(fleet_server: ServerProcess, tmp_path: Path) -> Iterator[object]:
    started: list[AgentProcess] = []

    def start(name: str, **kwargs: object) -> AgentProcess:
        agent = AgentProcess(
            server=fleet_server,
            data_dir=tmp_path / name,
            name=name,
            **kwargs,  # type: ignore[arg-type]
        ).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def test_agents_register_with_what_they_say_about_themselves(
    fleet_server: ServerProcess, start_agent: object, tmp_path: Path
) -> None:
    cached = "ab" * 32
    (tmp_path / "web1" / "blobs" / "sha256" / "ab").mkdir(parents=True)
    (tmp_path / "web1" / "blobs" / "sha256" / "ab" / cached).write_bytes(b"x")
    start_agent("web1", groups=["web"], labels={"env": "prod"})  # type: ignore[operator]
    start_agent("web2", groups=["web"], labels={"env": "staging"})  # type: ignore[operator]
    start_agent("db1", groups=["db", "stateful"], labels={"env": "prod"})  # type: ignore[operator]
    agents = wait_for_states(fleet_server, {"web1": "online", "web2": "online", "db1": "online"})
    web1 = agents["web1"]
    assert web1["groups"] == ["web"]
    assert web1["labels"] == {"env": "prod"}
    assert web1["cached_digests"] == [f"sha256:{cached}"]
    assert web1["bt_endpoint"].startswith("127.0.0.1:")
    assert int(web1["bt_endpoint"].rsplit(":", 1)[1]) > 0
    assert web1["docker_version"] is None
    assert web1["docker_error"] == "disabled with --no-docker"
    assert web1["disk_free_bytes"] > 0
    assert web1["version"]
    assert len(web1["agent_id"]) == 32
    assert (tmp_path / "web1" / "agent-id").read_text().strip() == web1["agent_id"]
    for key in ("name", "groups", "labels", "state", "last_seen_time", "connect_time"):
        assert web1[key], key

    def names(selector: str) -> list[str]:
        return sorted(agents_json(fleet_server, selector))

    assert names("all") == ["db1", "web1", "web2"]
    assert names("web") == ["web1", "web2"]
    assert names("db1,web2") == ["db1", "web2"]
    assert names("env=prod") == ["db1", "web1"]
    assert names("stateful,env=staging") == ["db1", "web2"]
    assert names("nothing") == []
    table = docketctl("agents", "--hosts", "web", server=fleet_server)
    assert table.stdout.splitlines()[0].split()[:3] == ["NAME", "STATE", "GROUPS"]
    assert [line.split()[:2] for line in table.stdout.splitlines()[1:]] == [
        ["web1", "online"],
        ["web2", "online"],
    ]
    bad = docketctl("agents", "--hosts", "a b", server=fleet_server)
    assert bad.returncode == 1
    assert "invalid selector term 'a b'" in bad.stderr


def test_a_silent_agent_goes_stale_then_offline_and_comes_back(
    fleet_server: ServerProcess, start_agent: object
) -> None:
    agent = start_agent("web1", groups=["web"])  # type: ignore[operator]
    start_agent("web2", groups=["web"])  # type: ignore[operator]
    wait_for_states(fleet_server, {"web1": "online", "web2": "online"})
    agent.signal(signal.SIGSTOP)
    try:
        # Stale lasts half a second (from 1 s to 1.5 s of silence): polling may miss it, so
        # the log says that it came, and before offline.
        agents = wait_for_states(fleet_server, {"web1": "offline"}, timeout=10)
        assert agents["web2"]["state"] == "online"
    finally:
        agent.signal(signal.SIGCONT)
    events = [
        (json.loads(line).get("event"), json.loads(line).get("agent"))
        for line in fleet_server.log_tail(400).splitlines()
        if line.startswith("{")
    ]
    stale = events.index(("agent missed heartbeats", "web1"))
    assert ("agent offline", "web1") in events[stale:]
    wait_for_states(fleet_server, {"web1": "online", "web2": "online"}, timeout=10)


def test_agents_reconnect_after_a_server_restart(
    fleet_server: ServerProcess, start_agent: object
) -> None:
    for i in range(3):
        start_agent(f"web{i}", groups=["web"])  # type: ignore[operator]
    wait_for_states(fleet_server, {f"web{i}": "online" for i in range(3)})
    assert fleet_server.stop() == 0
    time.sleep(2)
    fleet_server.start()
    # Persisted, and offline until each agent is back.
    restarted = time.monotonic()
    wait_for_states(fleet_server, {f"web{i}": "online" for i in range(3)}, timeout=15)
    print(f"all agents online {time.monotonic() - restarted:.1f}s after the restart")
    assert len(agents_json(fleet_server)) == 3  # one row each, no duplicates


def test_a_second_agent_under_an_online_name_is_refused(
    fleet_server: ServerProcess, start_agent: object, tmp_path: Path
) -> None:
    first = start_agent("web1")  # type: ignore[operator]
    before = wait_for_states(fleet_server, {"web1": "online"})["web1"]
    impostor = AgentProcess(server=fleet_server, data_dir=tmp_path / "other", name="web1")
    impostor.start()
    assert impostor.proc is not None
    assert impostor.proc.wait(20) == 1
    assert "agent web1 is enrolled by another install" in impostor.log_tail()
    after = agents_json(fleet_server)
    assert list(after) == ["web1"]
    assert after["web1"]["agent_id"] == before["agent_id"]
    assert after["web1"]["connect_time"] == before["connect_time"]  # never swapped out
    # Two agents on one data dir are refused before they reach the server.
    twin = AgentProcess(server=fleet_server, data_dir=first.data_dir, name="web9")
    twin.start()
    assert twin.proc is not None
    assert twin.proc.wait(20) == 1
    assert "another docket-agent is using" in twin.log_tail()


async def _sim(server: ServerProcess, *agents: SimulatedAgent) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(a.run()) for a in agents]


async def test_the_same_install_reconnecting_replaces_its_old_stream(
    fleet_server: ServerProcess,
) -> None:
    identity = await enroll(fleet_server, "web1")
    async with (
        agent_channel(fleet_server, identity) as first,
        agent_channel(fleet_server, identity) as second,
    ):
        old = SimulatedAgent(pb_grpc.AgentServiceStub(first), "web1", agent_id="same-install")
        old_task = asyncio.create_task(old.run())
        await asyncio.wait_for(old.welcomed.wait(), 10)
        new = SimulatedAgent(pb_grpc.AgentServiceStub(second), "web1", agent_id="same-install")
        new_task = asyncio.create_task(new.run())
        await asyncio.wait_for(new.welcomed.wait(), 10)
        await asyncio.wait_for(old_task, 10)
        assert new.ended is None
        assert new.welcome is not None
        assert old.ended is not None
        assert old.ended.code() == grpc.StatusCode.ABORTED
        assert error_info(old.ended.trailing_metadata())[0] == "AGENT_REPLACED"
        agents = agents_json(fleet_server)
        assert agents["web1"]["state"] == "online"
        new_task.cancel()


def _raw_stream(channel: grpc.aio.Channel) -> object:
    return channel.stream_stream(
        "/docket.v1.AgentService/Connect",
        request_serializer=lambda b: b,
        response_deserializer=pb.ConnectResponse.FromString,
    )


async def _expect_refusal(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:  # type: ignore[attr-defined]
            pass
    return caught.value


async def test_misbehaving_streams_are_dropped_alone(
    fleet_server: ServerProcess, start_agent: object
) -> None:
    start_agent("steady")  # type: ignore[operator]
    wait_for_states(fleet_server, {"steady": "online"})
    channel = await sim_channel(fleet_server, "ok", **{"grpc.max_send_message_length": 64 << 20})
    async with channel:
        stub = pb_grpc.AgentServiceStub(channel)

        async def only(*messages: object) -> AsyncIterator[object]:
            for m in messages:
                yield m
            await asyncio.sleep(30)

        # Never says hello: dropped after the hello timeout (1 s here).
        silent = await _expect_refusal(stub.Connect(only()))
        assert silent.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(silent.trailing_metadata())[0] == "HELLO_REQUIRED"
        # Starts with a heartbeat.
        rude = await _expect_refusal(
            stub.Connect(only(pb.ConnectRequest(heartbeat=agent_pb2.Heartbeat())))
        )
        assert error_info(rude.trailing_metadata())[0] == "HELLO_REQUIRED"
        # A malformed hello.
        for hello in (
            agent_pb2.Hello(name="bad name", agent_id="x"),
            agent_pb2.Hello(name="ok", agent_id=""),
            agent_pb2.Hello(name="ok", agent_id="x", groups=["all"]),
            agent_pb2.Hello(name="ok", agent_id="x", labels={"k": "v v"}),
            agent_pb2.Hello(name="ok", agent_id="x", cached_digests=["sha256:zz"]),
        ):
            invalid = await _expect_refusal(stub.Connect(only(pb.ConnectRequest(hello=hello))))
            assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(invalid.trailing_metadata())[0] == "INVALID_AGENT"
        # Bytes that are not a message at all.
        raw = _raw_stream(channel)
        garbage = await _expect_refusal(raw(only(b"\xff\xff\xff\xff garbage")))  # type: ignore[operator]
        assert garbage.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(garbage.trailing_metadata())[0] == "MALFORMED_MESSAGE"
        # A message over the size limit (8 MiB).
        huge = agent_pb2.Hello(
            name="huge", agent_id="x", labels={"k": "v" * 63}, version="v" * (9 << 20)
        )
        big = await _expect_refusal(stub.Connect(only(pb.ConnectRequest(hello=huge))))
        assert big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # A hello for another agent than the certificate's.
        other = await _expect_refusal(
            stub.Connect(
                only(pb.ConnectRequest(hello=agent_pb2.Hello(name="steady", agent_id="x")))
            )
        )
        assert other.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "its certificate names ok" in (other.details() or "")
        # A second hello on a live stream ends that stream.
        sim = SimulatedAgent(stub, "ok")
        twice = await _expect_refusal(stub.Connect(only(sim.hello(), sim.hello())))
        assert error_info(twice.trailing_metadata())[0] == "HELLO_REQUIRED"

    log = fleet_server.log_tail(200)
    assert "agent stream dropped: no hello" in log
    assert "first message not a hello" in log
    assert "unreadable first message" in log
    assert "ended before its hello" in log  # the oversized one
    assert "Traceback" not in log
    assert fleet_server.alive()
    agents = agents_json(fleet_server)
    assert agents["steady"]["state"] == "online"
    assert "huge" not in agents
    # Only the well-formed hello of the last stream registered "ok": none of the bad ones.
    assert agents["ok"]["agent_id"] == sim.agent_id
    assert agents["steady"]["agent_id"] != "x"


async def test_hundreds_of_agents_connecting_at_once(tmp_path: Path) -> None:
    # 2 s heartbeats: 300 simulated agents share this test's one event loop, which a loaded
    # machine can hold up for longer than the 1.5 s after which FAST would call one offline.
    fleet_server = ServerProcess(
        data_dir=tmp_path / "server", extra_args=["--heartbeat-interval", "2"]
    ).start()
    try:
        await _connect_at_once(fleet_server, 300)
    finally:
        assert fleet_server.stop() == 0, fleet_server.log_tail()


async def _connect_at_once(fleet_server: ServerProcess, count: int) -> None:
    # Each enrolled (a certificate of its own), each on a connection of its own.
    names = [f"sim{i:04d}" for i in range(count)]
    identities = await asyncio.gather(*(enroll(fleet_server, name) for name in names))
    channels = [agent_channel(fleet_server, identity) for identity in identities]
    try:
        sims = [
            SimulatedAgent(pb_grpc.AgentServiceStub(channel), name)
            for channel, name in zip(channels, names, strict=True)
        ]
        tasks = [asyncio.create_task(s.run()) for s in sims]
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(s.welcomed.wait() for s in sims)), 60)
        print(f"{count} agents welcomed in {time.monotonic() - started:.2f}s")
        assert [s.name for s in sims if s.welcome is None] == []
        # Connected: online, or stale when this loaded machine delays a 0.5 s heartbeat.
        agents = agents_json(fleet_server).values()
        connected = [a for a in agents if a["state"] in ("online", "stale")]
        assert len(connected) == count
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    wait_for_states(fleet_server, {"sim0000": "offline", f"sim{count - 1:04d}": "offline"})
    assert fleet_server.alive()


@pytest.mark.docker
def test_an_agent_reports_its_docker_engine(
    fleet_server: ServerProcess, start_agent: object, docker_engine: DockerEngine
) -> None:
    start_agent("dockerhost", docker_host=docker_engine.host)  # type: ignore[operator]
    agent = wait_for_states(fleet_server, {"dockerhost": "online"})["dockerhost"]
    assert agent["docker_version"] == docker_engine.client.version()["Version"]
    assert agent["docker_error"] is None
