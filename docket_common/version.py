"""The installed Docket version, as every component reports it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("docket")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"
