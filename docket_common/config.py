"""Configuration files for the long-running commands: TOML with the flags' own names.

``docket-server --config /etc/docket/server.toml`` reads keys named as the long flags
(``listen``, ``max-upload-rate``, ``tls-san = ["a", "b"]``; ``max_upload_rate`` works too).
A flag given on the command line (or by its environment variable) wins over the file, and the
file over the built-in default. ``--print-config`` prints what is in effect, as a file of the
same form, and says where each value came from.

SIGHUP re-reads the file (``Reloader``): the caller applies what can change live and is told
what else changed, which needs a restart.
"""

from __future__ import annotations

import datetime
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import structlog
from click.core import ParameterSource

F = TypeVar("F", bound=Callable[..., Any])
log = structlog.get_logger()

_PATH = "docket.config_path"
_PRINT = "docket.print_config"
# Options that are not configuration: they say which file, or what to do instead of running.
_NOT_KEYS = frozenset({"config", "print_config", "help"})
SECRET_WORDS = ("token", "password", "secret")


class ConfigError(click.BadParameter):
    """A configuration file that cannot be used: unreadable, not TOML, or an unknown key."""


def _options(command: click.Command) -> dict[str, click.Option]:
    """The command's options that a file may set, by every key that names them."""
    found: dict[str, click.Option] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in _NOT_KEYS or not param.name:
            continue
        for opt in param.opts:
            if opt.startswith("--"):
                key = opt[2:]
                found[key] = param
                found[key.replace("-", "_")] = param
        found[param.name] = param
    return found


def _key(param: click.Option) -> str:
    """The key a file uses for an option: its first long flag without the dashes."""
    for opt in param.opts:
        if opt.startswith("--"):
            return opt[2:]
    return str(param.name)


def read_config(command: click.Command, path: Path) -> dict[str, Any]:
    """The file's values by parameter name, checked against the command's options (not yet
    converted: click converts and checks them as it does a default)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    options = _options(command)
    values: dict[str, Any] = {}
    for key, value in data.items():
        param = options.get(key)
        if param is None:
            known = ", ".join(sorted({_key(p) for p in options.values()}))
            raise ConfigError(f"{path}: unknown key {key!r} (known keys: {known})")
        if isinstance(value, dict):
            raise ConfigError(f"{path}: {key!r} is a table; want a value")
        if param.multiple and not isinstance(value, list):
            value = [value]
        if not param.multiple and isinstance(value, list):
            raise ConfigError(f"{path}: {key!r} takes one value, not a list")
        if param.is_flag and not param.is_bool_flag:
            raise ConfigError(f"{path}: {key!r} cannot be set in a file")
        if param.is_bool_flag and not isinstance(value, bool):
            raise ConfigError(f"{path}: {key!r} wants true or false")
        if param.name in values:
            raise ConfigError(f"{path}: {key!r} is given twice")
        values[str(param.name)] = value
    return values


def _load(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    if value is None:
        return None
    ctx.meta[_PATH] = value
    values = read_config(ctx.command, value)
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _print(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta[_PRINT] = value
    return value


def config_options(envvar: str) -> Callable[[F], F]:
    """--config FILE (also from $``envvar``) and --print-config, for a command."""

    def decorate(func: F) -> F:
        func = click.option(
            "--print-config",
            is_flag=True,
            expose_value=False,
            callback=_print,
            help="Print the configuration in effect (as a --config file, each value's source "
            "in a comment; secrets hidden) and exit.",
        )(func)
        return click.option(
            "--config",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar=envvar,
            is_eager=True,
            expose_value=False,
            callback=_load,
            help=f"A TOML file of settings named as the long flags (listen = "
            f'"0.0.0.0:7800"); flags win over it. Also from ${envvar}. SIGHUP re-reads it.',
        )(func)

    return decorate


def config_path(ctx: click.Context) -> Path | None:
    value = ctx.meta.get(_PATH)
    return value if isinstance(value, Path) else None


def print_config_requested(ctx: click.Context) -> bool:
    """Whether --print-config was given; if so, prints the configuration."""
    if not ctx.meta.get(_PRINT):
        return False
    click.echo(render_config(ctx), nl=False)
    return True


_SOURCES = {
    ParameterSource.COMMANDLINE: "flag",
    ParameterSource.ENVIRONMENT: "environment",
    ParameterSource.DEFAULT_MAP: "config file",
    ParameterSource.DEFAULT: "default",
}


def render_config(ctx: click.Context) -> str:
    """The parameters in effect as TOML a --config file can hold, with their sources."""
    path = config_path(ctx)
    lines = [f"# {ctx.command_path}: the configuration in effect"]
    lines.append(f"# config file: {path}" if path else "# config file: none")
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in _NOT_KEYS or not param.name:
            continue
        value = ctx.params.get(param.name)
        source = ctx.get_parameter_source(param.name)
        note = _SOURCES.get(source, "default") if source is not None else "default"
        key = _key(param)
        if any(word in param.name for word in SECRET_WORDS) and value:
            lines.append(f"# {key} = (set, hidden)  # {note}")
        elif value is None and param.default is not None and not param.multiple:
            lines.append(f'{key} = "off"  # {note}')  # a default turned off (--registry-listen)
        elif value is None or (param.multiple and not value):
            lines.append(f"# {key} is not set  # {note}")
        else:
            lines.append(f"{key} = {toml_value(value)}  # {note}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """A value as TOML, in the form its flag takes it (durations as 90s, labels as K=V)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime.timedelta):
        return toml_value(format_duration(value))
    if isinstance(value, Mapping):
        return toml_value([f"{k}={v}" for k, v in value.items()])
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def format_duration(value: datetime.timedelta) -> str:
    """A timedelta as the flags write it: 30d, 12h, 1h30m, 90s."""
    seconds = value.total_seconds()
    if seconds != int(seconds):
        return f"{seconds}s"
    rest = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


