"""docket.v1.AgentService (the agents' streams) and AgentAdminService (the fleet table)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from google.protobuf.message import DecodeError

from docket_common.errors import Reason
from docket_common.pb import agent_admin_service_pb2 as admin_pb
from docket_common.pb import agent_admin_service_pb2_grpc as admin_grpc
from docket_common.pb import agent_pb2
from docket_common.pb import agent_service_pb2 as pb
from docket_common.pb import agent_service_pb2_grpc as pb_grpc
from docket_server.api.authz import current_caller
from docket_server.api.convert import (
    agent_info_from_pb,
    agent_to_pb,
    duration,
    peer_to_pb,
    progress_from_pb,
    pull_order_to_pb,
    task_report_from_pb,
    timestamp,
)
from docket_server.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from docket_server.domain.first_pieces import FirstPieces
from docket_server.domain.fleet import Fleet, Session, validate
from docket_server.domain.orders import OrderBook, OrderPlan, PeerRef, Task
from docket_server.domain.pulls import Pulls
from docket_server.domain.registry import Registry, valid_digest
from docket_server.domain.security import Identities, Tokens
from docket_server.tls import ServerTls

log = structlog.get_logger()

# grpcio ships no types: a servicer context is grpc.aio.ServicerContext.
Context = Any
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000


def server_heartbeat(interval: float) -> pb.ConnectResponse:
    """The server's heartbeat, with the interval in force from now on."""
    return pb.ConnectResponse(
        heartbeat=agent_pb2.Heartbeat(
            send_time=timestamp(datetime.now(UTC)), interval=duration(interval)
        )
    )


class StreamOrderSink:
    """Puts orders, peer hints and cancels on agents' streams."""

    def send_order(self, session: Session, task: Task, plan: OrderPlan) -> None:
        session.send(pb.ConnectResponse(pull_order=pull_order_to_pb(task, plan)))

    def send_peers(self, session: Session, task: Task, peers: list[PeerRef]) -> None:
        session.send(
            pb.ConnectResponse(
                peer_hint=agent_pb2.PeerHint(
                    order_id=task.order_id, peers=[peer_to_pb(p) for p in peers]
                )
            )
        )

    def send_cancel(self, session: Session, task: Task, reason: str) -> None:
        session.send(
            pb.ConnectResponse(
                cancel_order=agent_pb2.CancelOrder(order_id=task.order_id, reason=reason)
            )
        )


