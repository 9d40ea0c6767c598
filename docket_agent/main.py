"""The docket-agent command: one per host, holding one stream to the server."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import signal
import socket
import sys
from pathlib import Path

import click

from docket_agent.agent import Agent, AgentConfig
from docket_agent.hostinfo import DataDirInUseError
from docket_agent.identity import EnrollError
from docket_agent.stream import AgentRefusedError
from docket_common.bt import TorrentSessionError
from docket_common.cli import host_port, host_port_or_off, logging_options, size, xdg_dir
from docket_common.config import (
    Reloader,
    config_options,
    print_config_requested,
    reload_and_apply,
)
from docket_common.fetch import PIECE_ORDERS
from docket_common.logs import configure_logging
from docket_common.manifest import Platform, normalize_platform
from docket_common.selector import is_label, is_name


def default_data_dir() -> Path:
    return xdg_dir("XDG_DATA_HOME", ".local/share", "agent")


def _name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not is_name(value):
        raise click.BadParameter(f"{value!r}: letters, digits, '.', '_', '-', up to 64 characters")
    return value


def _groups(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    for group in value:
        if not is_name(group) or group == "all":
            raise click.BadParameter(f"{group!r}: letters, digits, '.', '_', '-'; not 'all'")
    return value


def _labels(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in value:
        key, sep, val = item.partition("=")
        if not sep or not is_label(key, val):
            raise click.BadParameter(f"{item!r}: want KEY=VALUE")
        labels[key] = val
    return labels


def _platform(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Platform | None:
    if value is None:
        return None
    try:
        parsed = Platform.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    return normalize_platform(parsed.os, parsed.architecture, parsed.variant)


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@config_options("DOCKET_AGENT_CONFIG")
@click.option(
    "--server",
    envvar="DOCKET_SERVER",
    default="127.0.0.1:7800",
    show_default=True,
    callback=host_port,
    help="The Docket server, HOST:PORT. Also from $DOCKET_SERVER.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_data_dir,
    show_default="$XDG_DATA_HOME/docket/agent",
    help="Where the agent keeps its id and its blob cache.",
)
@click.option(
    "--name",
    default=socket.gethostname,
    show_default="the host name",
    callback=_name,
    help="The agent's name, unique in the fleet.",
)
@click.option(
    "--group",
    "groups",
    multiple=True,
    callback=_groups,
    help="A group this host belongs to (repeat for several); rollouts pick hosts by group.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    callback=_labels,
    help="A KEY=VALUE label (repeat for several); selectors can match it.",
)
@click.option(
    "--registry-listen",
    default="127.0.0.1:5001",
    show_default=True,
    callback=host_port_or_off,
    help="Address of the agent's registry face, HOST:PORT ('off' for none): dockerd and "
    "containerd on this host pull images through it, over the swarm.",
)
@click.option(
    "--bt-listen",
    default="0.0.0.0:6881",
    show_default=True,
    callback=host_port,
    help="BitTorrent address to listen on (port 0: any free port).",
)
@click.option(
    "--advertise-host",
    default=None,
    help="The address other hosts reach this one at (default: the --bt-listen host, or the "
    "local address that routes to the server).",
)
@click.option(
    "--no-docker",
    is_flag=True,
    help="Do not use a Docker engine: images stop at downloaded.",
)
@click.option(
    "--cache-max-bytes",
    type=click.IntRange(min=0),
    default=0,
    show_default="no limit",
    help="Most bytes the blob cache may hold; least recently used blobs go first.",
)
@click.option(
    "--min-free-bytes",
    default="1Gi",
    show_default=True,
    callback=size,
    help="Free disk to keep where the cache lives (the data dir): least recently used blobs "
    "go to make room, and a download that would still leave less fails its task with the "
    "reason. Bytes, or 512Mi, 2G; 0 for none.",
)
@click.option(
    "--fallback-after",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds without a new byte from any peer before the missing pieces are fetched "
    "from the server over gRPC.",
)
@click.option(
    "--max-download-rate",
    type=click.IntRange(min=0),
    default=0,
    show_default="no limit",
    help="Download limit, bytes a second. A limited agent takes no first pieces from the "
    "server over gRPC (they would pass the limit): it fetches everything over BitTorrent.",
)
@click.option(
    "--load-while-downloading/--load-after-download",
    default=True,
    show_default=True,
    help="Start `docker load` as the layers arrive, fed each piece once it has passed the "
    "blob's sha256 in order (a blob's last piece only once the whole blob matched), or "
    "only once every blob is verified in the cache.",
)
@click.option(
    "--load-via",
    type=click.Choice(["auto", "import", "archive", "registry"]),
    default="auto",
    show_default=True,
    help="How images go into the engine: `import`, a `docker load` of an archive streamed "
    "from the blobs, with the base layer streamed in by `docker import` beside it, which the "
    "engine unpacks as it arrives rather than once it has the whole archive (the import's "
    "untagged image is removed once the image is loaded); `archive`, the archive alone; "
    "`registry`, a pull by the engine from this agent's registry face (--registry-listen), "
    "which streams each blob as its pieces pass the sha256; `auto`, `registry` for images "
    "smaller than --pull-below (the engine spends less CPU on them: one helper process "
    "instead of two) when the face listens on loopback or all addresses and no layer is "
    "zstd, else `import`; an engine that cannot reach the face on 127.0.0.1 (its pull "
    "failed without asking the face for anything) is loaded by `import` from then on.",
)
@click.option(
    "--pull-below",
    default="8Mi",
    show_default=True,
    callback=size,
    help="With --load-via auto: images whose blobs add up to fewer bytes than this are "
    "pulled by the engine from the registry face, larger ones loaded by import. 0: never.",
)
@click.option(
    "--piece-order",
    type=click.Choice(PIECE_ORDERS),
    default="sequential",
    show_default=True,
    help="Which pieces to ask peers for first: the lowest missing (pieces then arrive near "
    "enough in order for the sha256 and the load to keep up with them) or the rarest "
    "(BitTorrent's usual order, for comparison).",
)
@click.option(
    "--max-upload-rate",
    type=click.IntRange(min=0),
    default=0,
    show_default="no limit",
    help="BitTorrent upload limit (what this host seeds to others), bytes a second.",
)
@click.option(
    "--platform",
    "platform",
    default=None,
    callback=_platform,
    help="The platform this host runs images for, OS/ARCH[/VARIANT] (default: the Docker "
    "engine's, or this machine's): a rollout of a multi-platform image gives the host the "
    "image for it.",
)
@click.option(
    "--join-token",
    envvar="DOCKET_JOIN_TOKEN",
    default=None,
    help="A join token (docketctl tokens create --role agent), for the first start: the "
    "agent enrolls with it and keeps its certificate in the data dir. Also from "
    "$DOCKET_JOIN_TOKEN.",
)
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The server's CA certificate (PEM; <data-dir>/ca.pem on the server), to enroll by.",
)
@click.option(
    "--ca-hash",
    default=None,
    metavar="sha256:HEX",
    help="Instead of --ca: trust the CA in the server's chain with this hash (the server "
    "logs it at start, as ca_hash).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Plaintext and no certificate, for a server running with --insecure (a lab).",
)
@click.option(
    "--metrics-listen",
    default=None,
    callback=host_port_or_off,
    help="Serve Prometheus metrics (/metrics), /healthz and /readyz over HTTP on HOST:PORT "
    "(port 0: any free port, logged); default: off.",
)
@logging_options
@click.pass_context
def main(
    ctx: click.Context,
    server: str,
    data_dir: Path,
    name: str,
    groups: tuple[str, ...],
    labels: dict[str, str],
    registry_listen: str | None,
    bt_listen: str,
    advertise_host: str | None,
    no_docker: bool,
    cache_max_bytes: int,
    min_free_bytes: int,
    fallback_after: float,
    max_download_rate: int,
    load_while_downloading: bool,
    load_via: str,
    pull_below: int,
    piece_order: str,
    max_upload_rate: int,
    platform: Platform | None,
    join_token: str | None,
    ca_file: Path | None,
    ca_hash: str | None,
    insecure: bool,
    metrics_listen: str | None,
    log_level: str,
    log_json: bool | None,
) -> None:
    """Run the Docket agent on this host.

    It holds one stream to the server for its whole life, says who it is (name, groups,
    labels, BitTorrent endpoint, Docker engine, disk, cached blobs), and exchanges heartbeats.
    Down the stream come pull orders: the agent fetches the blobs it lacks over BitTorrent
    (from the server and the other hosts), reports every piece, verifies each blob's sha256,
    loads the image into the Docker engine at $DOCKER_HOST, and keeps seeding its cache.
    When the server goes away it reconnects by itself, with backoff. SIGHUP re-reads the
    --config file (the log level and rate limits change live).

    \b
    Joining: on its first start the agent makes a key, enrolls with --join-token (and --ca or
    --ca-hash to trust the server by) and keeps the certificate the server signs in
    <data-dir>/tls; later starts need neither. The name is bound to that key: no other
    install can take it until `docketctl agents remove NAME`. The server's agent port is
    where it then calls, with mutual TLS; it renews its certificate by itself.

    On --registry-listen it serves the pull half of the registry protocol: `docker pull
    127.0.0.1:5001/IMAGE`, or containerd with the file `docket-agent containerd-config`
    prints, pull through it; layers come over the swarm and the server records every pull.
    """
    if ctx.invoked_subcommand is not None or print_config_requested(ctx):
        return
    configure_logging(log_level, json=log_json)
    if insecure and (join_token or ca_file or ca_hash):
        raise click.UsageError("--insecure joins without enrolling: no --join-token or CA")
    if load_via == "registry" and not registry_listen:
        raise click.UsageError("--load-via registry needs the registry face (--registry-listen)")
    if ca_file and ca_hash:
        raise click.UsageError("--ca and --ca-hash are two ways to say the same: give one")
    config = AgentConfig(
        server=server,
        data_dir=data_dir,
        name=name,
        groups=tuple(dict.fromkeys(groups)),
        labels=labels,
        registry_listen=registry_listen,
        bt_listen=bt_listen,
        advertise_host=advertise_host,
        docker=not no_docker,
        insecure=insecure,
        join_token=join_token,
        ca_file=ca_file,
        ca_hash=ca_hash,
        cache_max_bytes=cache_max_bytes,
        min_free_bytes=min_free_bytes,
        fallback_after=fallback_after,
        max_download_rate=max_download_rate,
        max_upload_rate=max_upload_rate,
        load_while_downloading=load_while_downloading,
        load_via=load_via,
        pull_below=pull_below,
        piece_order=piece_order,
        platform=platform,
        metrics_listen=metrics_listen,
    )
    try:
        asyncio.run(_run(Agent(config), Reloader(ctx)))
    except AgentRefusedError as e:
        click.echo(f"docket-agent: error: the server refused this agent: {e}", err=True)
        sys.exit(1)
    except (TorrentSessionError, DataDirInUseError, OSError, EnrollError) as e:
        click.echo(f"docket-agent: error: {e}", err=True)
        sys.exit(1)


@main.command("containerd-config")
@click.argument("server_registry", callback=host_port)
@click.option(
    "--agent",
    "agent_url",
    default="http://127.0.0.1:5001",
    show_default=True,
    help="The agent's registry face, as containerd on this host reaches it.",
)
@click.option(
    "--server-scheme",
    type=click.Choice(["http", "https"]),
    default="https",
    show_default=True,
    help="How containerd reaches the server when the agent is down (http: a server running "
    "with --insecure).",
)
@click.option(
    "--server-ca",
    default=None,
    metavar="FILE",
    help="The CA file containerd verifies the server by (default: the agent's, "
    "<data-dir>/tls/server-ca.pem, when there is one).",
)
@click.pass_context
def containerd_config(
    ctx: click.Context,
    server_registry: str,
    agent_url: str,
    server_scheme: str,
    server_ca: str | None,
) -> None:
    """Print the hosts.toml that makes containerd pull images named after the server's
    registry (SERVER_REGISTRY, HOST:PORT, as in SERVER_REGISTRY/perl:5.40) through this
    host's agent, and straight from the server when the agent is down.

    Write it to <config_path>/SERVER_REGISTRY/hosts.toml: /etc/containerd/certs.d by default
    for ctr --hosts-dir; for Kubernetes, the CRI plugin's registry config_path.
    """
    if server_ca is None and server_scheme == "https":
        data_dir: Path = ctx.parent.params["data_dir"] if ctx.parent else default_data_dir()
        kept = data_dir / "tls" / "server-ca.pem"
        server_ca = str(kept) if kept.exists() else None
    click.echo(
        containerd_hosts_toml(server_registry, agent_url, server_scheme, server_ca), nl=False
    )


def containerd_hosts_toml(
    server_registry: str, agent_url: str, server_scheme: str, server_ca: str | None = None
) -> str:
    ca = f'ca = "{server_ca}"\n' if server_ca else ""
    return (
        f"# {server_registry}: pulls go through the Docket agent on this host, and to the\n"
        "# server itself when the agent does not answer.\n"
        f'server = "{server_scheme}://{server_registry}"\n'
        f"{ca}"
        "\n"
        f'[host."{agent_url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


async def _run(agent: Agent, reloader: Reloader) -> None:
    task = asyncio.create_task(agent.run())
    loop = asyncio.get_running_loop()
    # SIGHUP: the --config file again; the log level and rate limits change live.
    loop.add_signal_handler(
        signal.SIGHUP, reload_and_apply, reloader, agent.apply_live, "docket-agent"
    )

    def shut_down() -> None:
        # A watchdog: should shutdown ever hang, print every thread's stack and exit.
        faulthandler.dump_traceback_later(20, exit=True)
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shut_down)
    with contextlib.suppress(asyncio.CancelledError):
        await task


if __name__ == "__main__":
    main()
