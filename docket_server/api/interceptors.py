"""The server's interceptor chain: authentication first, then error mapping and access logs.

Authentication is a pluggable Authenticator; today the server either allows every call or
checks bearer tokens from a file (``--auth-token-file``). mTLS and other schemes plug in here.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import structlog
from google.rpc import code_pb2

from docket_common.errors import Reason
from docket_server.api.errors import abort_with, status_for
from docket_server.domain.errors import DocketError

log = structlog.get_logger()

# grpcio ships no types: a servicer context is grpc.aio.ServicerContext.
Context = Any
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

# Methods anyone may call: load balancers and operators probing liveness, API discovery.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Authenticator(Protocol):
    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        """Returns the caller's identity, or None when the call must be refused."""


class AllowAll:
    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        return "anonymous"


class StaticTokens:
    """Bearer tokens, one a line in a file (blank lines and # comments ignored)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("the token file holds no tokens")
        self._tokens = [t.encode() for t in tokens]

    @classmethod
    def from_file(cls, path: Path) -> StaticTokens:
        lines = path.read_text().splitlines()
        return cls([s for line in lines if (s := line.strip()) and not s.startswith("#")])

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer":
                    candidate = token.strip().encode()
                    for i, known in enumerate(self._tokens):
                        if hmac.compare_digest(candidate, known):
                            return f"token#{i + 1}"
        return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        if self.authenticator.authenticate(handler_call_details.invocation_metadata or ()):
            return handler
        log.warning("unauthenticated call refused", method=method)

        async def refuse(_request: object, context: Context) -> None:
            await context.abort_with_status(
                status_for(
                    code_pb2.UNAUTHENTICATED,
                    "missing or unknown bearer token",
                    Reason.UNAUTHENTICATED,
                    {"method": method},
                )
            )

        return _replace(handler, refuse)


class ErrorsAndAccessLog(grpc.aio.ServerInterceptor):
    """Turns domain errors into statuses with ErrorInfo and logs every call's outcome."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary or handler.stream_unary:
            behavior = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: Context) -> Any:
                start = time.monotonic()
                try:
                    response = await behavior(request, context)
                except DocketError as e:
                    _log_error(method, start, e)
                    await abort_with(context, e)
                _log_done(method, start, context)
                return response

            return _replace(handler, unary)

        stream_behavior = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            start = time.monotonic()
            try:
                async for item in stream_behavior(request, context):
                    yield item
            except DocketError as e:
                _log_error(method, start, e)
                await abort_with(context, e)
            _log_done(method, start, context)

        return _replace(handler, streaming)


def _log_error(method: str, start: float, err: DocketError) -> None:
    log.info(
        "rpc failed",
        method=method,
        reason=str(err.reason),
        error=err.message,
        ms=round((time.monotonic() - start) * 1000, 1),
    )


def _log_done(method: str, start: float, context: Context) -> None:
    if method.startswith(PUBLIC_PREFIXES):
        return
    log.debug("rpc", method=method, ms=round((time.monotonic() - start) * 1000, 1))


def _replace(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """The same kind of handler, with the same (de)serialisers, running ``behavior``."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
