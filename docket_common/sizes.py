"""Sizes in bytes as people write and read them: ``512Mi``, ``2G``, ``3.1 MiB``."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "512Mi", "512MiB", "2G", "1.5GB" (k, M, G, T are powers of
    1000; Ki, Mi, Gi, Ti of 1024); ValueError for anything else."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r}: want a size like 1073741824, 512Mi or 2G")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def below_reserve(free: int, reserve: int, where: object, consequence: str) -> str | None:
    """What a health check says when ``free`` bytes at ``where`` are below the ``reserve``
    (--min-free-bytes), or None."""
    if free >= reserve:
        return None
    return (
        f"{iec(free)} free in {where}, below the {iec(reserve)} reserve (--min-free-bytes): "
        f"{consequence}"
    )


def iec(n: int) -> str:
    """Bytes in binary units, to two or three significant digits: "3.1 MiB", "512 KiB"."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{n} B"
            return f"{size:.3g} {unit}" if size < 100 else f"{size:.0f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
