"""Thousands of simulated agents, spread over several client processes.

One Python process cannot drive 10,000 agent streams (each a mutual-TLS connection, a
heartbeat every interval, four progress reports a second in a rollout) without becoming the
bottleneck itself, so ``SimFleet`` starts ``processes`` workers (``python -m
tests.support.sim_fleet``), each holding its share of the names as SimulatedAgents. The
parent talks to each worker over its stdin and stdout, one JSON object a line:

1. the parent sends the configuration; the worker enrolls its names (join token and CSR, on
   one channel) and answers ``{"enrolled": n}``;
2. ``connect``: every agent opens its stream at once; the worker answers with each agent's
   welcome latency;
3. ``report``: the worker answers with what its agents did in a rollout (when each got its
   order, and the wall-clock time of every report it sent), then ``stop``.

In ``rollout`` mode each agent carries out every order it gets as a real agent reports it,
without moving a byte: ACCEPTED, a PieceProgress naming every blob, DOWNLOADING, then a
PieceProgress every ``report_interval`` with the pieces that "arrived", then VERIFYING,
LOADING (when the order loads) and SUCCEEDED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from docket_common.pb import agent_pb2
from docket_common.pb import agent_service_pb2 as pb
from docket_common.pb import agent_service_pb2_grpc as pb_grpc
from tests.support.agents import SimIdentity, SimulatedAgent, agent_channel, enroll
from tests.support.server import ServerProcess
from tests.support.wire_agent import WireAgent, client_context

ENROLL_CONCURRENCY = 16
ROOT = Path(__file__).resolve().parents[2]


def raise_fd_limit() -> int:
    """Raises this process's open-file limit to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class WorkerConfig:
    data_dir: str
    port: int
    agent_port: int
    insecure: bool
    join_token: str
    names: list[str]
    groups: list[str] = field(default_factory=lambda: ["sim"])
    mode: str = "heartbeat"  # or "rollout"
    report_interval: float = 0.25
    download_seconds: float = 5.0
    bt_port_base: int = 20000  # agents advertise fake BitTorrent endpoints (never dialled)
    # "grpc": each stream a grpcio call; "wire": written by hand (tests/support/wire_agent.py),
    # the same protocol on the wire at a fraction of the CPU.
    client: str = "grpc"


@dataclass
class WorkerReport:
    """What one worker's agents did."""

    welcome_s: list[float] = field(default_factory=list)
    refused: int = 0
    ended: int = 0  # streams the server ended
    errors: dict[str, int] = field(default_factory=dict)  # how they ended: code and details
    order_times: dict[str, float] = field(default_factory=dict)  # agent -> wall time
    # (agent, state name or "" for progress, done bytes, wall time) of every report sent.
    sends: list[tuple[str, str, int, float]] = field(default_factory=list)
    cpu_s: float = 0.0
    connected_cpu_s: float = 0.0  # of which before every agent was welcomed (enrolling, TLS)


