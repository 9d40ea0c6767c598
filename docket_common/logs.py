"""One logging setup for every entry point: structlog, console on a TTY, JSON otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

_level = [logging.INFO]  # the level in effect: set_log_level changes it live (SIGHUP)


def _numeric(level: str) -> int:
    return logging.getLevelNamesMapping().get(level.upper(), logging.INFO)


_METHODS = {"exception": logging.ERROR, "warn": logging.WARNING, "fatal": logging.CRITICAL}


def _below_level(
    _logger: object, method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    if (_METHODS.get(method) or _numeric(method)) < _level[0]:
        raise structlog.DropEvent
    return event


def set_log_level(level: str) -> None:
    """Changes the level of every logger from now on (loggers are cached: the filter reads
    this level at each call)."""
    _level[0] = _numeric(level)
    logging.getLogger().setLevel(max(_level[0], logging.WARNING))


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Routes structlog and stdlib logging to stderr, human-readable on a terminal."""
    if json is None:
        json = not sys.stderr.isatty()
    numeric = _numeric(level)
    _level[0] = numeric
    shared: list[structlog.types.Processor] = [
        _below_level,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(message)s"
    )
