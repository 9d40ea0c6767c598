"""Faults that need several real hosts, on the shaped cluster (bench/cluster.py): an agent
cut off from the network in the middle of a rollout.

Needs what the benchmark cluster needs (tests/support/netns.py); skipped without it, except
under CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.netns import ROOT, cluster_prefix

sys.path.insert(0, str(ROOT / "bench"))
from benchimage import write_random_image
from cluster import Cluster
from rollout_bench import GROUP, DocketSide, venv_tool

prefix = pytest.fixture(cluster_prefix)
MiB = 1024 * 1024


def events(proc: subprocess.Popen[str]) -> Iterator[dict[str, Any]]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip():
            yield json.loads(line)


@pytest.mark.timeout(240)
def test_an_agent_cut_off_mid_rollout_does_not_hold_up_the_others(
    prefix: str, tmp_path: Path
) -> None:
    """h3 loses its link a quarter of the way in. h1 and h2 finish without it: the pieces
    only h3 had come from the server's seed once their peers stop delivering. When the link
    is back, h3 reconnects, gets its order again and finishes, without fetching again what
    it already had."""
    with Cluster(3, 100, prefix) as cluster:
        side = DocketSide(
            cluster, 3, tmp_path / "data", tmp_path, server_args=["--heartbeat-interval", "1"]
        )
        rollout: subprocess.Popen[str] | None = None
        try:
            side.start()
            image = write_random_image(tmp_path / "image.tar", "faults/cut:1", 48 * MiB)
            side.push(image)
            h3 = cluster.agents[2]
            argv = [venv_tool("docketctl"), "rollout", image.tag, "--hosts", GROUP]
            with (tmp_path / "rollout.err").open("w") as err:
                rollout = cluster.server.popen(
                    [*argv, "--prefetch-only", "-o", "json", "--timeout", "3m"],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    env=side.env(),
                )
            quarter = image.size_bytes / 4
            cut_at = back_at = 0.0  # monotonic times
            held_when_cut = 0
            ended: dict[str, float] = {}
            summary: dict[str, Any] = {}
            for event in events(rollout):
                if "summary" in event:
                    summary = event["summary"]
                    break
                host = event.get("host")
                if not isinstance(host, dict):
                    continue
                now = time.monotonic()
                if host["host"] == "h3" and not cut_at and host["done_bytes"] > quarter:
                    h3.run(["ip", "link", "set", "eth0", "down"])
                    cut_at, held_when_cut = now, host["done_bytes"]
                if host["state"] == "succeeded":
                    ended.setdefault(host["host"], now)
                if cut_at and not back_at and {"h1", "h2"} <= ended.keys():
                    h3.run(["ip", "link", "set", "eth0", "up"])
                    back_at = now
            rollout.communicate(timeout=30)
        finally:
            if rollout is not None and rollout.poll() is None:
                rollout.kill()
                rollout.communicate()
            side.stop()
    assert cut_at, "h3 never got a quarter of the image"
    assert back_at, f"h1 and h2 did not finish while h3 was cut off: {ended}"
    # The others finished soon after the cut (5.6-5.8 s here, for the 36 MiB left): they did
    # not wait for h3.
    assert max(ended["h1"], ended["h2"]) - cut_at < 15, ended
    assert rollout.returncode == 0, summary
    hosts = {h["host"]: h for h in summary["hosts"]}
    assert all(h["state"] == "succeeded" for h in hosts.values()), hosts
    # h3 resumed: what it had when cut off was not fetched again.
    assert hosts["h3"]["received_bytes"] <= image.size_bytes + 4 * MiB, hosts["h3"]
    assert held_when_cut > 0