class SimFleet:
    """The parent's side: starts the workers and steps them through the phases."""

    def __init__(
        self,
        server: ServerProcess,
        names: list[str],
        processes: int = 1,
        *,
        mode: str = "heartbeat",
        groups: tuple[str, ...] = ("sim",),
        report_interval: float = 0.25,
        download_seconds: float = 5.0,
        client: str = "grpc",
    ) -> None:
        if client not in ("grpc", "wire"):
            raise ValueError(f"client is grpc or wire, not {client!r}")
        self.server = server
        self.names = names
        self.processes = max(1, min(processes, len(names)))
        self.mode = mode
        self.groups = list(groups)
        self.report_interval = report_interval
        self.download_seconds = download_seconds
        self.client = client
        self.workers: list[asyncio.subprocess.Process] = []

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    async def start(self) -> float:
        """Starts the workers and waits until each has enrolled its agents; the seconds
        that took."""
        join_token = "" if self.server.insecure else self.server.join_token()
        started = time.monotonic()
        for i in range(self.processes):
            config = WorkerConfig(
                data_dir=str(self.server.data_dir),
                port=self.server.port,
                agent_port=self.server.agent_port,
                insecure=self.server.insecure,
                join_token=join_token,
                names=self.names[i :: self.processes],
                groups=self.groups,
                mode=self.mode,
                report_interval=self.report_interval,
                download_seconds=self.download_seconds,
                client=self.client,
                bt_port_base=20000 + i * (len(self.names) // self.processes + 1),
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.support.sim_fleet",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=ROOT,
                limit=1 << 30,
            )
            self.workers.append(proc)
            await self._send(proc, asdict(config))
        await self._answers("enrolled")
        return time.monotonic() - started

    async def connect(self) -> tuple[list[float], int]:
        """Every agent opens its stream at once; their welcome latencies, and how many were
        refused."""
        for proc in self.workers:
            await self._send(proc, {"command": "connect"})
        answers = await self._answers("welcomed")
        latencies = sorted(x for a in answers for x in a["welcome_s"])
        return latencies, sum(int(a["refused"]) for a in answers)

    async def report(self) -> WorkerReport:
        """Everything the agents did, from every worker."""
        for proc in self.workers:
            await self._send(proc, {"command": "report"})
        merged = WorkerReport()
        for answer in await self._answers("report"):
            part = WorkerReport(**answer["report"])
            merged.order_times.update(part.order_times)
            merged.sends.extend(tuple(s) for s in part.sends)  # type: ignore[misc]
            merged.ended += part.ended
            for key, n in part.errors.items():
                merged.errors[key] = merged.errors.get(key, 0) + n
            merged.cpu_s += part.cpu_s
            merged.connected_cpu_s += part.connected_cpu_s
        return merged

    async def stop(self) -> None:
        for proc in self.workers:
            if proc.returncode is None and proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    await self._send(proc, {"command": "stop"})
        for proc in self.workers:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.workers = []

    async def _send(self, proc: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(message) + "\n").encode())
        await proc.stdin.drain()

    async def _answers(self, key: str) -> list[dict[str, Any]]:
        async def one(proc: asyncio.subprocess.Process) -> dict[str, Any]:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"sim fleet worker {proc.pid} exited (waiting for {key})")
            answer: dict[str, Any] = json.loads(line)
            if key not in answer:
                raise RuntimeError(f"sim fleet worker {proc.pid}: {answer}")
            return answer

        return list(await asyncio.gather(*(one(p) for p in self.workers)))


# The worker's side.


