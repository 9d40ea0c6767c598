"""`docketctl pull`: one host, no agent. Fetches an image over BitTorrent (from the server's
seed and the agents that hold its blobs) into the local Docker engine or a loadable archive.

Blobs go to a cache under $XDG_CACHE_HOME/docket/pull (verified, like an agent's), so a pull
cut short resumes and a second image sharing layers fetches only what is new.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import click

from docket_cli.client import Connection
from docket_cli.command import with_connection
from docket_cli.progress import transfer_bars
from docket_cli.render import human_size, stderr
from docket_common.cli import host_port, xdg_dir
from docket_common.digest import short
from docket_common.fetch import BlobFetcher, BlobSpec, follow
from docket_common.loadable import LoadableImage, load_from_env, write_archive
from docket_common.manifest import Descriptor, Platform, select_platform, this_platform
from docket_common.pb import image_pb2
from docket_common.pb import image_service_pb2 as pb
from docket_common.readblob import grpc_read_range
from docket_common.reference import parse_reference
from docket_common.torrent import torrent_ssl_cert
from docket_common.version import VERSION


def default_cache_dir() -> Path:
    return xdg_dir("XDG_CACHE_HOME", ".cache", "pull")


@click.command("pull")
@click.argument("ref")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a `docker load`-able archive here instead of loading into the engine.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_cache_dir,
    show_default="$XDG_CACHE_HOME/docket/pull",
    help="Where verified blobs are kept.",
)
@click.option(
    "--bt-listen",
    default="0.0.0.0:0",
    show_default=True,
    callback=host_port,
    help="BitTorrent address to listen on while pulling.",
)
@click.option(
    "--fallback-after",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds without a new byte before the missing pieces come over gRPC.",
)
@click.option(
    "--platform",
    default=None,
    help="For a multi-platform image: the platform to pull, OS/ARCH[/VARIANT] (default: "
    "this machine's).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress, only the result.")
@with_connection
async def pull_cmd(
    conn: Connection,
    ref: str,
    output: Path | None,
    cache_dir: Path,
    bt_listen: str,
    fallback_after: float,
    platform: str | None,
    quiet: bool,
) -> None:
    """Pull an image from the server over BitTorrent into the local Docker engine
    ($DOCKER_HOST), or with --output into an archive for `docker load`.

    From a server with TLS on, the swarm's peers admit enrolled agents only (SSL torrents),
    so the blobs come from the server over gRPC instead, with the same checks."""
    name = parse_reference(ref).name
    want = this_platform()
    if platform is not None:
        try:
            want = Platform.parse(platform)
        except ValueError as e:
            raise PullError(str(e)) from None
    found = (
        await conn.images.GetImage(pb.GetImageRequest(name=name), metadata=conn.metadata)
    ).image
    image = platform_image(found, want)
    blobs = [image.config, *image.layers]
    fetcher = BlobFetcher(bt_listen, cache_dir, user_agent=f"docketctl/{VERSION}")
    await fetcher.start()
    try:
        downloads = []
        over_grpc = []  # SSL torrents: their peers admit enrolled agents only
        cached = 0
        for blob in {b.digest: b for b in blobs}.values():
            path = fetcher.blob_path(blob.digest)
            if path.is_file() and path.stat().st_size == blob.size_bytes:
                cached += blob.size_bytes
                continue
            torrent = await conn.images.GetTorrent(
                pb.GetTorrentRequest(digest=blob.digest), metadata=conn.metadata
            )
            spec = BlobSpec(blob.digest, blob.size_bytes, torrent.torrent.metainfo)
            if torrent_ssl_cert(spec.metainfo) is None:
                downloads.append(fetcher.download(spec, [p.endpoint for p in torrent.peers]))
            else:
                over_grpc.append(fetcher.download(spec, []))
        downloads += over_grpc
        if cached and not quiet:
            stderr.print(f"{human_size(cached)} already in {cache_dir}: not fetched again")
        if over_grpc and not quiet:
            stderr.print(
                "The fleet's swarm admits enrolled agents only (TLS peers): fetching over gRPC"
            )
        read_range = grpc_read_range(conn.images, conn.metadata)
        live = stderr.is_terminal and not quiet
        bars = transfer_bars()
        tasks = {
            d.spec.digest: bars.add_task(short(d.spec.digest), total=d.spec.size) for d in downloads
        }

        def tick() -> None:
            for d in downloads:
                bars.update(tasks[d.spec.digest], completed=d.status().total_wanted_done)

        if live:
            bars.start()
        try:
            waits = [
                asyncio.ensure_future(
                    follow(
                        fetcher,
                        downloads,
                        read_range=read_range,
                        fallback_after=fallback_after,
                        on_tick=tick,
                    )
                ),
                *(
                    asyncio.ensure_future(
                        fetcher.fill_missing(d, partial(read_range, d.spec.digest))
                    )
                    for d in over_grpc
                ),
            ]
            try:
                await asyncio.gather(*waits)  # the first failure ends the pull
            finally:
                for task in waits:
                    task.cancel()
            for d in downloads:
                await fetcher.complete(d)
            tick()
        finally:
            if live:
                bars.stop()
        for d in downloads:
            if not quiet and not live:
                stderr.print(f"{short(d.spec.digest)}: fetched ({human_size(d.spec.size)})")
        fetched = sum(d.spec.size for d in downloads)
        fallback = sum(d.fallback_bytes for d in downloads)
    finally:
        fetcher.close()
    loadable = LoadableImage(
        name=found.name,
        config_path=fetcher.blob_path(image.config.digest),
        config_digest=image.config.digest,
        layer_paths=tuple(fetcher.blob_path(layer.digest) for layer in image.layers),
        layer_digests=tuple(layer.digest for layer in image.layers),
    )
    how = f"{human_size(fetched)} fetched, {human_size(cached)} cached" + (
        f", {human_size(fallback)} over gRPC" if fallback else ""
    )
    if output is not None:
        await asyncio.to_thread(write_archive, loadable, output)
        click.echo(f"Pulled {found.name} {image.digest} into {output} ({how})")
        return
    image_id = await asyncio.to_thread(load_from_env, loadable)
    click.echo(f"Pulled {found.name} {image.digest}: loaded as {image_id} ({how})")


class PullError(Exception):
    """The image cannot be pulled as asked; str() says why, in one line."""


def platform_image(image: image_pb2.Image, want: Platform) -> image_pb2.Image:
    """The image itself, or from a multi-platform index the one for ``want``."""
    if image.manifests:
        entries = [
            Descriptor(m.digest, m.size_bytes, m.media_type, Platform.parse(m.platform))
            for m in image.manifests
            if m.platform and m.HasField("config")
        ]
        chosen = select_platform(entries, want)
        if chosen is None:
            offered = ", ".join(m.platform for m in image.manifests if m.platform) or "none"
            raise PullError(f"{image.name} has no image for {want} (it has {offered})")
        return next(m for m in image.manifests if m.digest == chosen.digest)
    if not image.HasField("config"):
        raise PullError(f"{image.name} is not an image ({image.artifact_type or image.media_type})")
    return image
