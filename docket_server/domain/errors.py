"""Domain errors: each carries a reason (docket_common.errors.Reason) and the values concerned.

The API layer maps each class to a gRPC status code and a google.rpc.ErrorInfo.
"""

from __future__ import annotations

from docket_common.errors import Reason


class DocketError(Exception):
    """Base class: ``message`` is one line for a person, ``metadata`` the values for programs."""

    def __init__(self, reason: Reason, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(DocketError):
    pass


class NotFound(DocketError):
    pass


class FailedPrecondition(DocketError):
    pass


class ResourceExhausted(DocketError):
    pass


class AlreadyExists(DocketError):
    pass


class DeadlineExceeded(DocketError):
    pass


class PermissionDenied(DocketError):
    pass


class Unauthenticated(DocketError):
    pass