class Reporter:
    """Carries out one simulated agent's orders as docket-agent reports them, on its stream
    (a SimulatedAgent's, through grpcio, or a WireAgent's)."""

    def __init__(
        self, agent: SimulatedAgent | WireAgent, config: WorkerConfig, report: WorkerReport
    ) -> None:
        self.agent = agent
        self.name = agent.name
        self.config = config
        self.report = report
        self.worker: asyncio.Task[None] | None = None
        self._meta: dict[int, tuple[str, int]] = {}  # queued reports: what each says
        agent.on_sent = self._sent

    def _queue(self, message: pb.ConnectRequest, state: str, done: int) -> None:
        self._meta[id(message)] = (state, done)
        self.agent.send(message)

    def _sent(self, message: pb.ConnectRequest) -> None:
        """Records each report as it goes onto the stream (what the lag is measured from)."""
        meta = self._meta.pop(id(message), None)
        if meta is not None:
            self.report.sends.append((self.name, meta[0], meta[1], time.time()))

    async def carry_out(self) -> None:
        while True:
            order = await self.agent.orders.get()
            self.report.order_times[self.name] = time.time()
            await self._one(order)

    def _update(
        self, order_id: str, state: agent_pb2.TaskState.ValueType, done: int, **fields: Any
    ) -> None:
        name = agent_pb2.TaskState.Name(state).removeprefix("TASK_STATE_").lower()
        update = agent_pb2.TaskUpdate(order_id=order_id, state=state, **fields)
        self._queue(pb.ConnectRequest(task_update=update), name, done)

    async def _one(self, order: agent_pb2.PullOrder) -> None:
        blobs = [b for b in [order.config, *order.layers] if b.digest]
        pieces = [(b, _piece_length(b), _pieces(b)) for b in blobs]
        total_pieces = sum(n for _, _, n in pieces)
        total_bytes = sum(b.size_bytes for b in blobs)
        every = self.config.report_interval  # or as the server asks, as docket-agent does
        if order.HasField("progress_interval"):
            every = max(every, order.progress_interval.ToTimedelta().total_seconds())
        ticks = max(1, round(self.config.download_seconds / every))
        per_tick = max(1, math.ceil(total_pieces / ticks))
        # As docket-agent does: every blob it fetches, none held yet, before DOWNLOADING (the
        # server counts a downloading host's unreported blobs as cached). Accepted, verifying
        # and loading pass in less than docket-agent's SETTLE here, and it sends none of them.
        start = agent_pb2.PieceProgress(order_id=order.order_id)
        for blob, _, count in pieces:
            start.blobs.append(agent_pb2.BlobProgress(digest=blob.digest, total_pieces=count))
        self._queue(pb.ConnectRequest(piece_progress=start), "", 0)
        self._update(order.order_id, agent_pb2.TASK_STATE_DOWNLOADING, 0)
        done = [0] * len(pieces)  # pieces held, per blob
        rate = total_bytes // max(self.config.download_seconds, 0.001)
        peer = agent_pb2.PeerBytes(endpoint="127.0.0.1:1", received_bytes=0)
        while sum(done) < total_pieces:
            await asyncio.sleep(every)
            budget = per_tick
            progress = agent_pb2.PieceProgress(
                order_id=order.order_id, rate_bytes_per_second=int(rate), peer_count=3
            )
            held = 0
            for i, (blob, length, count) in enumerate(pieces):
                new = list(range(done[i], min(count, done[i] + budget)))
                budget -= len(new)
                done[i] += len(new)
                done_bytes = min(done[i] * length, blob.size_bytes)
                held += done_bytes
                if new:
                    progress.blobs.append(
                        agent_pb2.BlobProgress(
                            digest=blob.digest,
                            new_pieces=new,
                            done_pieces=done[i],
                            total_pieces=count,
                            done_bytes=done_bytes,
                        )
                    )
            peer.received_bytes = held
            progress.peers.append(peer)
            self._queue(pb.ConnectRequest(piece_progress=progress), "", held)
        self._update(
            order.order_id,
            agent_pb2.TASK_STATE_SUCCEEDED,
            total_bytes,
            bittorrent_bytes=total_bytes,
            image_id="sha256:" + "0" * 64,
        )


def _core_error(error: grpc.aio.AioRpcError) -> str:
    """Where gRPC's core says the call ended (from the peer, or locally), without the
    times and ports that make every stream's text different."""
    text = error.debug_error_string() or ""
    text = re.sub(r'created_time:"[^"]*"|ipv[46]:[^ ,}]*|\d+\.\d+s', "", text)
    return " ".join(text.split())[:160]


def _piece_length(blob: agent_pb2.OrderBlob) -> int:
    from docket_common.torrent import _info  # libtorrent: only for rollouts

    return int(_info(blob.metainfo)[b"piece length"])


