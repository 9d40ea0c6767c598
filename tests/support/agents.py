"""Real docket-agent processes, and light simulated agents that speak the stream protocol."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from docket_agent.stream import interval_seconds
from docket_common.pb import agent_pb2
from docket_common.pb import agent_service_pb2 as pb
from docket_common.pb import agent_service_pb2_grpc as pb_grpc
from docket_common.pki import key_pem, load_key, make_csr, new_key
from tests.support.processes import stop_process
from tests.support.server import BIN, ServerProcess, docketctl, free_port


@dataclass
class AgentProcess:
    """docket-agent on a free BitTorrent port, logging to data_dir/../NAME-agent.log."""

    server: ServerProcess | str  # a string: an address, and no join token or CA
    data_dir: Path
    name: str
    groups: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    docker_host: str | None = None
    extra_args: list[str] = field(default_factory=list)
    registry_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def registry(self) -> str:
        """The agent's registry face, HOST:PORT (what `docker pull` names)."""
        return f"127.0.0.1:{self.registry_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}-agent.log"

    def command(self) -> list[str]:
        server = self.server
        address = server if isinstance(server, str) else server.address
        args = [
            str(BIN / "docket-agent"),
            "--server",
            address,
            "--data-dir",
            str(self.data_dir),
            "--name",
            self.name,
            "--bt-listen",
            "127.0.0.1:0",
            "--registry-listen",
            self.registry,
            "--log-json",
        ]
        for group in self.groups:
            args += ["--group", group]
        for key, value in self.labels.items():
            args += ["--label", f"{key}={value}"]
        if self.docker_host is None:
            args.append("--no-docker")
        if isinstance(server, ServerProcess):
            if server.insecure:
                args.append("--insecure")
            elif not (self.data_dir / "tls" / "agent.pem").exists():
                args += ["--join-token", server.join_token(), "--ca", str(server.ca_path)]
        return args + self.extra_args

    def start(self) -> AgentProcess:
        env = dict(os.environ)
        if self.docker_host is not None:
            env["DOCKER_HOST"] = self.docker_host
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        code = stop_process(self.proc, timeout=timeout)
        self.proc = None
        return code or 0

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def agents_json(server: ServerProcess | str, selector: str = "all") -> dict[str, dict[str, Any]]:
    result = docketctl("agents", "--hosts", selector, "-o", "json", server=server)
    assert result.returncode == 0, result.stderr
    return {a["name"]: a for a in json.loads(result.stdout)}


def wait_for_states(
    server: ServerProcess | str, want: dict[str, str], timeout: float = 20.0
) -> dict[str, dict[str, Any]]:
    """Polls `docketctl agents` until every named agent is in the wanted state."""
    deadline = time.monotonic() + timeout
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        seen = agents_json(server)
        if all(seen.get(name, {}).get("state") == state for name, state in want.items()):
            return seen
        time.sleep(0.1)
    states = {name: seen.get(name, {}).get("state") for name in want}
    raise AssertionError(f"after {timeout}s the agents are {states}, not {want}")


@dataclass(frozen=True)
class SimIdentity:
    """An enrolled simulated agent: its key and the certificate the server signed."""

    name: str
    key_pem: bytes
    cert_pem: bytes


async def enroll(
    server: ServerProcess,
    name: str,
    key: bytes | None = None,
    join_token: str | None = None,
    channel: grpc.aio.Channel | None = None,
) -> SimIdentity:
    """Enrolls ``name`` as docket-agent does (EnrollAgent with a join token and a CSR); on
    ``channel`` if given (one made with the join token: many enrollments, one handshake)."""
    key = key or key_pem(new_key())
    request = pb.EnrollAgentRequest(name=name, csr_pem=make_csr(load_key(key), name))
    if channel is not None:
        response = await pb_grpc.AgentServiceStub(channel).EnrollAgent(request, timeout=120)
        return SimIdentity(name, key, response.certificate_pem)
    async with server.aio_channel(token=join_token or server.join_token()) as own:
        response = await pb_grpc.AgentServiceStub(own).EnrollAgent(request, timeout=30)
    return SimIdentity(name, key, response.certificate_pem)


def agent_channel(
    server: ServerProcess, identity: SimIdentity | None, **options: Any
) -> grpc.aio.Channel:
    """An aio channel to the agent port with ``identity``'s certificate (mutual TLS); to the
    plaintext API port of an insecure server."""
    opts = list(options.items())
    if server.insecure or identity is None:
        return grpc.aio.insecure_channel(server.address, options=opts)
    credentials = grpc.ssl_channel_credentials(
        server.ca_pem, private_key=identity.key_pem, certificate_chain=identity.cert_pem
    )
    return grpc.aio.secure_channel(server.agent_address, credentials, options=opts)


