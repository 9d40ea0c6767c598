"""The docket-server command."""

from __future__ import annotations

import asyncio
import datetime
import resource
import sys
from pathlib import Path

import click
import structlog

from docket_common.bt import TorrentSessionError
from docket_common.cli import (
    duration,
    duration_or_off,
    duration_or_zero,
    host_port,
    host_port_or_off,
    logging_options,
    size,
    xdg_dir,
)
from docket_common.config import Reloader, config_options, print_config_requested
from docket_common.logs import configure_logging
from docket_common.pki import CertificateError
from docket_server.app import DocketServer, ServerConfig
from docket_server.domain.orders import PeerSource


def raise_open_files_limit() -> tuple[int, int]:
    """Raises the soft open-files limit to the hard one (every agent stream is a socket:
    10,000 agents need more than the usual 1024); the (before, after) soft limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def default_data_dir() -> Path:
    return xdg_dir("XDG_DATA_HOME", ".local/share", "server")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_options("DOCKET_SERVER_CONFIG")
@click.option(
    "--listen",
    default="127.0.0.1:7800",
    show_default=True,
    callback=host_port,
    help="gRPC address to listen on (HOST:PORT; 0.0.0.0 for every interface).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_data_dir,
    show_default="$XDG_DATA_HOME/docket/server",
    help="Where the database (docket.db) and the blobs (blobs/sha256/…) live.",
)
@click.option(
    "--registry-listen",
    default="127.0.0.1:5000",
    show_default=True,
    callback=host_port_or_off,
    help="Address of the registry HTTP face (the OCI Distribution API that docker push and "
    "pull, skopeo and containerd speak), HOST:PORT; 'off' to serve none.",
)
@click.option(
    "--bt-listen",
    default="127.0.0.1:7881",
    show_default=True,
    callback=host_port,
    help="BitTorrent address the server seeds every blob from.",
)
@click.option(
    "--bt-advertise",
    default=None,
    callback=host_port,
    help="The seed's BitTorrent endpoint as agents reach it (default: the --bt-listen "
    "address, with the host name for 0.0.0.0).",
)
@click.option(
    "--peer-source",
    type=click.Choice([s.value for s in PeerSource]),
    default=None,
    help="Who tells agents their peers: the server (default), the --tracker, or both "
    "(default with --tracker).",
)
@click.option(
    "--max-upload-rate",
    type=click.IntRange(min=0),
    default=0,
    show_default="no limit",
    help="The seed's BitTorrent upload limit, bytes a second.",
)
@click.option(
    "--tracker",
    "tracker_url",
    default=None,
    help="Announce URL of an external BitTorrent tracker to put in new torrents.",
)
@click.option(
    "--database-url",
    default=None,
    help="The metadata database: postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE or "
    "sqlite+aiosqlite:///PATH (default: docket.db in the data dir). Its schema is migrated at "
    "start; blobs stay in the data dir.",
)
@click.option(
    "--agent-listen",
    default="127.0.0.1:7801",
    show_default=True,
    callback=host_port,
    help="Address of the agent port: enrolled agents call here with their certificates "
    "(mutual TLS). Not used with --insecure.",
)
@click.option(
    "--agent-advertise",
    default=None,
    callback=host_port,
    help="The agent port as agents reach it, HOST:PORT (default: the host they enroll at, "
    "with the --agent-listen port).",
)
@click.option(
    "--tls-san",
    "tls_names",
    multiple=True,
    metavar="NAME",
    help="A host name or address the generated serving certificate also names (repeatable); "
    "it always names the listen addresses, this host's names and loopback.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Serve this certificate (PEM, with its chain) instead of a generated one; replace "
    "the file to rotate it, no restart needed. Needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The private key (PEM) of --tls-cert.",
)
@click.option(
    "--tls-ca-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Use this CA (PEM; an intermediate of your own PKI, say) as the fleet CA instead "
    "of a generated one: it signs agents' certificates and roots the SSL torrents. Needs "
    "--tls-ca-key.",
)
@click.option(
    "--tls-ca-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The private key (PEM) of --tls-ca-cert.",
)
@click.option(
    "--agent-cert-ttl",
    default="30d",
    show_default=True,
    callback=duration,
    help="How long the certificates signed for agents last (90s, 12h, 30d); agents renew "
    "theirs two thirds of the way through.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Turn TLS and authentication off: anyone who can reach the server may do "
    "anything. For a lab only; the server says so in its log at every start.",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds between heartbeats on agent streams, the shortest: past "
    "--agent-messages-per-second the interval grows with the fleet. An agent silent for 2 "
    "intervals is stale, for 3 offline.",
)
@click.option(
    "--agent-messages-per-second",
    type=click.IntRange(min=10),
    default=2500,
    show_default=True,
    help="The agent messages a second the server paces its fleet for (one Python process "
    "reads about 2,500-3,000 on a core): the heartbeat interval grows once the agents' "
    "heartbeats would come to more than a fifth of it, and hosts report a download's "
    "progress less often than 4 times a second once the hosts fetching would send more than "
    "the rest.",
)
@click.option(
    "--hello-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds a new agent stream may take to say hello before it is dropped.",
)
@click.option(
    "--gc-interval",
    default="1h",
    show_default=True,
    callback=duration_or_off,
    help="How often to delete the blobs no image uses (a push that never recorded its image, "
    "a retag): 90s, 1h, 1d; 'off' or 0 for only `docketctl gc`.",
)
@click.option(
    "--gc-grace",
    default="1h",
    show_default=True,
    callback=duration_or_zero,
    help="How long a blob no image uses is kept (a push uploads its blobs before its "
    "manifest): only older ones, not asked for by a push within it, are collected.",
)
@click.option(
    "--gc-untagged/--gc-keep-untagged",
    default=True,
    show_default=True,
    help="Whether the periodic collections also remove the image manifests no tag and no "
    "index names, older than --gc-grace (what a retag leaves behind), and so free their "
    "blobs. Keep them where hosts pull by digest (image@sha256:...) images no longer tagged.",
)
@click.option(
    "--min-free-bytes",
    default="1Gi",
    show_default=True,
    callback=size,
    help="Free disk to keep in the data dir: uploads that would leave less are refused "
    "(RESOURCE_EXHAUSTED; HTTP 413 on the registry face). Bytes, or 512Mi, 2G; 0 for none.",
)
@click.option(
    "--metrics-listen",
    default=None,
    callback=host_port_or_off,
    help="Serve Prometheus metrics (/metrics), /healthz and /readyz over HTTP on HOST:PORT "
    "(port 0: any free port, logged); default: off.",
)
@logging_options
def main(
    listen: str,
    data_dir: Path,
    registry_listen: str | None,
    bt_listen: str,
    bt_advertise: str | None,
    peer_source: str | None,
    max_upload_rate: int,
    tracker_url: str | None,
    database_url: str | None,
    agent_listen: str,
    agent_advertise: str | None,
    tls_names: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca_cert: Path | None,
    tls_ca_key: Path | None,
    agent_cert_ttl: datetime.timedelta,
    insecure: bool,
    heartbeat_interval: float,
    agent_messages_per_second: int,
    hello_timeout: float,
    gc_interval: datetime.timedelta | None,
    gc_grace: datetime.timedelta,
    gc_untagged: bool,
    min_free_bytes: int,
    metrics_listen: str | None,
    log_level: str,
    log_json: bool | None,
) -> None:
    """Run the Docket server: the image registry, the origin BitTorrent seed and the API.

    Secure by default: on first start it makes a fleet CA and a serving certificate in the
    data dir (clients trust ca.pem), and a first admin token in admin.token (0600).

    Stops gracefully on SIGTERM or SIGINT: calls in flight get up to 10 seconds to finish.
    SIGHUP re-reads the --config file (the log level and the upload rate change live) and
    the tokens.
    """
    ctx = click.get_current_context()
    if print_config_requested(ctx):
        return
    configure_logging(log_level, json=log_json)
    before, after = raise_open_files_limit()
    if after < 4096:
        structlog.get_logger().warning(
            "few open files allowed: each agent stream is one; raise the hard limit "
            "(ulimit -Hn, LimitNOFILE=) for a large fleet",
            limit=after,
        )
    elif after != before:
        structlog.get_logger().debug("open files limit raised", before=before, after=after)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if (tls_ca_cert is None) != (tls_ca_key is None):
        raise click.UsageError("--tls-ca-cert and --tls-ca-key go together")
    if insecure and (tls_cert or tls_ca_cert or tls_names):
        raise click.UsageError("--insecure turns TLS off: it takes no --tls-* option")
    config = ServerConfig(
        listen=listen,
        data_dir=data_dir,
        bt_listen=bt_listen,
        database_url=database_url,
        tracker_url=tracker_url,
        bt_advertise=bt_advertise,
        peer_source=PeerSource(peer_source) if peer_source else None,
        max_upload_rate=max_upload_rate,
        registry_listen=registry_listen,
        insecure=insecure,
        agent_listen=agent_listen,
        agent_advertise=agent_advertise,
        tls_names=tls_names,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca_cert=tls_ca_cert,
        tls_ca_key=tls_ca_key,
        agent_cert_lifetime=agent_cert_ttl,
        heartbeat_interval=heartbeat_interval,
        agent_messages_per_second=agent_messages_per_second,
        hello_timeout=hello_timeout,
        gc_interval=gc_interval,
        gc_grace=gc_grace,
        gc_untagged=gc_untagged,
        min_free_bytes=min_free_bytes,
        metrics_listen=metrics_listen,
    )
    try:
        server = DocketServer(config)
        server.reloader = Reloader(ctx)
        asyncio.run(server.run_until_signalled())
    except (OSError, TorrentSessionError, RuntimeError, CertificateError) as e:
        click.echo(f"docket-server: error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
