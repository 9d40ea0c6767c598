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
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.netns import CLUSTER, ROOT, cluster_prefix, down, namespaces

prefix = pytest.fixture(cluster_prefix)
ROLLOUT_BENCH = ROOT / "bench" / "rollout_bench.py"
PULL_BENCH = ROOT / "bench" / "pull_bench.py"
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
    assert sorted(namespaces(prefix)) == sorted(
        [f"{prefix}-br", f"{prefix}-h0", f"{prefix}-h1", f"{prefix}-h2"]
    )
    ratios = [float(m) for m in re.findall(r"\| ([0-9.]+) \|\s*$", up.stdout, re.M)]
    assert len(ratios) == 3, up.stdout
    # TCP payload is at most 95.6% of the line rate; well below means no shaping worth the
    # name, above means the limit leaks.
    assert all(0.6 < r < 1.02 for r in ratios), up.stdout
    teardown = down(prefix)
    assert teardown.returncode == 0, teardown.stderr
    assert namespaces(prefix) == []

    # The benchmark: Docket and the central registry, once each, 4 MiB to 2 hosts.
    results = tmp_path / "results.json"
    plot = tmp_path / "rollout.png"
    sizes = ["--hosts", "2", "--size-mib", "4", "--runs", "1", "--rate", "100"]
    outputs = ["--plot", str(plot), "--json", str(results), "--logs", str(tmp_path / "logs")]
    bench = _run_bench([str(ROLLOUT_BENCH), *sizes, "--prefix", prefix, *outputs], timeout=150)
    assert bench.returncode == 0, f"{bench.stdout}\n{bench.stderr[-4000:]}"
    assert namespaces(prefix) == [], "rollout_bench left namespaces behind"

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


@pytest.mark.timeout(240)
def test_pull_bench(prefix: str, tmp_path: Path) -> None:
    """bench/pull_bench.py once, 4 MiB to 2 hosts: docker pull through the agents (dockerd
    inside each host) and from the central registry both work, and the table has its row."""
    sizes = ["--hosts", "2", "--size-mib", "4", "--runs", "1", "--rate", "100"]
    argv = [str(PULL_BENCH), *sizes, "--prefix", prefix, "--plot", str(tmp_path / "pull.png")]
    bench = _run_bench([*argv, "--skip-ttfb"], timeout=200)
    assert bench.returncode == 0, f"{bench.stdout}\n{bench.stderr[-4000:]}"
    assert namespaces(prefix) == [], "pull_bench left namespaces behind"
    lines = bench.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| N | size MiB"))
    row = lines[lines.index(header) + 2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["2", "4", "100"], row
    docket_s, central_s, t_min = (float(c) for c in cells[3:6])
    assert 0 < t_min < docket_s < 60, row
    assert 0 < central_s < 60, row
    assert float(cells[8]) >= 0.9  # the server sent (about) one copy, and said so
