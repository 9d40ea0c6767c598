"""A simulated agent's stream written by hand: AgentService.Connect as gRPC over HTTP/2 over
mutual TLS, without grpcio.

grpcio's asyncio client costs about half a millisecond of CPU for each message a stream
sends (measured in tests/support/sim_fleet.py's workers: 14 CPU seconds for a rollout to 1000
hosts), so thousands of simulated agents on the server's own two cores starve the server they
are meant to load. On the wire this is the same protocol (the server cannot tell the
difference): one TLS connection per agent with its own certificate, ALPN h2, one stream, the
same ConnectRequest and ConnectResponse messages in gRPC's length-prefixed framing, HTTP/2 flow
control obeyed both ways. Only what a client must do is done: SETTINGS and PING are
acknowledged, the server's window updates are followed, and the server's header blocks are
skipped (their HPACK is never decoded: the trailers' status is not read; an ended stream says
only how it ended).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path

from docket_agent.stream import interval_seconds
from docket_common.pb import agent_pb2
from docket_common.pb import agent_service_pb2 as pb
from tests.support.agents import sim_hello

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, PADDED = 0x1, 0x1, 0x8
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
STREAM = 1  # the one stream of the connection
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
CONNECT_PATH = "/docket.v1.AgentService/Connect"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK's integer: ``first`` holds the pattern bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(text: str) -> bytes:
    raw = text.encode()
    return _hpack_int(len(raw), 7, 0) + raw  # no Huffman


def request_headers(authority: str) -> bytes:
    """The header block of a Connect call, as literals (no dynamic table)."""
    block = bytearray()
    block += b"\x83"  # :method POST (static index 3)
    block += b"\x87"  # :scheme https (static index 7)
    block += _hpack_int(4, 4, 0) + _hpack_string(CONNECT_PATH)  # :path, indexed name
    block += _hpack_int(1, 4, 0) + _hpack_string(authority)  # :authority, indexed name
    for name, value in (("content-type", "application/grpc"), ("te", "trailers")):
        block += b"\x00" + _hpack_string(name) + _hpack_string(value)
    return bytes(block)


def grpc_message(message: pb.ConnectRequest) -> bytes:
    body = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def client_context(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, scratch: Path) -> ssl.SSLContext:
    """A TLS context for one agent: its certificate, the server's CA, ALPN h2. The key and
    certificate go through files in ``scratch`` (ssl loads a chain from files only)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode())
    chain = scratch / "chain.pem"
    chain.write_bytes(cert_pem + key_pem)
    context.load_cert_chain(chain)
    chain.unlink()
    context.set_alpn_protocols(["h2"])
    return context


