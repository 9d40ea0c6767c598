"""What the three commands share on their command lines: addresses, data dirs, logging."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from docket_common.hostport import split_host_port
from docket_common.sizes import parse_size

F = TypeVar("F", bound=Callable[..., Any])


def xdg_dir(variable: str, fallback: str, *parts: str) -> Path:
    """``$VARIABLE/docket/…``, or ``~/<fallback>/docket/…`` when it is not set."""
    base = os.environ.get(variable) or str(Path.home() / fallback)
    return Path(base, "docket", *parts)


def host_port(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A click callback: HOST:PORT, checked."""
    if value is None:
        return None
    try:
        split_host_port(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    return value


def host_port_or_off(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback: HOST:PORT, checked, or "off" (None): a listener turned off."""
    if value is None or value == "off":
        return None
    return host_port(ctx, param, value)


_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> timedelta:
    """ "90s", "10m", "1h30m", "30d", or a number of seconds; click.BadParameter otherwise."""
    text = text.strip()
    try:
        return timedelta(seconds=float(text))
    except ValueError:
        pass
    match = _DURATION.match(text)
    if not text or match is None:
        raise click.BadParameter(f"{text!r}: want a duration like 90s, 10m, 1h30m or 30d")
    days, hours, minutes, secs = match.groups()
    return timedelta(
        days=int(days or 0),
        hours=int(hours or 0),
        minutes=int(minutes or 0),
        seconds=float(secs or 0),
    )


def duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> timedelta | None:
    """A click callback: a positive duration (parse_duration)."""
    if value is None:
        return None
    parsed = parse_duration(value)
    if parsed <= timedelta(0):
        raise click.BadParameter(f"{value!r}: want a positive duration")
    return parsed


def size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """A click callback: a size in bytes ("1073741824", "512Mi", "2G"; parse_size)."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def duration_or_off(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> timedelta | None:
    """A click callback: a duration (parse_duration), or "off" or 0 (None): turned off."""
    if value is None or value.strip().lower() == "off":
        return None
    parsed = parse_duration(value)
    return parsed if parsed > timedelta(0) else None


def duration_or_zero(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> timedelta | None:
    """A click callback: a duration that may be 0 (parse_duration)."""
    if value is None:
        return None
    parsed = parse_duration(value)
    if parsed < timedelta(0):
        raise click.BadParameter(f"{value!r}: want a duration of 0 or more")
    return parsed


def logging_options(func: F) -> F:
    """--log-level and --log-json, as every long-running command takes them."""
    func = click.option(
        "--log-json/--no-log-json", default=None, help="JSON logs (default: when not a TTY)."
    )(func)
    return click.option(
        "--log-level",
        default="info",
        show_default=True,
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    )(func)
