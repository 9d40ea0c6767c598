"""Rollouts end to end: pacing (canary, max-parallel, failure budget), timeout, cancel,
detach and watch, a server restart mid-rollout, and the live view on a real terminal."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from docket_common.pb import agent_pb2, agent_service_pb2, agent_service_pb2_grpc
from tests.support.agents import AgentProcess, SimulatedAgent, sim_channel, wait_for_states
from tests.support.archives import layer_tar, random_bytes, write_legacy_archive
from tests.support.server import BIN, ServerProcess, background_rollout, docketctl
from tests.support.terminal import plain, run_in_pty

FAST = ["--heartbeat-interval", "0.5", "--hello-timeout", "2"]
MiB = 1024 * 1024
StartAgent = Callable[..., AgentProcess]
ACTIVE = {"pending", "accepted", "downloading", "verifying", "loading"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(data_dir=tmp_path / "server", extra_args=FAST).start()
    yield proc
    proc.stop()


@pytest.fixture
def agents(tmp_path: Path, server: ServerProcess) -> Iterator[StartAgent]:
    started: list[AgentProcess] = []

    def start(name: str, *args: str, group: str = "g") -> AgentProcess:
        agent = AgentProcess(
            server=server,
            data_dir=tmp_path / name,
            name=name,
            groups=[group],
            extra_args=list(args),
        ).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def push(server: ServerProcess, tmp_path: Path, name: str, size: int, seed: int) -> None:
    block = random_bytes(min(size, MiB), seed)
    data = block * (size // len(block)) + block[: size % len(block)]
    archive = write_legacy_archive(tmp_path / f"{seed}.tar", name, [layer_tar({"f": data})])
    result = docketctl("push", name, "--archive", str(archive.path), "-q", server=server)
    assert result.returncode == 0, result.stderr


def show(server: ServerProcess, rollout_id: str) -> dict[str, Any]:
    result = docketctl("rollouts", "show", rollout_id, "-o", "json", server=server)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def run(server: ServerProcess, *args: str, timeout: float = 180) -> tuple[int, dict[str, Any]]:
    result = docketctl(*args, "-o", "json", server=server, timeout=timeout)
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.strip()]
    assert lines, result.stderr
    return result.returncode, lines[-1].get("summary", lines[-1])


def start_online(agents: StartAgent, server: ServerProcess, names: list[str], *args: str) -> None:
    for name in names:
        agents(name, *args)
    wait_for_states(server, dict.fromkeys(names, "online"))


def when(item: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(item["time"].replace("Z", "+00:00"))


def test_canaries_first_then_the_rest(
    server: ServerProcess, agents: StartAgent, tmp_path: Path
) -> None:
    push(server, tmp_path, "canary:1", 2 * MiB, 1)
    start_online(agents, server, ["h1", "h2", "h3", "h4"])
    code, summary = run(
        server, "rollout", "canary:1", "--hosts", "g", "--canary", "1", "--prefetch-only"
    )
    assert code == 0, summary
    history = show(server, summary["id"])["history"]
    canary_done = next(when(h) for h in history if h["host"] == "h1" and h["state"] == "succeeded")
    for other in ("h2", "h3", "h4"):
        sent = next(when(h) for h in history if h["host"] == other and h["state"] == "pending")
        assert sent >= canary_done, (other, history)


def test_max_parallel_is_respected(
    server: ServerProcess, agents: StartAgent, tmp_path: Path
) -> None:
    push(server, tmp_path, "paced:1", 4 * MiB, 2)
    start_online(agents, server, ["p1", "p2", "p3"])
    code, summary = run(
        server, "rollout", "paced:1", "--hosts", "g", "--max-parallel", "1", "--prefetch-only"
    )
    assert code == 0, summary
    states: dict[str, str] = {}
    most = 0
    for record in show(server, summary["id"])["history"]:
        if record["host"]:
            states[record["host"]] = record["state"]
            most = max(most, sum(1 for s in states.values() if s in ACTIVE))
    assert most == 1
    assert set(states.values()) == {"succeeded"}


def test_a_failure_beyond_the_budget_stops_the_rollout(
    server: ServerProcess, agents: StartAgent, tmp_path: Path
) -> None:
    push(server, tmp_path, "fails:1", 64 * 1024, 3)
    start_online(agents, server, ["f1", "f2", "f3"])  # no Docker engine: loading fails
    code, summary = run(
        server, "rollout", "fails:1", "--hosts", "g", "--max-parallel", "1", "--max-failures", "0"
    )
    assert code == 3  # failed
    hosts = {h["host"]: h for h in summary["hosts"]}
    assert hosts["f1"]["state"] == "failed"
    assert "no Docker engine" in hosts["f1"]["error"] or "--no-docker" in hosts["f1"]["error"]
    for name in ("f2", "f3"):
        assert hosts[name]["state"] == "cancelled"
        assert hosts[name]["error"].startswith("not started: 1 hosts failed")
    assert "more than --max-failures 0" in summary["reason"]
    history = show(server, summary["id"])["history"]
    assert not [h for h in history if h["host"] in ("f2", "f3") and h["state"] == "pending"]


def test_an_offline_host_fails_at_the_timeout(
    server: ServerProcess, agents: StartAgent, tmp_path: Path
) -> None:
    push(server, tmp_path, "late:1", 64 * 1024, 4)
    agents("on1")
    gone = agents("gone")
    wait_for_states(server, {"gone": "online", "on1": "online"})
    gone.stop()  # registered, in the group, and now offline
    wait_for_states(server, {"gone": "offline", "on1": "online"})
    code, summary = run(
        server, "rollout", "late:1", "--hosts", "g", "--timeout", "3s", "--prefetch-only"
    )
    assert code == 5  # timed out
    hosts = {h["host"]: h for h in summary["hosts"]}
    assert hosts["on1"]["state"] == "succeeded"
    assert hosts["gone"]["state"] == "failed"
    assert hosts["gone"]["error"] == "offline until the rollout's timeout"
    assert summary["state"] == "timed_out"


def test_cancel_stops_the_hosts_and_drops_their_partial_work(
    server: ServerProcess, agents: StartAgent, tmp_path: Path
) -> None:
    push(server, tmp_path, "cancel:1", 48 * MiB, 5)
    names = ["c1", "c2"]
    start_online(agents, server, names, "--max-download-rate", str(4 * MiB))
    started = docketctl(
        "rollout", "cancel:1", "--hosts", "g", "--prefetch-only", "--detach", server=server
    )
    assert started.returncode == 0, started.stderr
    rollout_id = started.stdout.strip()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        hosts = show(server, rollout_id)["hosts"]
        if all(h["state"] == "downloading" and h["done_bytes"] > 0 for h in hosts):
            break
        time.sleep(0.2)
    cancelled = docketctl("rollouts", "cancel", rollout_id, server=server)
    assert cancelled.returncode == 0, cancelled.stderr
    code, summary = run(server, "rollouts", "watch", rollout_id)
    assert code == 4  # cancelled
    assert {h["state"] for h in summary["hosts"]} == {"cancelled"}
    for name in names:  # libtorrent deletes the partial files as it removes the torrents
        partial = tmp_path / name / "partial"
        deadline = time.monotonic() + 10
        while [p for p in partial.rglob("*") if p.is_file()] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in partial.rglob("*") if p.is_file()], name
    listed = docketctl("rollouts", "list", server=server).stdout
    assert rollout_id in listed
    assert "cancelled" in listed


def test_ctrl_c_detaches_and_watch_follows_to_the_end(
    server: ServerProcess, agents: StartAgent, tmp_path: Path
) -> None:
    push(server, tmp_path, "detach:1", 24 * MiB, 6)
    start_online(agents, server, ["d1"], "--max-download-rate", str(4 * MiB))
    proc = subprocess.Popen(
        [
            str(BIN / "docketctl"),
            "rollout",
            "detach:1",
            "--hosts",
            "g",
            "--prefetch-only",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=server.env(),
    )
    try:
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "it goes on on the server" in err
    rollout_id = err.split("docketctl rollouts watch ")[1].split()[0]
    code, summary = run(server, "rollouts", "watch", rollout_id)
    assert code == 0, summary
    assert summary["hosts"][0]["state"] == "succeeded"


def test_a_server_restart_mid_rollout(
    server: ServerProcess, agents: StartAgent, tmp_path: Path
) -> None:
    total = 24 * MiB
    push(server, tmp_path, "restart:1", total, 7)
    names = ["r1", "r2", "r3"]
    start_online(agents, server, names, "--max-download-rate", str(6 * MiB))
    started = docketctl(
        "rollout", "restart:1", "--hosts", "g", "--prefetch-only", "--detach", server=server
    )
    rollout_id = started.stdout.strip()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        hosts = show(server, rollout_id)["hosts"]
        if all(0 < h["done_bytes"] < total for h in hosts):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the hosts never got going")
    assert server.stop() == 0
    time.sleep(1)
    server.start()
    code, summary = run(server, "rollouts", "watch", rollout_id)
    assert code == 0, summary
    for host in summary["hosts"]:
        assert host["state"] == "succeeded"
        # Nothing finished was fetched again: each host moved the image about once.
        assert host["received_bytes"] <= total + 4 * MiB, host
    history = show(server, rollout_id)["history"]
    assert history[0]["message"].startswith("started: restart:1 to 3 hosts")
    assert history[-1]["state"] == "succeeded"


def test_the_live_view_on_a_terminal(
    server: ServerProcess, agents: StartAgent, tmp_path: Path
) -> None:
    push(server, tmp_path, "live:1", 8 * MiB, 8)
    start_online(agents, server, ["web1", "web2", "web3"])
    code, raw = run_in_pty(
        [
            str(BIN / "docketctl"),
            "rollout",
            "live:1",
            "--hosts",
            "g",
            "--prefetch-only",
        ],
        env=server.env(),
    )
    screen = plain(raw)
    assert code == 0, screen
    assert "live:1" in screen
    assert "━━━━" in screen  # bars
    assert "3/3 done" in screen  # the overall line
    for name in ("web1", "web2", "web3"):
        assert name in screen
    assert "HOST" in screen
    assert "RESULT" in screen  # the summary table
    assert "succeeded" in screen


def test_pieces_handed_to_a_host_that_never_passes_them_on_come_from_the_seed(
    server: ServerProcess, agents: StartAgent, tmp_path: Path
) -> None:
    """A host takes first pieces and then neither reports nor shares them (hung, cut off):
    the others do not wait for the server to hand them out again (15 s later); once the
    server has no first piece left for them and their peers stop delivering, they dial the
    server's seed."""
    total = 32 * MiB
    push(server, tmp_path, "hoard:1", total, 9)
    start_online(agents, server, ["h1", "h2"])
    hoarded: list[int] = []

    async def scenario() -> tuple[int, str]:
        async with await sim_channel(server, "h0") as channel:
            stub = agent_service_pb2_grpc.AgentServiceStub(channel)
            hoarder = SimulatedAgent(stub, "h0", groups=("g",))
            stream = asyncio.create_task(hoarder.run())
            try:
                await asyncio.wait_for(hoarder.welcomed.wait(), 10)
                with background_rollout(server, "hoard:1", "g") as proc:
                    order = await asyncio.wait_for(hoarder.orders.get(), 20)
                    assert order.claim_first_pieces
                    for _ in range(2):
                        request = agent_service_pb2.ClaimFirstPiecesRequest(
                            digest=order.layers[0].digest, order_id=order.order_id, max_bytes=MiB
                        )
                        claimed = await stub.ClaimFirstPieces(request)
                        hoarded.extend(p.index for p in claimed.pieces)
                    await asyncio.sleep(8)  # hung, while the others finish
                    hoarder.send(
                        agent_service_pb2.ConnectRequest(
                            task_update=agent_pb2.TaskUpdate(
                                order_id=order.order_id,
                                state=agent_pb2.TASK_STATE_FAILED,
                                error="simulated: hung",
                            )
                        )
                    )
                    out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
                    return proc.returncode, out
            finally:
                stream.cancel()

    code, out = asyncio.run(scenario())
    summary = json.loads(out.splitlines()[-1])["summary"]
    hosts = {h["host"]: h for h in summary["hosts"]}
    assert hoarded, "the simulated host got no first piece"
    assert hosts["h0"]["state"] == "failed"
    for name in ("h1", "h2"):
        host = hosts[name]
        assert host["state"] == "succeeded", host
        assert host["seconds"] < 8, host  # did not wait for h0, nor for the 15 s re-offer
    # Nobody got the hoarded pieces as first pieces, nor over gRPC: they came over
    # BitTorrent, and only the server's seed had them. (Its share is not in server_bytes
    # here: on loopback the seed's connection lasts less than one 250 ms progress sample.)
    first = sum(hosts[n]["first_piece_bytes"] for n in ("h1", "h2"))
    # (The config, one piece, goes to each host that asks: a second copy of a few KiB.)
    assert first <= hosts["h1"]["total_bytes"] - len(hoarded) * 64 * 1024 + 64 * 1024
    assert all(hosts[n]["fallback_bytes"] == 0 for n in ("h1", "h2"))
    assert code == 3  # failed: h0 did
