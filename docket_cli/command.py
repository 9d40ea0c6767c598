"""What every docketctl command shares: the connection from the group's options, -o."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, TypeVar

import click
import grpc

from docket_cli.client import Connection, server_error

T = TypeVar("T")

output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for programs.",
)


def with_connection(func: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Runs an async command body, handing it a Connection made from --server and --token."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        server, token = click.get_current_context().find_root().obj

        async def body() -> T:
            async with Connection(server, token) as conn:
                try:
                    return await func(conn, *args, **kwargs)
                except grpc.aio.AioRpcError as e:
                    raise server_error(e, server) from e

        return asyncio.run(body())

    return wrapper
