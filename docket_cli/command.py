"""What every docketctl command shares: the server and connection from the group's options
(and the saved contexts), -o."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import click
import grpc

from docket_cli.client import Connection, server_error
from docket_cli.config import Target, resolve

T = TypeVar("T")

output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for programs.",
)


def current_target() -> Target:
    """The server the command talks to (docket_cli/config.py), from the group's options."""
    options: GlobalOptions = click.get_current_context().find_root().obj
    return resolve(options.server, options.token, options.ca, options.insecure, options.context)


@dataclass(frozen=True)
class GlobalOptions:
    server: str | None
    token: str | None
    ca: str | None
    insecure: bool
    context: str | None


def with_connection(func: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Runs an async command body, handing it a Connection made from --server and --token."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        target = current_target()

        async def body() -> T:
            async with Connection(target) as conn:
                try:
                    return await func(conn, *args, **kwargs)
                except grpc.aio.AioRpcError as e:
                    raise server_error(e, target) from e

        return asyncio.run(body())

    return wrapper
