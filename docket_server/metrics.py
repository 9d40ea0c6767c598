"""The server's metrics, declared in one place (Prometheus naming: base units, ``_total``,
``_seconds``, ``_bytes``; labels of bounded cardinality only, never a digest or an order id).

Events (calls, requests, uploads, first pieces handed out, rollouts ending) are counters and
histograms updated where they happen; states and sizes (agents, blobs, rollouts running and
their hosts, the seed's bytes sent) are read from the domain when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from docket_common.metrics import new_registry, payload_uploaded
from docket_server.domain.orders import TaskState

if TYPE_CHECKING:
    from docket_server.app import DocketServer
    from docket_server.domain.rollouts import Rollout

# Unary calls: a millisecond to a minute (UploadBlob, a client stream, can take that long).
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
HTTP_BUCKETS = RPC_BUCKETS
# Rollouts: seconds to hours.
ROLLOUT_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


class ServerMetrics:
    """Every metric of one server process, in its own registry."""

    def __init__(self) -> None:
        self.registry: CollectorRegistry = new_registry()
        r = self.registry
        rpc = ["grpc_type", "grpc_service", "grpc_method"]
        self.rpc_started = Counter(
            "grpc_server_started", "RPCs started on the server.", rpc, registry=r
        )
        self.rpc_handled = Counter(
            "grpc_server_handled",
            "RPCs ended on the server, by status code (streams count when they end).",
            [*rpc, "grpc_code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "How long unary and client-streaming RPCs took (server and bidi streams, which "
            "last as long as their client watches, are left out).",
            rpc,
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            "docket_registry_http_requests",
            "Requests to the registry HTTP face, by route template, method and status code.",
            ["route", "method", "code"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "docket_registry_http_request_duration_seconds",
            "How long registry HTTP requests took, body sent or received included.",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.uploads = Counter(
            "docket_server_uploads",
            "Blob uploads ended (gRPC and HTTP): stored, existed (already stored) or refused.",
            ["result"],
            registry=r,
        )
        self.upload_bytes = Counter(
            "docket_server_upload_bytes",
            "Bytes received in blob uploads, by how the upload ended.",
            ["result"],
            registry=r,
        )
        self.first_piece_bytes = Counter(
            "docket_server_first_piece_sent_bytes",
            "Bytes of first pieces the server handed to agents (ClaimFirstPieces).",
            registry=r,
        )
        self.rollouts_ended = Counter(
            "docket_server_rollouts_ended",
            "Rollouts ended, by final state.",
            ["state"],
            registry=r,
        )
        self.rollout_seconds = Histogram(
            "docket_server_rollout_duration_seconds",
            "How long rollouts took from creation to their end, by final state.",
            ["state"],
            buckets=ROLLOUT_BUCKETS,
            registry=r,
        )
        for result in ("stored", "existed", "refused"):
            self.uploads.labels(result=result)
            self.upload_bytes.labels(result=result)

    def upload_ended(self, result: str, size: int) -> None:
        self.uploads.labels(result=result).inc()
        self.upload_bytes.labels(result=result).inc(size)

    def rollout_ended(self, rollout: Rollout) -> None:
        state = str(rollout.state)
        self.rollouts_ended.labels(state=state).inc()
        if rollout.end_time is not None:
            seconds = (rollout.end_time - rollout.create_time).total_seconds()
            self.rollout_seconds.labels(state=state).observe(max(seconds, 0.0))

    def watch(self, server: DocketServer) -> None:
        """Reads the server's states at every scrape, and hears of its domain's events."""
        self.registry.register(ServerCollector(server))
        server.registry.on_upload = self.upload_ended
        server.rollouts.on_end = self.rollout_ended


class ServerCollector(Collector):
    """What the server knows at the moment of a scrape; each a read of memory."""

    def __init__(self, server: DocketServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        agents = GaugeMetricFamily(
            "docket_server_agents", "Known agents by state.", labels=["state"]
        )
        for state, count in s.fleet.count_by_state().items():
            agents.add_metric([str(state)], count)
        yield agents
        yield GaugeMetricFamily(
            "docket_server_blobs",
            "Blobs in the blob store (each seeded; the empty blob is not counted).",
            value=s.seeder.stored_blobs,
        )
        yield GaugeMetricFamily(
            "docket_server_blob_bytes", "Bytes in the blob store.", value=s.seeder.stored_bytes
        )
        sent = CounterMetricFamily(
            "docket_server_seed_sent_bytes",
            "Payload bytes the server's BitTorrent seed sent to agents since it started.",
        )
        try:
            sent.add_metric([], payload_uploaded(s.seeder.session))
        except RuntimeError:  # not started yet, or closed
            pass
        else:
            yield sent
        yield GaugeMetricFamily(
            "docket_server_rollouts_running",
            "Rollouts running now (those ended: docket_server_rollouts_ended_total).",
            value=s.rollouts.running(),
        )
        hosts = GaugeMetricFamily(
            "docket_server_rollout_hosts",
            "Hosts of the running rollouts by state.",
            labels=["state"],
        )
        counts = s.rollouts.host_states()
        for task_state in TaskState:
            hosts.add_metric([str(task_state)], counts.get(task_state, 0))
        yield hosts

    def describe(self) -> Iterator[Metric]:
        return iter(())
