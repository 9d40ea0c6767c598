"""Timestamps as images write them: RFC 3339, often with Go's nanoseconds."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?\s*([Zz]|[+-]\d{2}:?\d{2})?"
)


def parse_rfc3339(value: Any) -> datetime | None:
    """An RFC 3339 timestamp (nanoseconds allowed) as an aware UTC datetime, or None."""
    if not isinstance(value, str):
        return None
    m = _RFC3339_RE.fullmatch(value.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(m[i]) for i in range(1, 7))
    micros = int((m[7] or "")[:6].ljust(6, "0"))
    zone = m[8]
    try:
        tz = UTC
        if zone and zone not in ("Z", "z"):
            sign = -1 if zone[0] == "-" else 1
            digits = zone[1:].replace(":", "")
            tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
        # A leap second (":60") becomes ":59".
        stamp = datetime(year, month, day, hour, minute, min(second, 59), micros, tzinfo=tz)
        return stamp.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