class WireAgent(asyncio.Protocol):
    """One agent stream: hello, then what ``send`` is given, and a heartbeat when
    ``heartbeat_due`` finds it idle. Orders it is sent land in ``orders``.

    The attributes the simulations read are SimulatedAgent's: ``welcome``, ``welcomed``,
    ``orders``, ``on_sent``, ``ended`` (here a sentence: how the stream ended)."""

    def __init__(
        self,
        name: str,
        agent_id: str,
        *,
        groups: tuple[str, ...],
        bt_endpoint: str,
        address: tuple[str, int],
        context: ssl.SSLContext | None,
    ) -> None:
        self.name = name
        self.agent_id = agent_id
        self.groups = groups
        self.bt_endpoint = bt_endpoint
        self.address = address
        self.context = context
        self.welcome: agent_pb2.Welcome | None = None
        self.welcomed = asyncio.Event()
        self.heartbeat_interval = 5.0  # from the welcome, then the server's heartbeats
        self.ended: str | None = None
        self.orders: asyncio.Queue[agent_pb2.PullOrder] = asyncio.Queue()
        self.on_sent: Callable[[pb.ConnectRequest], None] | None = None
        self.last_sent = 0.0  # loop time of the last message written
        self._transport: asyncio.Transport | None = None
        self._inbox = bytearray()  # frames not yet parsed
        self._stream_data = bytearray()  # stream 1's DATA not yet parsed into messages
        self._pending: deque[tuple[pb.ConnectRequest, bytes]] = deque()  # over the window
        self._window_conn = DEFAULT_WINDOW
        self._window_stream = DEFAULT_WINDOW
        self._initial_window = DEFAULT_WINDOW
        self._closed = asyncio.Event()

    # The agent's side

    async def run(self, attempts: int = 60) -> None:
        """Connects (again after a refused or failed handshake, as a reconnecting agent
        would), and holds the stream until the server ends it or ``close``."""
        loop = asyncio.get_running_loop()
        host, port = self.address
        for attempt in range(attempts):
            try:
                await loop.create_connection(
                    lambda: self,
                    host,
                    port,
                    ssl=self.context,
                    server_hostname=host if self.context else None,
                    ssl_handshake_timeout=60 if self.context else None,
                )
                break
            except (OSError, ssl.SSLError, TimeoutError) as e:
                if attempt == attempts - 1:
                    self._end(f"cannot connect: {type(e).__name__}")
                    return
                await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
        await self._closed.wait()

    def send(self, message: pb.ConnectRequest) -> None:
        """Writes ``message`` on the stream now, or once the server's window has room."""
        if self.ended is not None:
            return
        data = grpc_message(message)
        if self._pending or not self._fits(len(data)):
            self._pending.append((message, data))
            return
        self._write_data(message, data)

    def heartbeat_due(self, now: float) -> None:
        """Sends a heartbeat if nothing went for the interval the server set (in its
        welcome, then in its heartbeats)."""
        if self.welcome is None or self.ended is not None:
            return
        if now - self.last_sent >= self.heartbeat_interval:
            beat = agent_pb2.Heartbeat()
            beat.send_time.GetCurrentTime()
            self.send(pb.ConnectRequest(heartbeat=beat))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._end("closed")

    def hello(self) -> pb.ConnectRequest:
        return sim_hello(self.name, self.agent_id, self.groups, self.bt_endpoint)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)
        authority = f"{self.address[0]}:{self.address[1]}"
        transport.write(
            PREFACE
            + _frame(SETTINGS, 0, 0, settings)
            # What the server sends is small (a welcome, orders, hints): never run it dry.
            + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW))
            + _frame(HEADERS, 0x4, STREAM, request_headers(authority))  # END_HEADERS
        )
        self.send(self.hello())

    def data_received(self, data: bytes) -> None:
        self._inbox += data
        while len(self._inbox) >= 9:
            length = int.from_bytes(self._inbox[:3], "big")
            if len(self._inbox) < 9 + length:
                return
            kind, flags = self._inbox[3], self._inbox[4]
            stream = int.from_bytes(self._inbox[5:9], "big") & MAX_WINDOW
            payload = bytes(self._inbox[9 : 9 + length])
            del self._inbox[: 9 + length]
            self._frame_received(kind, flags, stream, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end("connection lost" + (f": {type(exc).__name__}" if exc else ""))

    # HTTP/2

    def _frame_received(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - 5, 6):
                key, value = struct.unpack(">HI", payload[i : i + 6])
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    self._window_stream += value - self._initial_window
                    self._initial_window = value
            self._write(_frame(SETTINGS, ACK, 0, b""))
            self._flush()
        elif kind == PING and not flags & ACK:
            self._write(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & MAX_WINDOW
            if stream == 0:
                self._window_conn += increment
            else:
                self._window_stream += increment
            self._flush()
        elif kind == DATA and stream == STREAM:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            self._stream_data += payload
            self._messages()
            if flags & END_STREAM:
                self._end("the server ended the stream")
        elif kind == HEADERS and stream == STREAM and flags & END_STREAM:
            self._end("the server ended the stream (trailers)")
        elif kind == RST_STREAM and stream == STREAM:
            self._end(f"RST_STREAM {int.from_bytes(payload[:4], 'big')}")
        elif kind == GOAWAY:
            self._end(f"GOAWAY {int.from_bytes(payload[4:8], 'big')}")

    def _messages(self) -> None:
        while len(self._stream_data) >= 5:
            length = int.from_bytes(self._stream_data[1:5], "big")
            if len(self._stream_data) < 5 + length:
                return
            body = bytes(self._stream_data[5 : 5 + length])
            del self._stream_data[: 5 + length]
            message = pb.ConnectResponse.FromString(body)
            kind = message.WhichOneof("body")
            if kind == "welcome":
                self.welcome = message.welcome
                self.heartbeat_interval = interval_seconds(message.welcome.heartbeat_interval)
                self.welcomed.set()
            elif kind == "heartbeat" and message.heartbeat.HasField("interval"):
                self.heartbeat_interval = interval_seconds(message.heartbeat.interval)
            elif kind == "pull_order":
                self.orders.put_nowait(message.pull_order)

    def _fits(self, size: int) -> bool:
        return size <= self._window_conn and size <= self._window_stream

    def _flush(self) -> None:
        while self._pending and self._fits(len(self._pending[0][1])):
            message, data = self._pending.popleft()
            self._write_data(message, data)

    def _write_data(self, message: pb.ConnectRequest, data: bytes) -> None:
        self._window_conn -= len(data)
        self._window_stream -= len(data)
        self._write(_frame(DATA, 0, STREAM, data))
        self.last_sent = asyncio.get_running_loop().time()
        if self.on_sent is not None:
            self.on_sent(message)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _end(self, how: str) -> None:
        if self.ended is None:
            self.ended = how
        self.welcomed.set()  # wake waiters also when refused
        self._closed.set()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
