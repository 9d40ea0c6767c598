"""What the server's and the agents' metrics share: the HTTP listener that serves /metrics
(Prometheus text exposition), /healthz and /readyz, the build info, and libtorrent session
totals.

Each process owns one ``CollectorRegistry`` (never the global default: tests run several
servers in one process). Facts that are cheap to read when scraped (states, sizes, counts kept
by the domain as plain ints) are read then by custom collectors; events are counters and
histograms updated where they happen.
"""

from __future__ import annotations

import warnings
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.exposition import generate_latest

from docket_common.health import Health
from docket_common.hostport import split_host_port
from docket_common.oci_http import HttpFace
from docket_common.version import VERSION

# The text format every Prometheus 2.x reads (newer prometheus_client versions call their
# default 1.0.0; with our names, the bytes are the same).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def new_registry() -> CollectorRegistry:
    """A registry of this process's own, with ``docket_build_info{version}`` in it."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
    registry = CollectorRegistry(auto_describe=True)
    info = Gauge(
        "docket_build_info",
        "Always 1; the version of Docket this process runs.",
        ["version"],
        registry=registry,
    )
    info.labels(version=VERSION).set(1)
    return registry


class MetricsFace:
    """/metrics, and the process's /healthz and /readyz (docket_common/health.py), over HTTP
    on HOST:PORT, in the caller's event loop.

    Scrapes run on the loop: the collectors read state the loop owns, and each is a cheap
    read (no I/O beyond a directory listing of the agent's cache)."""

    def __init__(self, registry: CollectorRegistry, listen: str, health: Health) -> None:
        self.registry = registry
        host, port = split_host_port(listen)
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        health.add_routes(app)
        self._face = HttpFace(app, host, port)

    @property
    def port(self) -> int:
        return self._face.port

    async def start(self) -> int:
        """Listens; the port it got (the one asked for, or a free one for port 0)."""
        return await self._face.start()

    async def stop(self, grace: float = 2.0) -> None:
        await self._face.stop(grace)

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def payload_uploaded(session: Any) -> int:
    """Payload bytes a libtorrent session has sent to peers since it started (every torrent,
    removed ones included)."""
    # session.status() is deprecated in favour of session-stats alerts, which arrive late
    # and on the alert thread; its totals are still kept and are what a scrape wants.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return int(session.status().total_payload_upload)
