"""The connection to the server and the one-line errors the CLI prints for its failures."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import grpc

from docket_cli.config import DEFAULT_SERVER, Target
from docket_common.channel import open_channel
from docket_common.errors import error_info

if TYPE_CHECKING:
    from docket_common.pb import (
        agent_admin_service_pb2_grpc,
        audit_service_pb2_grpc,
        image_service_pb2_grpc,
        pull_service_pb2_grpc,
        rollout_service_pb2_grpc,
        token_service_pb2_grpc,
    )

__all__ = ["DEFAULT_SERVER", "Connection", "ServerError", "server_error"]

MAX_MESSAGE_BYTES = 8 * 1024 * 1024


@dataclass
class ServerError(Exception):
    """A failed call, with the ErrorInfo reason when the server sent one."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def server_error(err: grpc.aio.AioRpcError, target: Target) -> ServerError:
    code = err.code()
    server = target.server
    message = err.details() or code.name
    reason, metadata = error_info(err.trailing_metadata())
    if code == grpc.StatusCode.UNAVAILABLE and not reason:
        # The certificate code only now: docketctl starts about 40 ms sooner without it.
        from docket_common.tls_client import diagnose

        why = None if target.insecure else diagnose(server, target.ca_pem, target.ca_source)
        if why is None and target.insecure and _speaks_tls(server):
            why = f"the server at {server} speaks TLS: drop --insecure (docketctl login)"
        message = why or f"cannot reach the Docket server at {server} (is docket-server running?)"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        message = f"{message} (docketctl login {server} --token TOKEN, or --token)"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the Docket server at {server} did not answer in time"
    return ServerError(code, message, reason, metadata)


def _speaks_tls(server: str) -> bool:
    from docket_common.tls_client import fetch_chain

    try:
        return bool(fetch_chain(server, timeout=2))
    except (OSError, ValueError):
        return False


class Connection:
    """A channel to the server with the stubs the CLI uses."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.server = target.server
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {target.token}"),) if target.token else ()
        )
        self.channel = open_channel(
            target.server,
            [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
            insecure=target.insecure,
            ca_pem=target.ca_pem,
        )

    # The stubs, each imported when a command first calls its service: a command calls one or
    # two, and importing all six services' messages cost about 10 ms of every start.
    @cached_property
    def images(self) -> image_service_pb2_grpc.ImageServiceStub:
        from docket_common.pb import image_service_pb2_grpc

        return image_service_pb2_grpc.ImageServiceStub(self.channel)

    @cached_property
    def agents(self) -> agent_admin_service_pb2_grpc.AgentAdminServiceStub:
        from docket_common.pb import agent_admin_service_pb2_grpc

        return agent_admin_service_pb2_grpc.AgentAdminServiceStub(self.channel)

    @cached_property
    def rollouts(self) -> rollout_service_pb2_grpc.RolloutServiceStub:
        from docket_common.pb import rollout_service_pb2_grpc

        return rollout_service_pb2_grpc.RolloutServiceStub(self.channel)

    @cached_property
    def pulls(self) -> pull_service_pb2_grpc.PullServiceStub:
        from docket_common.pb import pull_service_pb2_grpc

        return pull_service_pb2_grpc.PullServiceStub(self.channel)

    @cached_property
    def tokens(self) -> token_service_pb2_grpc.TokenServiceStub:
        from docket_common.pb import token_service_pb2_grpc

        return token_service_pb2_grpc.TokenServiceStub(self.channel)

    @cached_property
    def audit(self) -> audit_service_pb2_grpc.AuditServiceStub:
        from docket_common.pb import audit_service_pb2_grpc

        return audit_service_pb2_grpc.AuditServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
