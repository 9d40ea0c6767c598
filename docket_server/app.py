"""Assembles and runs the server: stores, seeder, registry, gRPC services."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import faulthandler
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from docket_common.bt import split_host_port
from docket_common.config import Reloader, reload_and_apply
from docket_common.health import Health
from docket_common.logs import set_log_level
from docket_common.metrics import MetricsFace
from docket_common.oci_http import HttpFace
from docket_common.pb import (
    agent_admin_service_pb2,
    agent_admin_service_pb2_grpc,
    agent_service_pb2,
    agent_service_pb2_grpc,
    audit_service_pb2,
    audit_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    pull_service_pb2,
    pull_service_pb2_grpc,
    rollout_service_pb2,
    rollout_service_pb2_grpc,
    token_service_pb2,
    token_service_pb2_grpc,
)
from docket_common.sizes import below_reserve
from docket_common.version import VERSION
from docket_server.api.agent_service import (
    AgentAdminService,
    AgentService,
    StreamOrderSink,
    server_heartbeat,
)
from docket_server.api.audit_service import AuditService
from docket_server.api.authz import Guard
from docket_server.api.image_service import ImageService
from docket_server.api.interceptors import Gatekeeper, RpcMetrics
from docket_server.api.pull_service import PullService
from docket_server.api.registry_http import RegistryApp
from docket_server.api.rollout_service import RolloutService
from docket_server.api.token_service import TokenService
from docket_server.domain.fleet import Fleet
from docket_server.domain.orders import OrderBook, PeerSource
from docket_server.domain.pulls import Pulls
from docket_server.domain.registry import DEFAULT_GC_GRACE, Registry
from docket_server.domain.rollouts import Rollouts
from docket_server.domain.security import Audit, Identities, Tokens
from docket_server.domain.uploads import Uploads
from docket_server.metrics import ServerMetrics
from docket_server.seeder import Seeder
from docket_server.store.blobs import FilesystemBlobStore
from docket_server.store.sql import SqlMetadataStore
from docket_server.tls import ServerTls, TlsSettings

log = structlog.get_logger()

# Uploads arrive in chunks of 1 MiB; leave room for the envelope.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_SEND_BYTES = 32 * 1024 * 1024
SERVICE_NAMES = (
    image_service_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name,
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    agent_admin_service_pb2.DESCRIPTOR.services_by_name["AgentAdminService"].full_name,
    rollout_service_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name,
    pull_service_pb2.DESCRIPTOR.services_by_name["PullService"].full_name,
    token_service_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name,
    audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
)


@dataclass
class ServerConfig:
    listen: str
    data_dir: Path
    bt_listen: str
    database_url: str | None = None
    tracker_url: str | None = None
    # TLS and tokens: off only when asked (a lab). The agent port takes enrolled agents'
    # certificates (mutual TLS); the API port takes tokens.
    insecure: bool = False
    agent_listen: str = "127.0.0.1:7801"
    agent_advertise: str | None = None  # the agent port as agents reach it
    tls_names: tuple[str, ...] = ()  # more names for the generated serving certificate
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca_cert: Path | None = None
    tls_ca_key: Path | None = None
    agent_cert_lifetime: datetime.timedelta = datetime.timedelta(days=30)
    shutdown_grace_seconds: float = 10.0
    heartbeat_interval: float = 5.0
    agent_messages_per_second: int = 2500  # a fifth for heartbeats, the rest for progress
    hello_timeout: float = 10.0
    bt_advertise: str | None = None  # the seed's endpoint as agents dial it
    peer_source: PeerSource | None = None  # default: server, or both with a tracker
    max_upload_rate: int = 0  # the seed's upload limit, bytes a second
    registry_listen: str | None = None  # the registry HTTP face, HOST:PORT; None: off
    # Disk: blobs no image uses are collected every gc_interval (None: never on its own)
    # once older than gc_grace; uploads are refused before free disk falls below the reserve.
    gc_interval: datetime.timedelta | None = DEFAULT_GC_GRACE
    gc_grace: datetime.timedelta = DEFAULT_GC_GRACE
    gc_untagged: bool = True  # the periodic runs also remove untagged image manifests
    min_free_bytes: int = 0
    metrics_listen: str | None = None  # /metrics and /healthz over HTTP, HOST:PORT; None: off


TLS_REFRESH_SECONDS = 2.0


def _serving_names(config: ServerConfig) -> list[str]:
    """What a generated serving certificate names: the addresses the server listens and is
    advertised at, this host's names, loopback, and --tls-san."""
    names: list[str] = list(config.tls_names)
    for address in (
        config.listen,
        config.agent_listen,
        config.registry_listen,
        config.agent_advertise,
    ):
        if address:
            host, _ = split_host_port(address)
            if host and host not in ("0.0.0.0", "::"):
                names.append(host)
    names += [socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1", "::1"]
    return list(dict.fromkeys(n for n in names if n))


class DocketServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = FilesystemBlobStore(config.data_dir, config.min_free_bytes)
        self.metadata = SqlMetadataStore(
            config.database_url or f"sqlite+aiosqlite:///{config.data_dir / 'docket.db'}"
        )
        self.seeder = Seeder(config.bt_listen, self.blobs.local_path, config.max_upload_rate)
        self.registry = Registry(self.metadata, self.blobs, self.seeder, config.tracker_url)
        self.registry.gc_grace = config.gc_grace
        self.registry.gc_untagged = config.gc_untagged
        self._gc: asyncio.Task[None] | None = None
        heartbeats = config.agent_messages_per_second / 5
        self.fleet = Fleet(
            self.metadata,
            config.heartbeat_interval,
            server_heartbeat,
            heartbeats_per_second=heartbeats,
        )
        peer_source = config.peer_source or (
            PeerSource.BOTH if config.tracker_url else PeerSource.SERVER
        )
        self.orders = OrderBook(
            self.fleet,
            config.bt_advertise or "",
            peer_source,
            progress_reports_per_second=config.agent_messages_per_second - heartbeats,
        )
        self.orders.sink = StreamOrderSink()
        self.rollouts = Rollouts(self.registry, self.fleet, self.orders, self.metadata)
        # Blobs whose last image goes while a rollout fetches them are deleted once it is done.
        self.registry.needed_blobs = self.orders.blobs_in_flight
        self.orders.listen(lambda task: self.registry.schedule_collect())
        self.pulls = Pulls(self.registry, self.fleet, self.orders, self.metadata)
        self.uploads = Uploads(self.registry)
        self.tokens = Tokens(self.metadata)
        self.identities = Identities(self.metadata)
        self.audit = Audit(self.metadata)
        self.tls: ServerTls | None = None
        self.health = health.aio.HealthServicer()
        self.checks = Health()  # what health (gRPC, /readyz) reports, checked every 5 s
        self.checks.add("database", self._database_problem)
        self.checks.add("seed", self._seed_problem)
        self.checks.add("disk", self._disk_problem)
        self.checks.on_change(self._set_serving)
        self._server: grpc.aio.Server | None = None
        self._http: HttpFace | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.reloader: Reloader | None = None  # the --config file, re-read on SIGHUP
        self._stopping = False
        self.port = 0
        self.agent_port = 0
        self.bt_port = 0
        self.registry_port = 0
        self.metrics = ServerMetrics()
        self.metrics.watch(self)
        self._metrics_face: MetricsFace | None = None
        self.metrics_port = 0

    async def start(self) -> None:
        removed = self.blobs.clean_temporary()
        if removed:
            log.info("removed unfinished uploads", count=removed)
        await self.metadata.open()
        guard = await self._secure()
        if self.tls is not None:
            # Pieces go only to enrolled agents: SSL torrents rooted in the fleet CA.
            self.seeder.set_peer_certificate(self.tls.seed_cert_pem, self.tls.seed_key_pem)
            self.registry.ssl_cert = self.tls.ca_pem
        self.bt_port = await self.seeder.start()
        if not self.orders.seed_endpoint:
            host, _ = split_host_port(self.config.bt_listen)
            if host in ("0.0.0.0", "::", ""):
                host = socket.gethostname()
            self.orders.seed_endpoint = f"{host}:{self.bt_port}"
        seeded = await self.registry.reseed_all()
        await self.fleet.start()
        await self.rollouts.start()
        await self.pulls.start()
        await self.registry.collect_deferred()
        if self.config.gc_interval is not None:
            self._gc = asyncio.create_task(
                self.registry.collect_periodically(self.config.gc_interval), name="gc"
            )
        self.audit.start()
        server = grpc.aio.server(
            interceptors=[RpcMetrics(self.metrics), Gatekeeper(guard, self.audit)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # A first piece (ClaimFirstPieces) can be 16 MiB.
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # grpc.aio takes new calls off the core's queue one per turn of the event
                # loop: when 10,000 agents connect at once, calls wait there for many
                # seconds. By default the core cancels a call unserved for 30 s (the agent
                # sees CANCELLED) and sheds calls beyond 1000 waiting (RESOURCE_EXHAUSTED):
                # a fleet's reconnect storm is work to get through, not to refuse.
                ("grpc.server_max_unrequested_time_in_server", 600),
                ("grpc.server.max_pending_requests", 50_000),
                ("grpc.server.max_pending_requests_hard_limit", 100_000),
            ],
        )
        image_service_pb2_grpc.add_ImageServiceServicer_to_server(
            ImageService(self.registry, self.orders.blob_peers), server
        )
        agent_service = AgentService(
            self.fleet,
            self.orders,
            self.registry,
            self.config.hello_timeout,
            VERSION,
            self.pulls,
            self.identities,
            self.tokens,
            self.tls,
            self._agent_endpoint,
        )
        agent_service.on_first_pieces = self.metrics.first_piece_bytes.inc
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(agent_service, server)
        pull_service_pb2_grpc.add_PullServiceServicer_to_server(PullService(self.pulls), server)
        rollout_service_pb2_grpc.add_RolloutServiceServicer_to_server(
            RolloutService(self.rollouts), server
        )
        agent_admin_service_pb2_grpc.add_AgentAdminServiceServicer_to_server(
            AgentAdminService(self.fleet, self.identities), server
        )
        token_service_pb2_grpc.add_TokenServiceServicer_to_server(TokenService(self.tokens), server)
        audit_service_pb2_grpc.add_AuditServiceServicer_to_server(AuditService(self.audit), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        if self.tls is None:
            self.port = server.add_insecure_port(self.config.listen)
        else:
            self.port = server.add_secure_port(
                self.config.listen, self.tls.grpc_credentials(require_client_cert=False)
            )
            self.agent_port = server.add_secure_port(
                self.config.agent_listen, self.tls.grpc_credentials(require_client_cert=True)
            )
            if not self.agent_port:
                raise OSError(f"cannot listen on {self.config.agent_listen}")
        if not self.port:
            raise OSError(f"cannot listen on {self.config.listen}")
        await server.start()
        self._server = server
        if self.config.registry_listen:
            host, port = split_host_port(self.config.registry_listen)
            app = RegistryApp(
                self.registry, self.uploads, guard, self.audit, self.metrics
            ).application()
            self.checks.add_routes(app)
            http = HttpFace(
                app,
                host,
                port,
                ssl_context=self.tls.ssl_context() if self.tls is not None else None,
            )
            self.registry_port = await http.start()
            self._http = http
            self.uploads.start_sweeping()
        if self.config.metrics_listen:
            self._metrics_face = MetricsFace(
                self.metrics.registry, self.config.metrics_listen, self.checks
            )
            self.metrics_port = await self._metrics_face.start()
        if self.tls is not None:
            self._refresher = asyncio.create_task(self._refresh_tls(), name="tls-refresh")
        await self.checks.check_now()
        self.checks.start()
        log.info(
            "docket-server ready",
            listen=self.config.listen,
            port=self.port,
            agent_port=self.agent_port or None,
            tls=self.tls is not None,
            bt_port=self.bt_port,
            registry_port=self.registry_port or None,
            metrics_port=self.metrics_port or None,
            data_dir=str(self.config.data_dir),
            blobs_seeded=seeded,
        )

    async def _database_problem(self) -> str | None:
        try:
            await self.metadata.ping()
        except (sa.exc.SQLAlchemyError, OSError) as e:
            return f"the database does not answer: {e.__class__.__name__}: {e}"
        return None

    async def _seed_problem(self) -> str | None:
        return self.seeder.problem()

    async def _disk_problem(self) -> str | None:
        free = await asyncio.to_thread(self.blobs.free_bytes)
        return below_reserve(
            free, self.blobs.min_free_bytes, self.config.data_dir, "uploads are refused"
        )

    async def _set_serving(self, ready: bool) -> None:
        """The gRPC health of the server and each service: SERVING while every check
        passes (the services share the server's state: one database, one seed)."""
        if self._stopping:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", *SERVICE_NAMES):
            await self.health.set(service, status)

    async def _secure(self) -> Guard:
        """TLS and tokens (or, asked for, neither): the CA and serving certificate, the first
        admin token, the enrolled agents."""
        c = self.config
        if c.insecure:
            log.warning(
                "INSECURE: TLS and authentication are off (--insecure): anyone who can reach "
                "this server may push, delete and roll out images, and join the fleet as any "
                "agent. Use it only in a lab."
            )
            return Guard(None, None)
        await self.tokens.load()
        await self.identities.load()
        token_path = c.data_dir / "admin.token"
        if await self.tokens.bootstrap(token_path):
            log.warning(
                "made the first admin token: keep it safe, make others with `docketctl tokens "
                "create`",
                file=str(token_path),
            )
        self.tls = ServerTls(
            TlsSettings(
                data_dir=c.data_dir,
                names=_serving_names(c),
                cert_file=c.tls_cert,
                key_file=c.tls_key,
                ca_cert_file=c.tls_ca_cert,
                ca_key_file=c.tls_ca_key,
                agent_cert_lifetime=c.agent_cert_lifetime,
            )
        )
        log.info(
            "TLS on",
            ca=str(self.tls.ca_path),
            ca_hash=self.tls.ca_fingerprint,
            agent_listen=c.agent_listen,
        )
        return Guard(self.tokens, self.identities)

    def _agent_endpoint(self) -> str:
        """The agent port as agents reach it; ":PORT" means the host they enrolled at."""
        if self.config.agent_advertise:
            return self.config.agent_advertise
        return f":{self.agent_port}"

    async def _refresh_tls(self) -> None:
        """Looks at the registry face's certificate files every few seconds (gRPC looks at
        each handshake)."""
        assert self.tls is not None
        while True:
            await asyncio.sleep(TLS_REFRESH_SECONDS)
            try:
                self.tls.refresh()
            except Exception:
                log.exception("cannot reload the TLS certificate")

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        self._stopping = True
        try:
            await self.checks.stop()
            if self._gc is not None:
                self._gc.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._gc
                self._gc = None
            if self._server is not None:
                await self.health.enter_graceful_shutdown()
                # Stop taking calls, then end the agents' streams (which never end by
                # themselves) so that they reconnect elsewhere or later instead of holding the
                # grace period.
                grace = self.config.shutdown_grace_seconds
                stopping = asyncio.create_task(self._server.stop(grace))
                await asyncio.sleep(0)
                await self.fleet.stop()
                await self.rollouts.stop()
                await self.pulls.stop()
                if self._http is not None:
                    await self._http.stop(self.config.shutdown_grace_seconds)
                    self._http = None
                await stopping
                self._server = None
            if self._metrics_face is not None:
                await self._metrics_face.stop()
                self._metrics_face = None
            await self.uploads.close()
            await self.audit.stop()
        finally:
            # Whatever failed above, libtorrent's session ends here: left to the interpreter's
            # exit, its threads abort the process (SIGABRT) instead of a clear error.
            self.seeder.close()
            await self.metadata.close()
        log.info("docket-server stopped")

    async def reload(self) -> None:
        """SIGHUP: re-reads the tokens, and the --config file. The log level and the seed's
        upload rate change live; anything else the file changed is logged as needing a
        restart. A file that cannot be read or is wrong changes nothing."""
        if not self.config.insecure:
            try:
                await self.tokens.load()
            except Exception:
                log.exception("tokens not reloaded: the database did not answer")
            else:
                log.info("tokens reloaded")
        reload_and_apply(self.reloader, self._apply_live, "docket-server")

    def _apply_live(self, changed: dict[str, Any]) -> list[str]:
        """The settings a reload may change while the server runs: the log level and the
        seed's upload rate (taken out of ``changed``; their names)."""
        applied = []
        if "log_level" in changed:
            set_log_level(changed.pop("log_level"))
            applied.append("log_level")
        if "max_upload_rate" in changed:
            self.seeder.set_rate_limits(upload=changed.pop("max_upload_rate"))
            self.config.max_upload_rate = self.seeder.upload_rate_limit
            applied.append("max_upload_rate")
        return applied

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task[None]] = set()

        def hang_up() -> None:
            task = asyncio.create_task(self.reload(), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, hang_up)
        await self.start()
        try:
            await stop.wait()
            log.info("shutting down: finishing calls in flight")
            # A watchdog: should shutdown ever hang, print every thread's stack and exit.
            faulthandler.dump_traceback_later(self.config.shutdown_grace_seconds + 5, exit=True)
        finally:
            await self.stop()
            faulthandler.cancel_dump_traceback_later()
