"""The server's interceptors: who calls (a bearer token, or an enrolled agent's certificate on
the agent port), whether they may (api/authz.py), the audit record of every call that changes
something, domain errors turned into statuses with ErrorInfo, and access logs (Gatekeeper);
and every call counted and timed for Prometheus (RpcMetrics, outermost).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from docket_common.pki import agent_name_of
from docket_server.api.authz import PUBLIC_PREFIXES, RPCS, Guard, current_caller
from docket_server.api.errors import abort_with, status_code_of
from docket_server.domain.errors import DocketError
from docket_server.domain.security import ANONYMOUS, Audit, Caller
from docket_server.metrics import ServerMetrics
from docket_server.tls import peer_certificate

log = structlog.get_logger()

# grpcio ships no types: a servicer context is grpc.aio.ServicerContext.
Context = Any
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
TARGET_FIELDS = ("name", "image_name", "id", "digest", "selector", "repository", "role")


def bearer(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def _target(request: object) -> str:
    if not isinstance(request, Message):
        return ""
    for name in TARGET_FIELDS:
        field = request.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            continue
        value = getattr(request, name)
        if value and field.enum_type is not None:  # ROLE_AGENT, not 5
            return f"{name}={field.enum_type.values_by_number[value].name}"
        if value:
            return f"{name}={value}"
    return ""


class Gatekeeper(grpc.aio.ServerInterceptor):
    """Admits a call (or refuses it), runs it with its caller known, audits it, and turns
    domain errors into statuses with ErrorInfo."""

    def __init__(self, guard: Guard, audit: Audit | None = None) -> None:
        self.guard = guard
        self.audit = audit

    def _identify(self, method: str, metadata: Any, context: Context) -> Caller:
        if method.startswith(PUBLIC_PREFIXES) or not self.guard.secure:
            return ANONYMOUS
        cert = peer_certificate(context.auth_context())
        agent = agent_name_of(cert) if cert is not None else None
        return self.guard.identify(
            bearer(metadata or ()),
            agent or "",
            format(cert.serial_number, "x") if cert is not None and agent else "",
        )

    def _check(self, method: str, caller: Caller) -> None:
        if not method.startswith(PUBLIC_PREFIXES):
            self.guard.check(caller, RPCS.get(method), method)

    def _audited(
        self, method: str, caller: Caller, request: object, outcome: str, peer: str
    ) -> None:
        rule = RPCS.get(method)
        if self.audit is not None and (
            (rule is not None and rule.changes) or outcome.startswith("PERMISSION")
        ):
            self.audit.record(caller, method, _target(request), outcome, peer)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        if handler.unary_unary or handler.stream_unary:
            behavior = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: Context) -> Any:
                start = time.monotonic()
                caller = ANONYMOUS
                try:
                    caller = self._identify(method, metadata, context)
                    self._check(method, caller)
                    reset = current_caller.set(caller)
                    try:
                        response = await behavior(request, context)
                    finally:
                        current_caller.reset(reset)
                except DocketError as e:
                    _log_error(method, start, e)
                    self._audited(method, caller, request, _outcome(e), context.peer())
                    await abort_with(context, e)
                self._audited(method, caller, request, "OK", context.peer())
                _log_done(method, start, context)
                return response

            return _replace(handler, unary)

        stream_behavior = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            start = time.monotonic()
            caller = ANONYMOUS
            try:
                caller = self._identify(method, metadata, context)
                self._check(method, caller)
                reset = current_caller.set(caller)
                try:
                    async for item in stream_behavior(request, context):
                        yield item
                finally:
                    current_caller.reset(reset)
            except DocketError as e:
                _log_error(method, start, e)
                self._audited(method, caller, request, _outcome(e), context.peer())
                await abort_with(context, e)
            _log_done(method, start, context)

        return _replace(handler, streaming)


GRPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}


def split_method(method: str) -> tuple[str, str]:
    """ "/docket.v1.ImageService/GetImage" -> ("docket.v1.ImageService", "GetImage")."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or "unknown"


def code_of(error: BaseException | None, context: Context) -> str:
    """The status code a call ended with: OK, what it aborted with, or what its error maps
    to (a client gone away is CANCELLED)."""
    if error is None:
        code = context.code()
        return str(code.name) if isinstance(code, grpc.StatusCode) else "OK"
    if isinstance(error, DocketError):
        return str(status_code_of(error).name)
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return str(code.name)
    return "UNKNOWN"


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Counts every call as it starts and as it ends (with its status code), and times the
    unary and client-streaming ones (grpc_server_* as go-grpc-prometheus names them).

    Server-streaming and bidi calls (WatchRollout, ReadBlob, an agent's Connect, which lasts
    for hours) are counted when they end but not put in the latency histogram: their length
    is how long the client stays, not how fast the server answers. Calls to methods that do
    not exist are not counted: their names come from clients, unbounded."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        m = self.metrics
        kind = GRPC_TYPES[(handler.request_streaming, handler.response_streaming)]
        service, name = split_method(handler_call_details.method)
        started = m.rpc_started.labels(kind, service, name)
        streams_out = handler.response_streaming
        timed = None if streams_out else m.rpc_seconds.labels(kind, service, name)

        def ended(error: BaseException | None, context: Context, start: float) -> None:
            m.rpc_handled.labels(kind, service, name, code_of(error, context)).inc()
            if timed is not None:
                timed.observe(time.monotonic() - start)

        if not streams_out:
            behavior = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: Context) -> Any:
                started.inc()
                start = time.monotonic()
                try:
                    response = await behavior(request, context)
                except BaseException as e:
                    ended(e, context, start)
                    raise
                ended(None, context, start)
                return response

            return _replace(handler, unary)

        stream_behavior = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            started.inc()
            start = time.monotonic()
            try:
                async for item in stream_behavior(request, context):
                    yield item
            except BaseException as e:
                ended(e, context, start)
                raise
            ended(None, context, start)

        return _replace(handler, streaming)


def _outcome(error: DocketError) -> str:
    """The status code the call ended with and its reason: "PERMISSION_DENIED: …"."""
    return f"{status_code_of(error).name}: {error.reason}"


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
