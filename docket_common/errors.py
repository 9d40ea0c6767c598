"""Error reasons shared by the server (which raises them) and clients (which read them).

Every error the server returns carries a canonical gRPC status code and a
``google.rpc.ErrorInfo`` whose ``reason`` is one of these and whose ``domain`` is DOMAIN.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

DOMAIN = "docket.dev"


class Reason(StrEnum):
    INVALID_REFERENCE = "INVALID_REFERENCE"
    INVALID_DIGEST = "INVALID_DIGEST"
    IMAGE_NOT_FOUND = "IMAGE_NOT_FOUND"
    BLOB_NOT_FOUND = "BLOB_NOT_FOUND"
    DIGEST_MISMATCH = "DIGEST_MISMATCH"
    SIZE_MISMATCH = "SIZE_MISMATCH"
    UPLOAD_HEADER_MISSING = "UPLOAD_HEADER_MISSING"
    UPLOAD_TRAILER_MISSING = "UPLOAD_TRAILER_MISSING"
    ORDER_NOT_FOUND = "ORDER_NOT_FOUND"
    INVALID_IMAGE = "INVALID_IMAGE"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    INVALID_RANGE = "INVALID_RANGE"
    INSUFFICIENT_STORAGE = "INSUFFICIENT_STORAGE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    HELLO_REQUIRED = "HELLO_REQUIRED"
    INVALID_AGENT = "INVALID_AGENT"
    AGENT_NAME_TAKEN = "AGENT_NAME_TAKEN"
    AGENT_REPLACED = "AGENT_REPLACED"
    AGENT_NOT_FOUND = "AGENT_NOT_FOUND"
    HEARTBEAT_TIMEOUT = "HEARTBEAT_TIMEOUT"
    INVALID_SELECTOR = "INVALID_SELECTOR"
    MALFORMED_MESSAGE = "MALFORMED_MESSAGE"
    NO_HOSTS = "NO_HOSTS"
    ROLLOUT_NOT_FOUND = "ROLLOUT_NOT_FOUND"
    INVALID_ROLLOUT = "INVALID_ROLLOUT"
    INVALID_MANIFEST = "INVALID_MANIFEST"
    MANIFEST_IN_USE = "MANIFEST_IN_USE"
    REPOSITORY_NOT_FOUND = "REPOSITORY_NOT_FOUND"
    UPLOAD_NOT_FOUND = "UPLOAD_NOT_FOUND"
    INVALID_UPLOAD = "INVALID_UPLOAD"
    TOO_MANY_UPLOADS = "TOO_MANY_UPLOADS"
    NO_PLATFORM = "NO_PLATFORM"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    TOKEN_NOT_FOUND = "TOKEN_NOT_FOUND"
    TOKEN_USED_UP = "TOKEN_USED_UP"
    INVALID_TOKEN_REQUEST = "INVALID_TOKEN_REQUEST"
    INVALID_CSR = "INVALID_CSR"
    TLS_DISABLED = "TLS_DISABLED"
    AGENT_NOT_ENROLLED = "AGENT_NOT_ENROLLED"
    AGENT_REMOVED = "AGENT_REMOVED"
    GROUP_NOT_ALLOWED = "GROUP_NOT_ALLOWED"
    INVALID_GRACE_PERIOD = "INVALID_GRACE_PERIOD"


def error_info(trailing_metadata: Iterable[tuple[str, Any]] | None) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata of a failed call's trailers; ("", {}) when absent."""
    # Imported on the first failed call: every docketctl command imports this module, and
    # these about 16 ms of its start only matter once a call failed.
    from google.rpc import error_details_pb2, status_pb2

    for key, value in trailing_metadata or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason), dict(info.metadata)
    return "", {}
