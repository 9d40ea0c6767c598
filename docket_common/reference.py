"""Image references in Docker's grammar: ``repository[:tag]`` or ``repository@sha256:…``.

A reference without a tag or digest means ``:latest``, as in Docker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from docket_common.digest import is_digest

DEFAULT_TAG = "latest"

# distribution/reference: path components of lowercase alphanumerics joined by separators,
# optionally after a registry host[:port].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?)"
_REPOSITORY_RE = re.compile(rf"^(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*$")
_NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")  # a registry's repository: no host
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_MAX_REPOSITORY = 255


class InvalidReferenceError(ValueError):
    """A string that is not an image reference."""


@dataclass(frozen=True)
class Reference:
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``repository:tag`` or ``repository@digest``."""
        if self.digest is not None:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag or DEFAULT_TAG}"

    def __str__(self) -> str:
        return self.name


def parse_reference(text: str) -> Reference:
    """Parses ``repository[:tag]`` or ``repository@sha256:…``; no tag means ``latest``."""
    original = text
    if not text or text != text.strip():
        raise InvalidReferenceError(f"invalid reference {original!r}: empty or padded with spaces")
    digest: str | None = None
    tag: str | None = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not is_digest(digest):
            raise InvalidReferenceError(
                f"invalid reference {original!r}: digest must be sha256:<64 lowercase hex digits>"
            )
    # A colon after the last slash separates the tag; one before it belongs to a host:port.
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidReferenceError(
                f"invalid reference {original!r}: tag {tag!r} must be 1-128 of [A-Za-z0-9_.-], "
                "not starting with . or -"
            )
    if len(text) > _MAX_REPOSITORY or not _REPOSITORY_RE.match(text):
        raise InvalidReferenceError(
            f"invalid reference {original!r}: repository must be lowercase letters, digits and "
            "separators (. _ - /), like 'perl' or 'team/app'"
        )
    if digest is not None:
        if tag is not None:
            raise InvalidReferenceError(
                f"invalid reference {original!r}: give a tag or a digest, not both"
            )
        return Reference(repository=text, digest=digest)
    return Reference(repository=text, tag=tag or DEFAULT_TAG)


def parse_tagged(text: str) -> Reference:
    """Like parse_reference, but a digest reference is refused: pushes need a tag."""
    ref = parse_reference(text)
    if ref.digest is not None:
        raise InvalidReferenceError(f"invalid reference {text!r}: a push needs a tag, not a digest")
    return ref


def is_repository(name: str) -> bool:
    """Whether ``name`` is a repository name (``perl``, ``team/app``), as registries take it."""
    return len(name) <= _MAX_REPOSITORY and bool(_NAME_RE.match(name))


def is_tag(tag: str) -> bool:
    return bool(_TAG_RE.fullmatch(tag))