def _pieces(blob: agent_pb2.OrderBlob) -> int:
    return max(1, -(-blob.size_bytes // _piece_length(blob)))


async def _worker() -> None:
    raise_fd_limit()
    reader = asyncio.StreamReader(limit=1 << 30)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    config = WorkerConfig(**json.loads(await reader.readline()))
    server = ServerProcess(
        data_dir=Path(config.data_dir),
        port=config.port,
        agent_port=config.agent_port,
        insecure=config.insecure,
    )
    report = WorkerReport()
    identities: list[SimIdentity | None] = [None] * len(config.names)
    if not config.insecure:
        server._join_tokens[()] = config.join_token
        limit = asyncio.Semaphore(ENROLL_CONCURRENCY)
        async with server.aio_channel(token=config.join_token) as channel:

            async def one(i: int, name: str) -> None:
                async with limit:
                    identities[i] = await enroll(server, name, channel=channel)

            await asyncio.gather(*(one(i, n) for i, n in enumerate(config.names)))
    answer({"enrolled": len(config.names)})

    assert (await reader.readline()).strip() == b'{"command": "connect"}'
    channels: list[grpc.aio.Channel] = []
    agents: list[SimulatedAgent | WireAgent] = []
    scratch = tempfile.TemporaryDirectory(prefix="docket-sim-")
    for i, (name, identity) in enumerate(zip(config.names, identities, strict=True)):
        bt_endpoint = f"127.0.0.1:{config.bt_port_base + i}"
        if config.client == "wire":
            context = None
            if identity is not None:
                context = client_context(
                    server.ca_pem, identity.cert_pem, identity.key_pem, Path(scratch.name)
                )
            port = config.port if config.insecure else config.agent_port
            agents.append(
                WireAgent(
                    name,
                    uuid.uuid4().hex,
                    groups=tuple(config.groups),
                    bt_endpoint=bt_endpoint,
                    address=("127.0.0.1", port),
                    context=context,
                )
            )
            continue
        ch = agent_channel(server, identity)
        channels.append(ch)
        agents.append(
            SimulatedAgent(
                pb_grpc.AgentServiceStub(ch),
                name,
                groups=tuple(config.groups),
                bt_endpoint=bt_endpoint,
                wait_for_ready=True,
            )
        )
    scratch.cleanup()
    started = time.monotonic()
    latencies: list[float] = []

    async def timed(agent: SimulatedAgent | WireAgent) -> None:
        await agent.welcomed.wait()
        if agent.welcome is None:
            report.refused += 1
        else:
            latencies.append(time.monotonic() - started)

    async def heartbeats() -> None:
        """The wire agents' heartbeats: one timer for all of them, not one each."""
        while True:
            await asyncio.sleep(0.5)
            now = loop.time()
            for agent in agents:
                if isinstance(agent, WireAgent):
                    agent.heartbeat_due(now)

    streams = [asyncio.create_task(a.run()) for a in agents]
    beating = asyncio.create_task(heartbeats())
    await asyncio.gather(*(timed(a) for a in agents))
    reporters: list[Reporter] = []
    if config.mode == "rollout":
        for agent in agents:
            reporter = Reporter(agent, config, report)
            reporter.worker = asyncio.create_task(reporter.carry_out())
            reporters.append(reporter)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report.connected_cpu_s = usage.ru_utime + usage.ru_stime
    answer({"welcomed": True, "welcome_s": latencies, "refused": report.refused})

    while line := await reader.readline():
        command = json.loads(line)["command"]
        if command == "report":
            report.ended = sum(1 for a in agents if a.ended is not None)
            report.errors = {}
            for a in agents:
                if a.ended is not None:
                    key = _ended_key(a.ended)
                    report.errors[key] = report.errors.get(key, 0) + 1
            usage = resource.getrusage(resource.RUSAGE_SELF)
            report.cpu_s = usage.ru_utime + usage.ru_stime
            answer({"report": asdict(report)})
        elif command == "stop":
            break
    beating.cancel()
    for reporter in reporters:
        if reporter.worker is not None:
            reporter.worker.cancel()
    for agent in agents:
        if isinstance(agent, WireAgent):
            agent.close()
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, beating, return_exceptions=True)
    for ch in channels:
        await ch.close()


def _ended_key(ended: grpc.aio.AioRpcError | str) -> str:
    """How a stream ended, without the numbers that make every stream's text different."""
    if isinstance(ended, str):
        return ended
    details = re.sub(r"\d+(\.\d+)?", "N", ended.details() or "")
    return f"{ended.code().name}: {details[:80]} [{_core_error(ended)}]"


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    asyncio.run(_worker())
