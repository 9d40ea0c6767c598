"""The agent's one stream to the server: hello, heartbeats both ways, reconnection.

The agent sends Hello, waits for Welcome, then sends a heartbeat every interval the server
asked for. If it hears nothing from the server for three intervals it drops the stream and
connects again. Failed connections are retried with exponential backoff and full jitter, so a
fleet does not stampede a server that just came back.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from docket_agent.identity import ServerChannel
from docket_common.errors import Reason, error_info
from docket_common.pb import agent_pb2
from docket_common.pb import agent_service_pb2 as pb
from docket_common.pb import agent_service_pb2_grpc as pb_grpc

log = structlog.get_logger()

SILENT_INTERVALS = 3
# Refusals that retrying cannot fix: the agent stops and says why.
FATAL_REASONS = {
    Reason.AGENT_NAME_TAKEN,
    Reason.INVALID_AGENT,
    Reason.UNAUTHENTICATED,
    Reason.AGENT_NOT_ENROLLED,
    Reason.AGENT_REMOVED,
    Reason.GROUP_NOT_ALLOWED,
    Reason.PERMISSION_DENIED,
}


class AgentRefusedError(Exception):
    """The server refuses this agent for a reason retrying cannot fix."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter: a random wait up to min(cap, base * 2**n)."""

    base: float = 0.25
    cap: float = 3.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 3_000),
    # First pieces (ClaimFirstPieces) can be 16 MiB.
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
]


def agent_channel(server: str) -> grpc.aio.Channel:
    """A plaintext channel to a server running with --insecure."""
    return grpc.aio.insecure_channel(server, options=CHANNEL_OPTIONS)


def interval_seconds(interval: Duration) -> float:
    """A Duration the server sent, in seconds (never under 0.1: a broken one)."""
    return max(interval.ToTimedelta().total_seconds(), 0.1)


def _now_pb() -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.now(UTC))
    return ts


class StreamClient:
    """Holds the agent's stream for as long as ``run`` runs."""

    def __init__(
        self,
        server: str,
        make_hello: Callable[[], Awaitable[agent_pb2.Hello]],
        disk_free: Callable[[], int],
        channels: ServerChannel,
        backoff: Backoff | None = None,
        on_message: Callable[[pb.ConnectResponse], None] = lambda _m: None,
        on_connected: Callable[[], None] = lambda: None,
    ) -> None:
        self.server = server
        self.on_message = on_message
        self.on_connected = on_connected
        self.channels = channels
        self._outbox: asyncio.Queue[pb.ConnectRequest] | None = None
        self.make_hello = make_hello
        self.disk_free = disk_free
        self.backoff = backoff or Backoff()
        self.reconnects = 0  # streams that ended and were started again (metrics)
        self.heartbeat_interval = 5.0  # the server's welcome and heartbeats set it

    @property
    def connected(self) -> bool:
        """Whether a stream is up (the server welcomed it)."""
        return self._outbox is not None

    def send(self, message: pb.ConnectRequest) -> None:
        """Sends on the current stream; dropped while disconnected (on_connected re-sends
        what matters)."""
        if self._outbox is not None:
            self._outbox.put_nowait(message)

    async def run(self) -> None:
        """Connects, and connects again whenever the stream ends, until cancelled."""
        while True:
            started = time.monotonic()
            # Each stream on the channel of the moment: a renewed certificate's, once renewed.
            why = await self._one_stream(pb_grpc.AgentServiceStub(self.channels.channel))
            await self.channels.close_retired()
            if time.monotonic() - started > 30:
                self.backoff.reset()  # it was a real session, not a failed attempt
            delay = self.backoff.next_delay()
            self.reconnects += 1
            log.warning("disconnected from server", why=why, retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    async def _one_stream(self, stub: pb_grpc.AgentServiceStub) -> str:
        outbox: asyncio.Queue[pb.ConnectRequest] = asyncio.Queue()
        outbox.put_nowait(pb.ConnectRequest(hello=await self.make_hello()))

        async def requests() -> AsyncIterator[pb.ConnectRequest]:
            while True:
                yield await outbox.get()

        call = stub.Connect(requests())
        heartbeats: asyncio.Task[None] | None = None
        try:
            first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("body") != "welcome":
                return "the server did not welcome the agent"
            welcome = first.welcome
            self.heartbeat_interval = interval_seconds(welcome.heartbeat_interval)
            self.backoff.reset()
            log.info(
                "connected to server",
                server=self.server,
                session=welcome.session_id,
                server_version=welcome.server_version,
                heartbeat_s=self.heartbeat_interval,
            )
            heartbeats = asyncio.create_task(self._heartbeats(outbox))
            self._outbox = outbox
            self.on_connected()
            while True:
                wait = SILENT_INTERVALS * self.heartbeat_interval
                try:
                    async with asyncio.timeout(wait):
                        message = await call.read()
                except TimeoutError:
                    return f"no word from the server for {wait:g}s"
                if message is grpc.aio.EOF:
                    return "the server closed the stream"
                if message.WhichOneof("body") == "heartbeat":  # it needs no answer
                    if message.heartbeat.HasField("interval"):  # the fleet grew or shrank
                        self._set_interval(interval_seconds(message.heartbeat.interval))
                else:
                    self.on_message(message)
        except grpc.aio.AioRpcError as e:
            reason, _ = error_info(e.trailing_metadata())
            if reason in FATAL_REASONS:
                raise AgentRefusedError(f"{e.details()} [{reason}]") from e
            return f"{e.code().name}: {e.details()}"
        finally:
            self._outbox = None
            if heartbeats is not None:
                heartbeats.cancel()
            call.cancel()

    def _set_interval(self, seconds: float) -> None:
        if seconds != self.heartbeat_interval:
            log.info("heartbeat interval changed", heartbeat_s=seconds)
            self.heartbeat_interval = seconds

    async def _heartbeats(self, outbox: asyncio.Queue[pb.ConnectRequest]) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            free = await asyncio.to_thread(self.disk_free)
            outbox.put_nowait(
                pb.ConnectRequest(
                    heartbeat=agent_pb2.Heartbeat(send_time=_now_pb(), disk_free_bytes=free)
                )
            )
