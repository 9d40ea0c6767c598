"""Error reasons shared by the server (which raises them) and clients (which read them).

Every error the server returns carries a canonical gRPC status code and a
``google.rpc.ErrorInfo`` whose ``reason`` is one of these and whose ``domain`` is DOMAIN.
"""

from __future__ import annotations

from enum import StrEnum

DOMAIN = "docket.dev"


class Reason(StrEnum):
    INVALID_REFERENCE = "INVALID_REFERENCE"
    INVALID_DIGEST = "INVALID_DIGEST"
    IMAGE_NOT_FOUND = "IMAGE_NOT_FOUND"
    BLOB_NOT_FOUND = "BLOB_NOT_FOUND"
    DIGEST_MISMATCH = "DIGEST_MISMATCH"
    SIZE_MISMATCH = "SIZE_MISMATCH"
    UPLOAD_HEADER_MISSING = "UPLOAD_HEADER_MISSING"
    INVALID_IMAGE = "INVALID_IMAGE"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    INVALID_RANGE = "INVALID_RANGE"
    INSUFFICIENT_STORAGE = "INSUFFICIENT_STORAGE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
