"""`docketctl gc`: delete the blobs no image uses."""

from __future__ import annotations

from datetime import timedelta

import click

from docket_cli.client import Connection
from docket_cli.command import output_option, with_connection
from docket_cli.render import columns, human_size, print_json
from docket_common.cli import duration_or_zero
from docket_common.pb import image_service_pb2 as pb


def gc_json(response: pb.CollectGarbageResponse) -> dict[str, object]:
    return {
        "dry_run": response.dry_run,
        "freed_bytes": response.freed_bytes,
        "kept_blobs": response.kept_blobs,
        "removed_manifests": list(response.removed_manifests),
        "blobs": [{"digest": b.digest, "size_bytes": b.size_bytes} for b in response.blobs],
    }


def gc_table(response: pb.CollectGarbageResponse) -> str:
    lines = [
        f"{'Would remove' if response.dry_run else 'Removed'} untagged: {name}"
        for name in response.removed_manifests
    ]
    rows = [["DIGEST", "SIZE"]]
    rows += [[b.digest, human_size(b.size_bytes)] for b in response.blobs]
    verb = "Would delete" if response.dry_run else "Deleted"
    count = len(response.blobs)
    total = f"{verb} {count} blob{'' if count == 1 else 's'}, {human_size(response.freed_bytes)}"
    if response.kept_blobs:
        total += f"; kept {response.kept_blobs} unused (too recent, or in flight)"
    return "\n".join([*lines, *([columns(rows)] if response.blobs else []), total])


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Delete nothing: list what would be deleted.")
@click.option(
    "--grace",
    default=None,
    callback=duration_or_zero,
    help="Collect only blobs unused for longer than this (90s, 10m, 1h; 0 for all, even a "
    "push in progress). Default: the server's --gc-grace.",
)
@click.option(
    "--untagged/--keep-untagged",
    default=True,
    show_default=True,
    help="Also remove the images no tag names, older than the grace (what a retag leaves "
    "behind, pullable only by digest), and so the blobs only they use.",
)
@output_option
@with_connection
async def gc_cmd(
    conn: Connection, dry_run: bool, grace: timedelta | None, untagged: bool, output: str
) -> None:
    """Delete the blobs no image uses: left by a push that never recorded its image, or by
    a retag. Only blobs older than the grace period go, never one a rollout or pull in
    flight fetches; tagged images are never removed, and untagged ones (pullable only by
    digest) unless --keep-untagged.
    The server also does this on its own every --gc-interval. Admins only.
    """
    request = pb.CollectGarbageRequest(dry_run=dry_run, untagged=untagged)
    if grace is not None:
        request.grace_period.FromTimedelta(grace)
    response = await conn.images.CollectGarbage(request, metadata=conn.metadata)
    if output == "json":
        print_json(gc_json(response))
    else:
        click.echo(gc_table(response))
