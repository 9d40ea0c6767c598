"""docket.v1.TokenService: decode, call the tokens, encode."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from docket_common.errors import Reason
from docket_common.pb import token_service_pb2 as pb
from docket_common.pb import token_service_pb2_grpc as pb_grpc
from docket_server.api.authz import current_caller
from docket_server.api.convert import timestamp
from docket_server.domain.errors import InvalidArgument
from docket_server.domain.security import Role, TokenRecord, Tokens

# grpcio ships no types: a servicer context is grpc.aio.ServicerContext.
Context = Any

ROLE_TO_PB = {
    Role.ADMIN: pb.ROLE_ADMIN,
    Role.PUBLISHER: pb.ROLE_PUBLISHER,
    Role.OPERATOR: pb.ROLE_OPERATOR,
    Role.VIEWER: pb.ROLE_VIEWER,
    Role.AGENT: pb.ROLE_AGENT,
}
ROLE_FROM_PB = {v: k for k, v in ROLE_TO_PB.items()}


def token_to_pb(token: TokenRecord) -> pb.Token:
    msg = pb.Token(
        id=token.id,
        role=ROLE_TO_PB[token.role],
        description=token.description,
        create_time=timestamp(token.create_time),
        max_uses=token.max_uses,
        uses=token.uses,
        groups=list(token.groups),
        labels=list(token.labels),
        revoked=token.revoked,
        creator=token.creator,
    )
    if token.expire_time is not None:
        msg.expire_time.CopyFrom(timestamp(token.expire_time))
    return msg


class TokenService(pb_grpc.TokenServiceServicer):
    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: Context
    ) -> pb.CreateTokenResponse:
        role = ROLE_FROM_PB.get(request.role)
        if role is None:
            raise InvalidArgument(
                Reason.INVALID_TOKEN_REQUEST,
                "a token needs a role: admin, publisher, operator, viewer or agent",
            )
        ttl = None
        if request.HasField("ttl"):
            ttl = request.ttl.ToTimedelta()
            if ttl <= timedelta(0):
                raise InvalidArgument(Reason.INVALID_TOKEN_REQUEST, "the ttl must be positive")
        token, record = await self.tokens.create(
            role,
            ttl,
            request.description,
            max_uses=request.max_uses,
            groups=list(request.groups),
            labels=list(request.labels),
            creator=current_caller.get().actor,
        )
        return pb.CreateTokenResponse(token=token, info=token_to_pb(record))

    async def ListTokens(
        self, request: pb.ListTokensRequest, context: Context
    ) -> pb.ListTokensResponse:
        return pb.ListTokensResponse(tokens=[token_to_pb(t) for t in self.tokens.list()])

    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: Context
    ) -> pb.RevokeTokenResponse:
        return pb.RevokeTokenResponse(token=token_to_pb(await self.tokens.revoke(request.id)))
