"""The agent: its blob cache and BitTorrent session, its stream, and the orders it runs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import structlog

from docket_agent.cache import BlobCache
from docket_agent.hostinfo import disk_free, load_agent_id, lock_data_dir, probe_docker
from docket_agent.identity import (
    RENEW_RETRY_SECONDS,
    Credentials,
    Identity,
    ServerChannel,
    TrustSettings,
    secure_channel,
)
from docket_agent.metrics import AgentMetrics
from docket_agent.orders import OrderManager, OrderSettings
from docket_agent.registry_face import AgentRegistry, ManifestCache
from docket_agent.stream import CHANNEL_OPTIONS, StreamClient, agent_channel
from docket_common.bt import split_host_port
from docket_common.fetch import BlobFetcher
from docket_common.health import Health
from docket_common.loadable import (
    LoadableImage,
    LoadError,
    PendingBlob,
    PullCancel,
    load_from_env,
    pull_from_env,
)
from docket_common.logs import set_log_level
from docket_common.manifest import Platform, this_platform
from docket_common.metrics import MetricsFace
from docket_common.oci_http import HttpFace
from docket_common.pb import agent_pb2, agent_service_pb2_grpc, image_service_pb2_grpc
from docket_common.readblob import grpc_claim_first_pieces, grpc_read_range
from docket_common.sizes import below_reserve
from docket_common.version import VERSION

log = structlog.get_logger()

# Below this many bytes (an image's blobs in all), --load-via auto has the engine pull from
# the registry face rather than load an archive. dockerd's CPU per fresh single-layer image
# on Debian's 20.10 (README, Performance): 1 MiB 0.07 s by pull against 0.125 s by import,
# 4 MiB 0.115 against 0.135, 16 MiB 0.30 against 0.265. A load re-executes two helpers
# from dockerd's binary (docker-untar, docker-applyLayer), a pull one; past a few MiB the
# pull's own hashing of every layer costs more than the helper saves.
PULL_BELOW = 8 << 20


@dataclass
class AgentConfig:
    server: str
    data_dir: Path
    name: str
    groups: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    bt_listen: str = "0.0.0.0:6881"
    registry_listen: str | None = None  # the registry face, HOST:PORT; None: off
    advertise_host: str | None = None
    docker: bool = True
    insecure: bool = False  # plaintext, no enrollment: a server running with --insecure
    join_token: str | None = None
    ca_file: Path | None = None
    ca_hash: str | None = None
    cache_max_bytes: int = 0
    min_free_bytes: int = 0  # free disk the cache keeps on its filesystem
    fallback_after: float = 30.0
    max_download_rate: int = 0
    max_upload_rate: int = 0
    load_while_downloading: bool = True
    # "import": `docker load` of an archive made from the blobs, its base layer by `docker
    # import` beside it (loadable.load_importing_base); "archive": the archive alone;
    # "registry": the engine pulls from this agent's registry face (which must be on);
    # "auto": "registry" for images under pull_below bytes, when the engine can reach the
    # face on loopback and no layer is zstd, else "import".
    load_via: str = "auto"
    pull_below: int = PULL_BELOW
    piece_order: str = "sequential"  # which pieces libtorrent asks peers for first
    platform: Platform | None = None  # None: the engine's, or this machine's
    metrics_listen: str | None = None  # /metrics and /healthz over HTTP, HOST:PORT; None: off


def pull_source(
    order: agent_pb2.PullOrder,
    load_via: str,
    pull_below: int,
    registry_listen: str | None,
    registry_port: int,
) -> str | None:
    """What the engine pulls ``order``'s image from ("127.0.0.1:5001/repo@sha256:…"), or
    None to load it by an archive instead (see AgentConfig.load_via). ``registry_port``: the
    face's port once it listens (0: off)."""
    if load_via not in ("registry", "auto") or not registry_port or not registry_listen:
        return None
    host, _ = split_host_port(registry_listen)
    if host in ("", "0.0.0.0", "localhost") or host.startswith("127."):
        host = "127.0.0.1"
    elif host in ("::", "::1"):
        host = "[::1]"
    elif load_via == "auto":  # plain HTTP past loopback: the engine would refuse it
        return None
    elif ":" in host:
        host = f"[{host}]"
    if load_via == "auto":
        size = order.config.size_bytes + sum(b.size_bytes for b in order.layers)
        if size >= pull_below or any("zstd" in b.media_type for b in order.layers):
            return None  # large; or zstd, which engines before Docker 23 cannot pull
    repository = order.image_name.rsplit("@", 1)[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    return f"{host}:{registry_port}/{repository}@{order.image_digest}"


def outbound_address(server: str) -> str:
    """The local address this host uses to reach the server: what its peers can reach too."""
    host, port = split_host_port(server)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))  # UDP: picks a route, sends nothing
            return str(s.getsockname()[0])
        except OSError:
            return socket.gethostname()


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        # Set once an engine's pull from the registry face failed without the engine asking
        # the face for anything: --load-via auto imports from then on.
        self.engine_misses_face = False
        self.cache = BlobCache(
            config.data_dir, config.cache_max_bytes, config.min_free_bytes, config.name
        )
        self.fetcher = BlobFetcher(
            config.bt_listen,
            config.data_dir,
            user_agent=f"docket-agent/{VERSION}",
            download_rate_limit=config.max_download_rate,
            upload_rate_limit=config.max_upload_rate,
            piece_order=config.piece_order,
        )
        self.settings = OrderSettings(
            fallback_after=config.fallback_after,
            claim_first_pieces=not config.max_download_rate,
            overlap_load=config.load_while_downloading,
        )
        self.agent_id = ""
        self.bt_endpoint = ""
        self.registry_port = 0
        self.registry: AgentRegistry | None = None
        self.stream: StreamClient | None = None
        self.orders: OrderManager | None = None
        self.identity: Identity | None = None
        self.credentials: Credentials | None = None
        self.metrics = AgentMetrics()
        self.metrics_port = 0
        self.engine_checked = False  # whether the Docker engine was asked yet (metrics)
        # /readyz on the registry face: connected to the server, BitTorrent up, the engine
        # answering (unless --no-docker).
        self.checks = Health()
        self.checks.add("server", self._server_problem)
        self.checks.add("bittorrent", self._bittorrent_problem)
        self.checks.add("disk", self._disk_problem)
        if config.docker:
            self.checks.add("docker", self._docker_problem)

    def apply_live(self, changed: dict[str, Any]) -> list[str]:
        """Applies the settings that can change while the agent runs (SIGHUP); returns the
        names it applied and leaves the others in ``changed``."""
        applied = []
        if "log_level" in changed:
            set_log_level(changed.pop("log_level"))
            applied.append("log_level")
        download = changed.pop("max_download_rate", None)
        upload = changed.pop("max_upload_rate", None)
        if download is not None or upload is not None:
            self.fetcher.set_rate_limits(download=download, upload=upload)
            self.config.max_download_rate = self.fetcher.download_rate_limit
            self.config.max_upload_rate = self.fetcher.upload_rate_limit
            # gRPC's first pieces would bypass libtorrent's limiter.
            self.settings.claim_first_pieces = not self.config.max_download_rate
            applied += [
                n
                for n, v in (("max_download_rate", download), ("max_upload_rate", upload))
                if v is not None
            ]
        return applied

    async def run(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        lock_data_dir(cfg.data_dir)
        self.agent_id = await asyncio.to_thread(load_agent_id, cfg.data_dir)
        channels = await self._join()
        port = await self.fetcher.start()
        listen_host, _ = split_host_port(cfg.bt_listen)
        host = cfg.advertise_host or (
            listen_host
            if listen_host not in ("0.0.0.0", "::", "")
            else outbound_address(cfg.server)
        )
        self.bt_endpoint = f"{host}:{port}"
        structlog.contextvars.bind_contextvars(agent=cfg.name)
        self.channels = channels
        images = channels.stub(image_service_pb2_grpc.ImageServiceStub)
        agent_stub = channels.stub(agent_service_pb2_grpc.AgentServiceStub)
        read_range = grpc_read_range(images)
        claim = grpc_claim_first_pieces(agent_stub)

        self.stream = StreamClient(
            cfg.server,
            self._hello,
            lambda: disk_free(cfg.data_dir),
            channels,
            on_message=lambda m: self.orders.handle(m) if self.orders else None,
            on_connected=lambda: self.orders.resend() if self.orders else None,
        )
        self.orders = OrderManager(
            cfg.data_dir / "orders",
            self.cache,
            self.fetcher,
            self.stream.send,
            read_range,
            claim,
            self._load,
            self.settings,
        )
        seeded = self.orders.seed_cache()
        face: HttpFace | None = None
        if cfg.registry_listen:
            registry = self.registry = AgentRegistry(
                cfg.name,
                images,
                agent_stub,
                self.orders,
                self.fetcher,
                self.cache,
                ManifestCache(cfg.data_dir / "manifests"),
            )
            host, registry_port = split_host_port(cfg.registry_listen)
            app = registry.application()
            self.checks.add_routes(app)
            face = HttpFace(app, host, registry_port)
            self.registry_port = await face.start()
        self.metrics.watch(self)
        metrics_face: MetricsFace | None = None
        if cfg.metrics_listen:
            metrics_face = MetricsFace(self.metrics.registry, cfg.metrics_listen, self.checks)
            self.metrics_port = await metrics_face.start()
        log.info(
            "agent starting",
            server=cfg.server,
            bt_endpoint=self.bt_endpoint,
            registry_port=self.registry_port or None,
            metrics_port=self.metrics_port or None,
            id=self.agent_id,
            cached_blobs_seeded=seeded,
        )
        renewer = (
            asyncio.create_task(self._renew_forever(), name="certificate-renewal")
            if self.credentials is not None
            else None
        )
        self.checks.start()  # the first round once the stream has had time to connect
        try:
            await self.stream.run()
        finally:
            await self.checks.stop()
            if renewer is not None:
                renewer.cancel()
            if face is not None:
                await face.stop(5)
            if metrics_face is not None:
                await metrics_face.stop()
            await self.orders.close()
            self.fetcher.close()
            await channels.close()

    async def _server_problem(self) -> str | None:
        if self.stream is None or not self.stream.connected:
            return f"not connected to the server at {self.config.server}"
        return None

    async def _bittorrent_problem(self) -> str | None:
        return self.fetcher.problem()

    async def _disk_problem(self) -> str | None:
        free = await asyncio.to_thread(self.cache.free_bytes)
        return below_reserve(
            free, self.cache.min_free_bytes, self.config.data_dir, "downloads fail"
        )

    async def _docker_problem(self) -> str | None:
        return (await asyncio.to_thread(probe_docker, True)).error or None

    async def _join(self) -> ServerChannel:
        """The channel to the server: plaintext with --insecure; else mutual TLS on the
        agent port with this agent's certificate, enrolling first if it has none."""
        cfg = self.config
        if cfg.insecure:
            log.warning("INSECURE: plaintext to the server, no certificate (--insecure)")
            return ServerChannel(lambda: agent_channel(cfg.server))
        self.identity = Identity(
            cfg.data_dir,
            TrustSettings(cfg.server, cfg.name, cfg.join_token, cfg.ca_file, cfg.ca_hash),
        )
        credentials = await asyncio.to_thread(self.identity.load)
        if credentials is None:
            credentials = await self.identity.enroll()
        self.credentials = credentials
        self.fetcher.set_peer_certificate(credentials.cert_pem, credentials.key_pem)
        return ServerChannel(lambda: secure_channel(self._current_credentials(), CHANNEL_OPTIONS))

    def _current_credentials(self) -> Credentials:
        assert self.credentials is not None
        return self.credentials

    async def _renew_forever(self) -> None:
        """Renews the certificate two thirds of the way through its life, and retries every
        30 s while the server does not answer."""
        assert self.identity is not None
        while True:
            current = self._current_credentials()
            wait = (current.renew_time - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(wait, 0))
            try:
                renewed = await self.identity.renew(self.channels.channel, current)
            except grpc.aio.AioRpcError as e:
                log.warning(
                    "cannot renew the certificate yet",
                    error=f"{e.code().name}: {e.details()}",
                    retry_in_s=RENEW_RETRY_SECONDS,
                )
                await asyncio.sleep(RENEW_RETRY_SECONDS)
                continue
            self.credentials = renewed
            self.fetcher.set_peer_certificate(renewed.cert_pem, renewed.key_pem)
            self.channels.replace()

    async def _load(
        self, order: agent_pb2.PullOrder, paths: list[Path], pending: dict[str, PendingBlob]
    ) -> str:
        image = LoadableImage(
            name=order.image_name,
            config_path=paths[0],
            config_digest=order.config.digest,
            layer_paths=tuple(paths[1:]),
            layer_digests=tuple(layer.digest for layer in order.layers),
            pending=pending,
        )

        cfg = self.config
        source = pull_source(
            order, cfg.load_via, cfg.pull_below, cfg.registry_listen, self.registry_port
        )
        if source is not None and cfg.load_via == "auto" and self.engine_misses_face:
            source = None
        if source is None:
            return await asyncio.to_thread(
                load_from_env, image, import_base=self.config.load_via != "archive"
            )
        # The engine pulls from this agent's registry face, which streams each blob as its
        # pieces pass the sha256, from the order's own downloads (serve_order).
        assert self.registry is not None
        assert self.orders is not None
        runner = self.orders.runners.get(order.order_id)
        served = (
            self.registry.serve_order(
                runner, order.image_digest, [order.config.digest, *image.layer_digests]
            )
            if runner is not None
            else None
        )
        release = served.release if served is not None else lambda: None
        loop = asyncio.get_running_loop()
        cancel = PullCancel()

        def pull() -> str:
            try:
                return pull_from_env(source, order.image_name, order.config.digest, cancel)
            finally:  # the engine's pull is over (the order may have ended before it)
                log.info("the engine's pull from the registry face ended", source=source)
                with contextlib.suppress(RuntimeError):  # the loop closed: nothing to free
                    loop.call_soon_threadsafe(release)

        log.info("loading by the engine's pull from the registry face", source=source)
        try:
            return await asyncio.to_thread(pull)
        except asyncio.CancelledError:  # the order failed or was cancelled: so is the pull
            cancel.cancel()
            raise
        except LoadError as e:
            if cfg.load_via != "auto" or served is None or served.asked:
                raise
            # The engine asked the face for nothing: it cannot reach this host's loopback
            # (it runs in a network namespace of its own, or on another host). Under auto
            # this order and the ones after it are loaded by import instead.
            self.engine_misses_face = True
            log.warning(
                "the Docker engine cannot reach the registry face: loading by import, "
                "now and from now on",
                source=source,
                error=str(e),
            )
            return await asyncio.to_thread(load_from_env, image, import_base=True)

    async def _hello(self) -> agent_pb2.Hello:
        """Made afresh for every connection: the engine or the cache may have changed."""
        cfg = self.config
        docker = await asyncio.to_thread(probe_docker, cfg.docker)
        self.settings.docker_error = docker.error
        self.engine_checked = True
        if docker.error:
            log.warning("no Docker engine: images will stop at downloaded", why=docker.error)
        blobs = await asyncio.to_thread(self.cache.blobs)
        return agent_pb2.Hello(
            name=cfg.name,
            agent_id=self.agent_id,
            groups=list(cfg.groups),
            labels=cfg.labels,
            version=VERSION,
            bt_endpoint=self.bt_endpoint,
            docker_version=docker.version,
            docker_error=docker.error,
            disk_free_bytes=await asyncio.to_thread(disk_free, cfg.data_dir),
            cached_digests=sorted(b.digest for b in blobs),
            platform=str(cfg.platform or docker.platform or this_platform()),
            follows_heartbeat_interval=True,
        )
