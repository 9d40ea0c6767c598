"""Domain errors as the registry protocol's errors: an HTTP status and the spec's JSON body.

    {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "...", "detail": {...}}]}

The one place that decides which status and code a domain error gets on the HTTP face, as
errors.py does for gRPC. Codes are the OCI Distribution Specification's (plus the CNCF
registry's TAG_INVALID, RANGE_INVALID and PAGINATION_NUMBER_INVALID).
"""

from __future__ import annotations

from enum import StrEnum

from aiohttp import web

from docket_common.errors import Reason
from docket_common.oci_http import Code, error_response
from docket_server.domain.errors import (
    DocketError,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
)


class Face(StrEnum):
    """Which kind of route an error comes from: the same domain error means different
    things in a manifest PUT (a blob the manifest names is missing) and a blob GET."""

    BLOBS = "blobs"
    UPLOADS = "uploads"
    MANIFESTS = "manifests"
    OTHER = "other"


def _status_code(error: DocketError, face: Face) -> tuple[int, Code]:
    reason = error.reason
    part = error.metadata.get("part")
    if reason is Reason.INVALID_REFERENCE:
        return 400, Code.TAG_INVALID if part == "tag" else Code.NAME_INVALID
    if reason is Reason.INVALID_DIGEST:
        return 400, Code.DIGEST_INVALID
    if reason is Reason.DIGEST_MISMATCH:
        return 400, Code.DIGEST_INVALID
    if reason is Reason.SIZE_MISMATCH:
        return 400, Code.MANIFEST_INVALID if face is Face.MANIFESTS else Code.SIZE_INVALID
    if reason in (Reason.INVALID_MANIFEST, Reason.INVALID_IMAGE):
        return 400, Code.MANIFEST_INVALID
    if reason is Reason.BLOB_NOT_FOUND:
        if isinstance(error, FailedPrecondition) or face is Face.MANIFESTS:
            return 400, Code.MANIFEST_BLOB_UNKNOWN
        return 404, Code.BLOB_UNKNOWN
    if reason is Reason.IMAGE_NOT_FOUND:
        if isinstance(error, FailedPrecondition):
            return 400, Code.MANIFEST_BLOB_UNKNOWN  # an index naming a manifest not pushed
        return 404, Code.MANIFEST_UNKNOWN
    if reason is Reason.MANIFEST_IN_USE:
        return 409, Code.DENIED
    if reason is Reason.REPOSITORY_NOT_FOUND:
        return 404, Code.NAME_UNKNOWN
    if reason is Reason.UPLOAD_NOT_FOUND:
        return 404, Code.BLOB_UPLOAD_UNKNOWN
    if reason is Reason.INVALID_UPLOAD:
        return 400, Code.BLOB_UPLOAD_INVALID
    if reason is Reason.INVALID_RANGE:
        return 416, Code.RANGE_INVALID
    if reason is Reason.INVALID_PAGE_TOKEN:
        return 400, Code.PAGINATION_NUMBER_INVALID
    if reason is Reason.TOO_MANY_UPLOADS:
        return 429, Code.TOOMANYREQUESTS
    if reason is Reason.INSUFFICIENT_STORAGE:
        # Not a size the client got wrong, but one the server cannot take: 413 tells clients
        # not to send it again as it is, and DENIED (not SIZE_INVALID) is the code dockerd
        # does not retry: with SIZE_INVALID `docker push` retried the layer 5 times over 50 s
        # against the same full disk before it showed the message.
        return 413, Code.DENIED
    if reason is Reason.UNAUTHENTICATED:
        return 401, Code.UNAUTHORIZED
    if isinstance(error, NotFound):
        return 404, Code.NAME_UNKNOWN
    if isinstance(error, ResourceExhausted):
        return 429, Code.TOOMANYREQUESTS
    return 400, Code.UNSUPPORTED


def domain_error_response(error: DocketError, face: Face) -> web.Response:
    status, code = _status_code(error, face)
    detail = {"reason": str(error.reason), **error.metadata}
    headers = {}
    if status == 416 and "offset_bytes" in error.metadata:
        offset = int(error.metadata["offset_bytes"])
        headers["Range"] = f"0-{max(offset - 1, 0)}"
    return error_response(status, code, error.message, detail, headers)
