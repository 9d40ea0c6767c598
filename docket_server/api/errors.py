"""Domain errors to gRPC statuses carrying google.rpc.ErrorInfo."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from docket_common.errors import DOMAIN
from docket_server.domain.errors import (
    AlreadyExists,
    DeadlineExceeded,
    DocketError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)

_CODES: dict[type[DocketError], tuple[grpc.StatusCode, int]] = {
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    NotFound: (grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    ResourceExhausted: (grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED),
    AlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, code_pb2.ALREADY_EXISTS),
    DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, code_pb2.DEADLINE_EXCEEDED),
    PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, code_pb2.PERMISSION_DENIED),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, code_pb2.UNAUTHENTICATED),
}


def status_code_of(err: DocketError) -> grpc.StatusCode:
    return _CODES.get(type(err), (grpc.StatusCode.ABORTED, 0))[0]


def status_for(code: int, message: str, reason: str, metadata: Mapping[str, str]) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata))
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[detail]))


async def abort_with(context: grpc.aio.ServicerContext[object, object], err: DocketError) -> None:
    """Ends the RPC with the status and ErrorInfo the domain error stands for."""
    # A bare DocketError is a stream the server ends on purpose (an agent replaced, say).
    _, code = _CODES.get(type(err), (grpc.StatusCode.ABORTED, code_pb2.ABORTED))
    await context.abort_with_status(status_for(code, err.message, err.reason, err.metadata))
