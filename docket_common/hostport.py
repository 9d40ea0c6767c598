"""HOST:PORT strings (kept apart from docket_common.bt so that the CLI need not import
libtorrent to parse one)."""

from __future__ import annotations


def split_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Parses "host:port" (or "[v6]:port"); raises ValueError with a readable message."""
    host, sep, port = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{value!r} is not HOST:PORT")
        host, port = value, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host, int(port)
