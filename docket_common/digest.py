"""Content digests: "sha256:" followed by 64 lowercase hex digits."""

from __future__ import annotations

import hashlib
import re

ALGORITHM = "sha256"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class InvalidDigestError(ValueError):
    """A string that is not a well-formed sha256 digest."""


def is_digest(value: str) -> bool:
    return bool(_DIGEST_RE.match(value))


def check_digest(value: str) -> str:
    """Returns ``value`` when it is a well-formed digest, else raises InvalidDigestError."""
    if not _DIGEST_RE.match(value):
        raise InvalidDigestError(f"invalid digest {value!r}: want sha256:<64 lowercase hex digits>")
    return value


def hex_part(digest: str) -> str:
    """The hex part of a well-formed digest: what blob files and torrent files are named."""
    return check_digest(digest).split(":", 1)[1]


def sha256_digest(data: bytes) -> str:
    return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"


def short(digest: str, length: int = 12) -> str:
    """The first ``length`` hex digits, as `docker images` shows ids."""
    return digest.split(":", 1)[-1][:length]
