"""The connection to the server and the one-line errors the CLI prints for its failures."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from docket_common.errors import error_info
from docket_common.pb import (
    agent_admin_service_pb2_grpc,
    image_service_pb2_grpc,
    pull_service_pb2_grpc,
    rollout_service_pb2_grpc,
)

DEFAULT_SERVER = "127.0.0.1:7800"
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


def server_error(err: grpc.aio.AioRpcError, server: str) -> ServerError:
    code = err.code()
    message = err.details() or code.name
    reason, metadata = error_info(err.trailing_metadata())
    if code == grpc.StatusCode.UNAVAILABLE and not reason:
        message = f"cannot reach the Docket server at {server} (is docket-server running?)"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the Docket server at {server} did not answer in time"
    return ServerError(code, message, reason, metadata)


class Connection:
    """A channel to the server with the stubs the CLI uses."""

    def __init__(self, server: str, token: str | None = None) -> None:
        self.server = server
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.channel = grpc.aio.insecure_channel(
            server,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.images = image_service_pb2_grpc.ImageServiceStub(self.channel)
        self.agents = agent_admin_service_pb2_grpc.AgentAdminServiceStub(self.channel)
        self.rollouts = rollout_service_pb2_grpc.RolloutServiceStub(self.channel)
        self.pulls = pull_service_pb2_grpc.PullServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
