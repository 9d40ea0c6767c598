"""Host selectors, as `docketctl agents --hosts` and rollouts use them.

A selector is ``all`` or comma-separated terms; a host matches when any term does:

- ``NAME``: a group the host belongs to, or the host's own name (``web``, ``web1``);
- ``KEY=VALUE``: a label the host carries (``env=prod``).

So ``web1,web2`` picks two hosts, ``group1`` a group, ``env=prod,canary`` the union.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_WORD = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?"
_WORD_RE = re.compile(rf"^{_WORD}$")
_LABEL_KEY_RE = re.compile(
    r"^(?:[a-z0-9.-]{1,253}/)?[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$"
)
_LABEL_VALUE_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?)?$")

SELECTOR_HELP = (
    "Which hosts: 'all', or comma-separated terms, each a group or host name "
    "('group1', 'web1,web2') or a label match ('env=prod'). A host matches when any term does."
)


class InvalidSelectorError(ValueError):
    pass


def is_name(value: str) -> bool:
    """Host names and group names: letters, digits, '.', '_', '-', up to 64 characters."""
    return bool(_WORD_RE.match(value))


def is_label(key: str, value: str) -> bool:
    return bool(_LABEL_KEY_RE.match(key) and _LABEL_VALUE_RE.match(value))


@dataclass(frozen=True)
class Selector:
    names: frozenset[str] = frozenset()
    labels: frozenset[tuple[str, str]] = frozenset()
    everything: bool = False

    def matches(self, name: str, groups: Iterable[str], labels: Mapping[str, str]) -> bool:
        if self.everything:
            return True
        if name in self.names or not self.names.isdisjoint(groups):
            return True
        return any(labels.get(k) == v for k, v in self.labels)

    def __str__(self) -> str:
        if self.everything:
            return "all"
        return ",".join(sorted(self.names) + sorted(f"{k}={v}" for k, v in self.labels))


def parse_selector(text: str) -> Selector:
    text = text.strip()
    if text in ("", "all"):
        return Selector(everything=True)
    names: set[str] = set()
    labels: set[tuple[str, str]] = set()
    for raw in text.split(","):
        term = raw.strip()
        if "=" in term:
            key, _, value = term.partition("=")
            if not is_label(key, value):
                raise InvalidSelectorError(
                    f"invalid selector term {term!r}: want KEY=VALUE with a label key and value"
                )
            labels.add((key, value))
        elif term == "all":
            raise InvalidSelectorError("'all' cannot be combined with other terms")
        elif is_name(term):
            names.add(term)
        else:
            raise InvalidSelectorError(
                f"invalid selector term {term!r}: want a group or host name "
                "(letters, digits, '.', '_', '-') or KEY=VALUE"
            )
    return Selector(frozenset(names), frozenset(labels))
