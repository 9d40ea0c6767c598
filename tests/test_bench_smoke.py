"""Smoke test of the shaped-cluster benchmark, so that bench/ does not rot.

Builds a cluster of a server host and 2 agent hosts at 100 Mbit/s (bench/cluster.py), checks
the shaping, and runs bench/rollout_bench.py once with a 4 MiB image: the Docket rollout and
the central registry's pulls must both succeed and the table must have its columns.

Needs root, ``ip netns``, ``tc``, Debian's ``skopeo`` and ``docker-registry``. Without them
the test is skipped, except under CI (the ``CI`` environment variable set), where it fails.
Every namespace it makes is removed afterwards, also when it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "bench" / "cluster.py"
ROLLOUT_BENCH = ROOT / "bench" / "rollout_bench.py"
#: Namespaces of this test are ``dkts<pid>-…``: two test sessions at once don't collide.
PREFIX_BASE = "dkts"
COLUMNS = [
    "N",
    "size MiB",
    "rate Mbit/s",
    "Docket s",
    "central s",
    "T_min s",
    "Docket/T_min",
    "central/Docket",
    "server sent / size",
]


def running_under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()),
        None,
    )


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


def _down(prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLUSTER), "down", "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _remove_stale() -> None:
    """Namespaces left by an earlier session of this test that was killed."""
    out = subprocess.run(
        [_tool("ip") or "ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    for pid in {m.group(1) for m in re.finditer(rf"^{PREFIX_BASE}(\d+)-", out, re.M)}:
        if not Path(f"/proc/{pid}").exists():
            _down(f"{PREFIX_BASE}{pid}")


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(
        [_tool("ip") or "ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{prefix}-")]


@pytest.fixture
def prefix() -> Iterator[str]:
    reason = unavailable_reason()
    if reason is not None:
        if running_under_ci():
            pytest.fail(f"CI needs the benchmark cluster: {reason}", pytrace=False)
        pytest.skip(reason)
    _remove_stale()
    name = f"{PREFIX_BASE}{os.getpid()}"
    try:
        yield name
    finally:
        _down(name)
        assert _namespaces(name) == [], "the cluster's namespaces were not removed"


def _run_bench(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Runs a bench script; on a timeout, SIGTERM first so that it tears down itself."""
    proc = subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{argv[0]} took more than {timeout:.0f}s:\n{out}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.timeout(240)
def test_cluster_shaping_and_rollout_bench(prefix: str, tmp_path: Path) -> None:
    # The cluster alone: up, shaped to 100 Mbit/s, measured.
    shape = ["--hosts", "2", "--rate", "100", "--verify", "--seconds", "1.5"]
    up = _run_bench([str(CLUSTER), "up", "--prefix", prefix, *shape], timeout=90)
    assert up.returncode == 0, up.stderr
    assert sorted(_namespaces(prefix)) == sorted(
        [f"{prefix}-br", f"{prefix}-h0", f"{prefix}-h1", f"{prefix}-h2"]
    )
    ratios = [float(m) for m in re.findall(r"\| ([0-9.]+) \|\s*$", up.stdout, re.M)]
    assert len(ratios) == 3, up.stdout
    # TCP payload is at most 95.6% of the line rate; well below means no shaping worth the
    # name, above means the limit leaks.
    assert all(0.6 < r < 1.02 for r in ratios), up.stdout
    down = _down(prefix)
    assert down.returncode == 0, down.stderr
    assert _namespaces(prefix) == []

    # The benchmark: Docket and the central registry, once each, 4 MiB to 2 hosts.
    results = tmp_path / "results.json"
    plot = tmp_path / "rollout.png"
    sizes = ["--hosts", "2", "--size-mib", "4", "--runs", "1", "--rate", "100"]
    outputs = ["--plot", str(plot), "--json", str(results), "--logs", str(tmp_path / "logs")]
    bench = _run_bench([str(ROLLOUT_BENCH), *sizes, "--prefix", prefix, *outputs], timeout=150)
    assert bench.returncode == 0, f"{bench.stdout}\n{bench.stderr[-4000:]}"
    assert _namespaces(prefix) == [], "rollout_bench left namespaces behind"

    lines = bench.stdout.splitlines()
    header = "| " + " | ".join(COLUMNS) + " |"
    assert header in lines, bench.stdout
    row = lines[lines.index(header) + 2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(COLUMNS), row
    assert cells[:3] == ["2", "4", "100"], row
    docket_s, central_s, t_min = (float(c) for c in cells[3:6])
    assert 0 < t_min < docket_s < 60, row
    assert 0 < central_s < 60, row

    data = json.loads(results.read_text())
    assert [r["n"] for r in data] == [2]
    (docket,) = data[0]["docket"]
    assert {h["host"] for h in docket["hosts"]} == {"h1", "h2"}
    assert all(h["state"] == "succeeded" for h in docket["hosts"])
    # Every host has the whole image: it came from the server's seed or from the other host.
    for h in docket["hosts"]:
        assert h["received_bytes"] >= data[0]["image_bytes"] - 1024, h
    (central,) = data[0]["central"]
    assert len(central["host_seconds"]) == 2
    # The registry sent the image once per host (plus headers).
    assert central["server_wire_bytes"] >= 2 * data[0]["image_bytes"]

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert plot.stat().st_size > 0