class AgentService(pb_grpc.AgentServiceServicer):
    def __init__(
        self,
        fleet: Fleet,
        orders: OrderBook,
        registry: Registry,
        hello_timeout: float,
        server_version: str,
        pulls: Pulls,
        identities: Identities,
        tokens: Tokens,
        tls: ServerTls | None,
        agent_endpoint: Callable[[], str],
    ) -> None:
        self.fleet = fleet
        self.identities = identities
        self.tokens = tokens
        self.tls = tls
        self.agent_endpoint = agent_endpoint
        self.orders = orders
        self.registry = registry
        self.pulls = pulls
        self.first_pieces = FirstPieces(orders)
        self.on_first_pieces: Callable[[int], None] = lambda _bytes: None  # bytes handed out
        self.hello_timeout = hello_timeout
        self.server_version = server_version

    async def ClaimFirstPieces(
        self, request: pb.ClaimFirstPiecesRequest, context: Context
    ) -> pb.ClaimFirstPiecesResponse:
        # The order holds the blob's torrent: a claim asks no database (looking the blob up
        # was most of a claim's time on the event loop, with every host claiming at once).
        digest = valid_digest(request.digest)
        task = self.orders.tasks.get(request.order_id)
        if task is None or task.state.terminal:
            await self.registry.get_torrent(digest)  # BLOB_NOT_FOUND first, for a blob gone
            raise NotFound(
                Reason.ORDER_NOT_FOUND,
                f"no order {request.order_id!r} in progress: first pieces go to orders only",
                order_id=request.order_id,
            )
        _as_agent(task.agent, "claim first pieces for another agent's order")
        blob = task.blobs.get(digest)
        if blob is None:
            raise InvalidArgument(
                Reason.INVALID_DIGEST,
                f"order {request.order_id} does not fetch blob {digest}",
                order_id=request.order_id,
                digest=digest,
            )
        if blob.torrent is None:
            raise NotFound(
                Reason.BLOB_NOT_FOUND, f"blob {digest} is empty and has no torrent", digest=digest
            )
        torrent = blob.torrent
        picked = self.first_pieces.claim(
            torrent.digest,
            torrent.piece_count,
            torrent.piece_length,
            task.agent,
            request.max_bytes,
        )
        try:
            data = await self.registry.read_pieces(torrent, picked)
        except BaseException:  # deleted meanwhile, or the call was cancelled: hand them out again
            self.first_pieces.release(torrent.digest, picked)
            raise
        self.on_first_pieces(sum(len(d) for d in data))
        return pb.ClaimFirstPiecesResponse(
            pieces=[pb.FirstPiece(index=i, data=d) for i, d in zip(picked, data, strict=True)]
        )

    async def StartPull(
        self, request: pb.StartPullRequest, context: Context
    ) -> pb.StartPullResponse:
        _as_agent(request.agent_name, "start a pull for another agent")
        pull = await self.pulls.create(
            request.agent_name,
            request.image_name,
            request.repository,
            request.blob_digests,
            request.display_name,
        )
        return pb.StartPullResponse(
            order=pull_order_to_pb(pull.task, self.orders.order_for(pull.task))
        )

    async def EnrollAgent(
        self, request: pb.EnrollAgentRequest, context: Context
    ) -> pb.EnrollAgentResponse:
        caller = current_caller.get()
        if self.tls is None or caller.token is None:
            raise FailedPrecondition(
                Reason.TLS_DISABLED,
                "this server runs with --insecure: agents join without enrolling",
            )
        tls = self.tls
        cert, expires = await self.tokens.use(
            caller.token,
            lambda token: self.identities.enroll(
                request.name, request.csr_pem, token, tls.sign_agent
            ),
        )
        return pb.EnrollAgentResponse(
            certificate_pem=cert,
            ca_pem=tls.ca_pem,
            agent_endpoint=self.agent_endpoint(),
            expire_time=timestamp(expires),
        )

    async def RenewCertificate(
        self, request: pb.RenewCertificateRequest, context: Context
    ) -> pb.RenewCertificateResponse:
        caller = current_caller.get()
        if self.tls is None or not caller.agent:
            raise FailedPrecondition(
                Reason.TLS_DISABLED, "certificates are renewed over mutual TLS, by agents"
            )
        tls = self.tls
        cert, expires = await self.identities.renew(caller.agent, request.csr_pem, tls.sign_agent)
        return pb.RenewCertificateResponse(certificate_pem=cert, expire_time=timestamp(expires))

    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Context
    ) -> AsyncIterator[pb.ConnectResponse]:
        peer = context.peer()
        try:
            async with asyncio.timeout(self.hello_timeout):
                first = await anext(aiter(request_iterator), None)
        except TimeoutError:
            log.warning("agent stream dropped: no hello", peer=peer, after_s=self.hello_timeout)
            raise InvalidArgument(
                Reason.HELLO_REQUIRED,
                f"no hello within {self.hello_timeout:g}s of opening the stream",
                peer=peer,
            ) from None
        except DecodeError as e:
            log.warning("agent stream dropped: unreadable first message", peer=peer, error=str(e))
            raise InvalidArgument(
                Reason.MALFORMED_MESSAGE, f"unreadable message: {e}", peer=peer
            ) from None
        if first is None:
            # Closed at once, or cut off by gRPC itself (a message over the size limit).
            log.warning("agent stream ended before its hello", peer=peer)
            return
        if not first.HasField("hello"):
            log.warning("agent stream dropped: first message not a hello", peer=peer)
            raise InvalidArgument(
                Reason.HELLO_REQUIRED, "the first message on the stream must be a hello", peer=peer
            )
        info = agent_info_from_pb(first.hello)
        validate(info)
        _as_agent(info.name, f"connect as agent {info.name!r}")
        self.identities.check_claims(info.name, info.groups, info.labels)
        session = self.fleet.connect(info, peer)
        interval = self.fleet.welcome(
            session, follows_interval=first.hello.follows_heartbeat_interval
        )
        reader = asyncio.create_task(self._read(request_iterator, session))
        ended = "stream closed by the server"
        try:
            yield pb.ConnectResponse(
                welcome=agent_pb2.Welcome(
                    session_id=session.id,
                    heartbeat_interval=duration(interval),
                    server_version=self.server_version,
                )
            )
            # Its silence counts from when it could know the interval: a welcome that waited
            # in a busy server (10,000 agents connecting at once) is not the agent's delay.
            session.last_heard = session.beat_sent = time.monotonic()
            self.orders.agent_connected(session)
            while (message := await session.next_message()) is not None:
                yield message
            if session.error is not None:
                ended = session.error.message
                raise session.error
            ended = "agent closed its stream"
        except asyncio.CancelledError:
            ended = "stream cancelled"
            raise
        finally:
            self.fleet.disconnect(session, ended)  # first: nothing awaited can cut it short
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self, requests: AsyncIterator[pb.ConnectRequest], session: Session) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("body")
                if kind == "heartbeat":
                    self.fleet.heard(session, request.heartbeat.disk_free_bytes)
                    continue
                self.fleet.heard(session)
                if kind == "piece_progress":
                    self.orders.on_progress(session.name, progress_from_pb(request.piece_progress))
                elif kind == "task_update":
                    report = task_report_from_pb(request.task_update)
                    if report is not None:
                        self.orders.on_update(session.name, report)
                elif kind == "hello":
                    session.close(
                        InvalidArgument(
                            Reason.HELLO_REQUIRED,
                            "a stream carries one hello, first",
                            agent=session.name,
                        )
                    )
                    return
            session.close()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a malformed or oversized message, a broken connection
            log.warning("agent stream failed", agent=session.name, error=str(e) or repr(e))
            session.close()


