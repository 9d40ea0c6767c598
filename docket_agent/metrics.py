"""The agent's metrics, declared in one place (Prometheus naming: base units, ``_total``,
``_seconds``, ``_bytes``; no digests or order ids as labels).

The agent's parts keep their own counts as plain ints where they happen (bytes by source in
the order manager, evictions in the cache, failed pieces in the fetcher, reconnects in the
stream); a collector reads them, and the states of the moment, when Prometheus scrapes.
Bytes by source are the numbers the orders report, so they add up to what a rollout says.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from docket_agent.orders import SOURCES
from docket_common.metrics import new_registry, payload_uploaded

if TYPE_CHECKING:
    from docket_agent.agent import Agent

# docker load of an image, from its last blob in the cache: a tenth of a second to minutes.
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class AgentMetrics:
    """Every metric of one agent process, in its own registry."""

    def __init__(self) -> None:
        self.registry: CollectorRegistry = new_registry()
        self.load_seconds = Histogram(
            "docket_agent_load_duration_seconds",
            "How long loading an image into the engine took once its blobs were in the cache "
            "(with loads that start while the layers arrive, the part left after them).",
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )

    def watch(self, agent: Agent) -> None:
        """Reads the agent's counts and states at every scrape; times its loads."""
        self.registry.register(AgentCollector(agent))
        if agent.orders is not None:
            agent.orders.observe_load = self.load_seconds.observe


class AgentCollector(Collector):
    """What the agent knows at the moment of a scrape."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        received = CounterMetricFamily(
            "docket_agent_received_bytes",
            "Bytes of the blobs orders fetched, by source: peers (other hosts), seed (the "
            "server's BitTorrent seed), first_pieces (handed out by the server), fallback "
            "(gRPC reads), cache (held already).",
            labels=["source"],
        )
        counts = a.orders.received if a.orders is not None else dict.fromkeys(SOURCES, 0)
        for source in SOURCES:
            received.add_metric([source], counts[source])
        yield received
        try:
            sent = payload_uploaded(a.fetcher.session)
        except RuntimeError:  # the session is not started yet, or closed
            pass
        else:
            yield CounterMetricFamily(
                "docket_agent_sent_bytes",
                "Payload bytes sent to peers over BitTorrent since the agent started.",
                value=sent,
            )
        yield CounterMetricFamily(
            "docket_agent_hash_failed_pieces",
            "Pieces received from peers that failed their hash (and were fetched again).",
            value=a.fetcher.hash_failed_pieces,
        )
        disconnects = CounterMetricFamily(
            "docket_agent_peer_disconnects",
            "BitTorrent connections to peers that ended, by libtorrent's reason (torrent "
            "finished, upload to upload connection, duplicate peer-id, end of file, "
            "connection reset by peer, ...).",
            labels=["reason"],
        )
        for reason, count in sorted(a.fetcher.peer_disconnects.items()):
            disconnects.add_metric([reason], count)
        yield disconnects
        yield GaugeMetricFamily(
            "docket_agent_downloads_in_flight",
            "Blobs being fetched now.",
            value=a.fetcher.downloads_in_flight,
        )
        yield GaugeMetricFamily(
            "docket_agent_cache_bytes",
            "Bytes of the blobs in the cache.",
            value=sum(b.size for b in a.cache.blobs()),
        )
        yield GaugeMetricFamily(
            "docket_agent_cache_limit_bytes",
            "The most bytes the cache may hold (--cache-max-bytes); 0: no limit.",
            value=a.cache.max_bytes,
        )
        yield CounterMetricFamily(
            "docket_agent_cache_evictions",
            "Blobs evicted from the cache to make room.",
            value=a.cache.evictions,
        )
        yield CounterMetricFamily(
            "docket_agent_stream_reconnects",
            "Times the stream to the server ended and the agent connected again.",
            value=a.stream.reconnects if a.stream is not None else 0,
        )
        if a.engine_checked:
            yield GaugeMetricFamily(
                "docket_agent_engine_up",
                "1 when the Docker engine answered when last asked (at each connection to the "
                "server), else 0 (none, or --no-docker).",
                value=0 if a.settings.docker_error else 1,
            )

    def describe(self) -> Iterator[Metric]:
        return iter(())
