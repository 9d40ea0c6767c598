"""The agent: its BitTorrent session, what it says about its host, and its stream."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from docket_agent.hostinfo import (
    cached_digests,
    disk_free,
    load_agent_id,
    lock_data_dir,
    probe_docker,
)
from docket_agent.stream import StreamClient
from docket_common.bt import TorrentSession, split_host_port
from docket_common.pb import agent_pb2
from docket_common.version import VERSION

log = structlog.get_logger()


@dataclass
class AgentConfig:
    server: str
    data_dir: Path
    name: str
    groups: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    bt_listen: str = "0.0.0.0:6881"
    advertise_host: str | None = None
    docker: bool = True
    token: str | None = None


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
        self.blob_dir = config.data_dir / "blobs" / "sha256"
        self.torrents = TorrentSession(config.bt_listen, user_agent=f"docket-agent/{VERSION}")
        self.agent_id = ""
        self.bt_endpoint = ""
        self.stream: StreamClient | None = None

    async def run(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        lock_data_dir(cfg.data_dir)
        self.agent_id = await asyncio.to_thread(load_agent_id, cfg.data_dir)
        port = await self.torrents.start()
        listen_host, _ = split_host_port(cfg.bt_listen)
        host = cfg.advertise_host or (
            listen_host
            if listen_host not in ("0.0.0.0", "::", "")
            else outbound_address(cfg.server)
        )
        self.bt_endpoint = f"{host}:{port}"
        structlog.contextvars.bind_contextvars(agent=cfg.name)
        log.info(
            "agent starting", server=cfg.server, bt_endpoint=self.bt_endpoint, id=self.agent_id
        )
        self.stream = StreamClient(
            cfg.server,
            self._hello,
            lambda: disk_free(cfg.data_dir),
            token=cfg.token,
        )
        try:
            await self.stream.run()
        finally:
            self.torrents.close()

    async def _hello(self) -> agent_pb2.Hello:
        """Made afresh for every connection: the engine or the cache may have changed."""
        cfg = self.config
        docker = await asyncio.to_thread(probe_docker, cfg.docker)
        if docker.error:
            log.warning("no Docker engine: images will stop at downloaded", why=docker.error)
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
            cached_digests=await asyncio.to_thread(cached_digests, self.blob_dir),
        )
