"""Clusters of network-namespace hosts for tests (bench/cluster.py): whether this machine
can make them, and a fixture prefix that is cleaned up afterwards, also after a killed run.

Without root, ``ip``, ``tc``, ``skopeo`` or ``docker-registry`` the tests that need a cluster
are skipped, except under CI (the ``CI`` environment variable set), where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
CLUSTER = ROOT / "bench" / "cluster.py"
#: Namespaces of a test session are ``dkts<pid>-…``: two sessions at once don't collide.
PREFIX_BASE = "dkts"


def running_under_ci() -> bool:
    """True when the CI environment variable is set (to anything but empty/0/false/no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()),
        None,
    )


def ip() -> str:
    """The ``ip`` command (iproute2), also when /usr/sbin is not on PATH."""
    return _tool("ip") or "ip"


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for name, package in (
        ("ip", "iproute2"),
        ("tc", "iproute2"),
        ("skopeo", "skopeo"),
        ("docker-registry", "docker-registry"),
    ):
        if _tool(name) is None:
            return f"{name} is missing (apt-get install {package})"
    probe = subprocess.run(
        [sys.executable, str(CLUSTER), "status", "--prefix", "dktsprobe"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"ip netns does not work here: {probe.stderr.strip()[-300:]}"
    return None


def down(prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLUSTER), "down", "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def remove_stale() -> None:
    """Namespaces left by an earlier session of this test that was killed."""
    out = subprocess.run(
        [ip(), "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    for pid in {m.group(1) for m in re.finditer(rf"^{PREFIX_BASE}(\d+)-", out, re.M)}:
        if not Path(f"/proc/{pid}").exists():
            down(f"{PREFIX_BASE}{pid}")


def namespaces(prefix: str) -> list[str]:
    out = subprocess.run(
        [ip(), "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{prefix}-")]


def cluster_prefix() -> Iterator[str]:
    """A namespace prefix for one test's cluster; skips (or, under CI, fails) when this
    machine cannot make clusters. Use as a fixture."""
    reason = unavailable_reason()
    if reason is not None:
        if running_under_ci():
            pytest.fail(f"CI needs the benchmark cluster: {reason}", pytrace=False)
        pytest.skip(reason)
    remove_stale()
    name = f"{PREFIX_BASE}{os.getpid()}"
    try:
        yield name
    finally:
        down(name)
        assert namespaces(name) == [], "the cluster's namespaces were not removed"
