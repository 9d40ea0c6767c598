"""libtorrent settings shared by the server's seeder and the agents.

What was measured on these machines (DESIGN.md): uTP is slow here, so TCP only; no DHT, LSD,
UPnP or NAT-PMP (peers come from the server or a tracker); every torrent is private.
"""

from __future__ import annotations

from typing import Any

import libtorrent as lt

ALERT_MASK = (
    lt.alert.category_t.error_notification
    | lt.alert.category_t.status_notification
    | lt.alert.category_t.storage_notification
)


def session_settings(listen: str, *, user_agent: str) -> dict[str, Any]:
    """Settings for a Docket libtorrent session listening on ``listen`` ("host:port")."""
    return {
        "listen_interfaces": listen,
        "user_agent": user_agent,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "enable_outgoing_tcp": True,
        "enable_incoming_tcp": True,
        # Every blob is its own torrent and all of them must stay active: no queueing.
        "active_downloads": -1,
        "active_seeds": -1,
        "active_limit": -1,
        "active_checking": 4,
        "connections_limit": 2000,
        # Hosts of one fleet share addresses (NAT, one machine in tests): let them all in.
        "allow_multiple_connections_per_ip": True,
        "alert_mask": ALERT_MASK,
    }


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