@dataclass(frozen=True)
class Reload:
    """What a re-read of the file changed: the new values of every changed setting (by
    parameter name), and of those the ones the caller could not apply live."""

    changed: dict[str, Any]
    path: Path


class Reloader:
    """Re-reads a command's --config file (on SIGHUP) into the values in effect.

    Settings given by flag or environment keep their values (flags win over the file); one
    the file no longer sets goes back to its default.
    """

    def __init__(self, ctx: click.Context) -> None:
        self.command = ctx.command
        self.path = config_path(ctx)
        self.ctx = ctx
        self.current = dict(ctx.params)
        self.pinned = {
            name
            for name in ctx.params
            if ctx.get_parameter_source(name)
            in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
        }

    def reload(self) -> Reload | None:
        """The settings that changed, converted and checked as at start; None without a
        file. Raises ConfigError (or click.BadParameter) and changes nothing on a bad file."""
        if self.path is None:
            return None
        raw = read_config(self.command, self.path)
        fresh: dict[str, Any] = {}
        kept = self.ctx.default_map
        self.ctx.default_map = raw  # what get_default finds first: the file as it is now
        try:
            for param in self.command.params:
                name = param.name
                if not isinstance(param, click.Option) or not name or name in _NOT_KEYS:
                    continue
                if name not in self.pinned:
                    fresh[name] = param.process_value(self.ctx, param.get_default(self.ctx))
        finally:
            self.ctx.default_map = kept
        changed = {k: v for k, v in fresh.items() if self.current.get(k) != v}
        self.current.update(changed)
        return Reload(changed, self.path)


def reload_and_apply(
    reloader: Reloader | None, apply: Callable[[dict[str, Any]], list[str]], command: str
) -> None:
    """What SIGHUP does with the --config file: re-reads it, has ``apply`` take out of the
    changed settings those it applied live (returning their names), and logs the others as
    needing a restart of ``command``. A file that cannot be read or is wrong changes nothing
    and is logged."""
    if reloader is None or reloader.path is None:
        log.info("SIGHUP: no --config file to re-read")
        return
    try:
        reload = reloader.reload()
    except click.BadParameter as e:
        log.error("config not reloaded: nothing changed", error=e.format_message())
        return
    if reload is None:
        return
    changed = dict(reload.changed)
    applied = apply(changed)
    log.info("config reloaded", file=str(reload.path), applied=names(applied))
    if changed:
        log.warning(
            f"config changed but not applied: restart {command} to apply",
            settings=names(changed),
        )


def names(values: Iterable[str]) -> str:
    """Parameter names as a file spells them: max_upload_rate -> max-upload-rate."""
    return ", ".join(sorted(v.replace("_", "-") for v in values))