async def sim_channel(server: ServerProcess, name: str, **options: Any) -> grpc.aio.Channel:
    """A channel on which a SimulatedAgent named ``name`` may connect: enrolled first."""
    if server.insecure:
        return agent_channel(server, None, **options)
    return agent_channel(server, await enroll(server, name), **options)


def _now() -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.now(UTC))
    return ts


def sim_hello(
    name: str,
    agent_id: str,
    groups: tuple[str, ...],
    bt_endpoint: str,
    cached_digests: tuple[str, ...] = (),
    follows_heartbeat_interval: bool = True,
) -> pb.ConnectRequest:
    """A simulated agent's first message on its stream."""
    return pb.ConnectRequest(
        hello=agent_pb2.Hello(
            name=name,
            agent_id=agent_id,
            groups=list(groups),
            version="sim",
            bt_endpoint=bt_endpoint,
            cached_digests=list(cached_digests),
            follows_heartbeat_interval=follows_heartbeat_interval,
        )
    )


class SimulatedAgent:
    """One agent stream without an agent process: hello, then a heartbeat every interval.
    Orders it is sent land in ``orders``; ``send`` puts a message on its stream."""

    def __init__(
        self,
        stub: pb_grpc.AgentServiceStub,
        name: str,
        agent_id: str | None = None,
        bt_endpoint: str = "",
        cached_digests: tuple[str, ...] = (),
        groups: tuple[str, ...] = ("sim",),
        wait_for_ready: bool = False,
        follows_heartbeat_interval: bool = True,
    ):
        self.stub = stub
        self.name = name
        self.bt_endpoint = bt_endpoint
        self.cached_digests = cached_digests
        self.groups = groups
        # True: the stream waits for the channel to connect (through retries, as an agent's
        # reconnect loop would) rather than failing at once when a handshake times out.
        self.wait_for_ready = wait_for_ready
        # False: as an agent older than Heartbeat.interval, it keeps its welcome's interval.
        self.follows_heartbeat_interval = follows_heartbeat_interval
        self.heartbeats_received = 0
        self.agent_id = agent_id or uuid.uuid4().hex
        self.welcome: agent_pb2.Welcome | None = None
        self.welcomed = asyncio.Event()
        self.heartbeat_interval = 5.0  # from the welcome, then the server's heartbeats
        self.ended: grpc.aio.AioRpcError | None = None
        self.call: Any = None
        self.orders: asyncio.Queue[agent_pb2.PullOrder] = asyncio.Queue()
        # Called with each message as it goes onto the stream (not when it is queued).
        self.on_sent: Callable[[pb.ConnectRequest], None] | None = None
        self._outbox: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue()

    def hello(self) -> pb.ConnectRequest:
        return sim_hello(
            self.name,
            self.agent_id,
            self.groups,
            self.bt_endpoint,
            self.cached_digests,
            self.follows_heartbeat_interval,
        )

    def send(self, message: pb.ConnectRequest) -> None:
        self._outbox.put_nowait(message)

    async def run(self) -> None:
        """Holds the stream until cancelled or until the server ends it (see ``ended``)."""
        interval = asyncio.Event()

        async def requests() -> AsyncIterator[pb.ConnectRequest]:
            yield self.hello()
            await interval.wait()
            while True:
                try:
                    message = await asyncio.wait_for(self._outbox.get(), self.heartbeat_interval)
                except TimeoutError:
                    message = pb.ConnectRequest(heartbeat=agent_pb2.Heartbeat(send_time=_now()))
                if self.on_sent is not None:
                    self.on_sent(message)
                yield message

        self.call = self.stub.Connect(requests(), wait_for_ready=self.wait_for_ready)
        try:
            async for message in self.call:
                kind = message.WhichOneof("body")
                if kind == "welcome":
                    self.welcome = message.welcome
                    self.heartbeat_interval = interval_seconds(message.welcome.heartbeat_interval)
                    self.welcomed.set()
                    interval.set()
                elif kind == "heartbeat":
                    self.heartbeats_received += 1
                    if self.follows_heartbeat_interval and message.heartbeat.HasField("interval"):
                        self.heartbeat_interval = interval_seconds(message.heartbeat.interval)
                elif kind == "pull_order":
                    self.orders.put_nowait(message.pull_order)
        except grpc.aio.AioRpcError as e:
            self.ended = e
        finally:
            self.welcomed.set()  # wake waiters also when refused


StartAgent = Callable[..., AgentProcess]
"""The `agents` fixture: ``agents(server, name, **AgentProcess fields)`` starts one agent,
stopped when the test ends."""