def _as_agent(name: str, what: str) -> None:
    """PERMISSION_DENIED when an enrolled agent acts for another (an insecure server lets
    anyone act for anyone)."""
    caller = current_caller.get()
    if caller.role is not None and caller.agent != name:
        raise PermissionDenied(
            Reason.PERMISSION_DENIED,
            f"{caller.label} may not {what}: its certificate names {caller.agent or 'no agent'}",
            agent=name,
        )


class AgentAdminService(admin_grpc.AgentAdminServiceServicer):
    def __init__(self, fleet: Fleet, identities: Identities) -> None:
        self.fleet = fleet
        self.identities = identities

    async def RemoveAgent(
        self, request: admin_pb.RemoveAgentRequest, context: Context
    ) -> admin_pb.RemoveAgentResponse:
        enrolled = await self.identities.remove(request.name)
        known = await self.fleet.remove(request.name)
        if not enrolled and not known:
            raise NotFound(
                Reason.AGENT_NOT_FOUND, f"agent {request.name} not found", agent=request.name
            )
        return admin_pb.RemoveAgentResponse()

    async def ListAgents(
        self, request: admin_pb.ListAgentsRequest, context: Context
    ) -> admin_pb.ListAgentsResponse:
        records = await self.fleet.list(request.selector)
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(request.page_token) if request.page_token else ""
        remaining = [r for r in records if r.name > after]
        page = remaining[:size]
        token = _encode_token(page[-1].name) if len(remaining) > size else ""
        return admin_pb.ListAgentsResponse(
            agents=[agent_to_pb(r) for r in page], next_page_token=token
        )

    async def GetAgent(
        self, request: admin_pb.GetAgentRequest, context: Context
    ) -> admin_pb.GetAgentResponse:
        return admin_pb.GetAgentResponse(agent=agent_to_pb(await self.fleet.get(request.name)))


def _encode_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, binascii.Error) as e:
        raise InvalidArgument(
            Reason.INVALID_PAGE_TOKEN, "page_token is not one ListAgents returned"
        ) from e
