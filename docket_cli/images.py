"""`docketctl images`, `inspect` and `rm`."""

from __future__ import annotations

import click

from docket_cli.client import Connection
from docket_cli.command import output_option, with_connection
from docket_cli.render import image_details, image_json, images_table, print_json
from docket_common.pb import image_pb2
from docket_common.pb import image_service_pb2 as pb
from docket_common.reference import parse_reference


async def list_all_images(conn: Connection) -> list[image_pb2.Image]:
    images: list[image_pb2.Image] = []
    token = ""
    while True:
        page = await conn.images.ListImages(
            pb.ListImagesRequest(page_size=500, page_token=token), metadata=conn.metadata
        )
        images.extend(page.images)
        token = page.next_page_token
        if not token:
            return images


@click.command("images")
@output_option
@with_connection
async def images_cmd(conn: Connection, output: str) -> None:
    """List the images on the server."""
    images = await list_all_images(conn)
    if output == "json":
        print_json([image_json(i) for i in images])
    else:
        click.echo(images_table(images))


@click.command("inspect")
@click.argument("ref")
@output_option
@with_connection
async def inspect_cmd(conn: Connection, ref: str, output: str) -> None:
    """Show one image: digest, platform, config and layers."""
    name = parse_reference(ref).name
    image = (
        await conn.images.GetImage(pb.GetImageRequest(name=name), metadata=conn.metadata)
    ).image
    if output == "json":
        print_json(image_json(image))
    else:
        click.echo(image_details(image))


@click.command("rm")
@click.argument("refs", nargs=-1, required=True)
@output_option
@with_connection
async def rm_cmd(conn: Connection, refs: tuple[str, ...], output: str) -> None:
    """Remove images by name. An image goes with its last name (and is kept while another
    name or a multi-platform index still includes it); blobs no image uses any more are
    deleted and stop being seeded, once no rollout in flight still fetches them.

    REF@sha256:… removes the image and every name of it in its repository.
    """
    names = [parse_reference(r).name for r in refs]  # all checked before any is removed
    untagged: list[str] = []
    deleted: list[str] = []
    for name in names:
        response = await conn.images.DeleteImage(
            pb.DeleteImageRequest(name=name), metadata=conn.metadata
        )
        untagged += response.deleted_names
        deleted += response.deleted_digests
        if output != "json":
            for removed in response.deleted_names:
                click.echo(f"Untagged: {removed}")
            for digest in response.deleted_digests:
                click.echo(f"Deleted: {digest}")
    if output == "json":
        print_json({"deleted_names": untagged, "deleted_digests": deleted})
