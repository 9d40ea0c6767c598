"""How one docket-server copes with many agent streams.

Opens N simulated agent streams (each on its own mutual-TLS connection to the agent port, with
its own certificate, as real agents are) against a fresh docket-server process, and prints: how
long until every agent is welcomed, the spread of welcome latencies, and the server's CPU and
memory while the fleet only heartbeats (at the interval the server's heartbeats set: past
2,500 agents it grows with the fleet). All N agents are enrolled (join token, CSR, signed
certificate) first, outside the timed part: the times are N agents connecting at once with the
certificates they already hold (TLS handshakes included), not N enrolling.

The simulated agents run on the same machine as the server, spread over several client
processes (tests/support/sim_fleet.py; ``--processes``, by default one per 2500 agents), so
that one client's event loop is not what is measured. The table says how much CPU the
clients used while connecting and how busy the whole machine was, to tell which side was the
limit.

    .venv/bin/python bench/agents_bench.py            # N = 100, 1000 and 10000
    .venv/bin/python bench/agents_bench.py --agents 100 500 2000 --steady 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from procstat import cpu_seconds

from tests.support.server import ServerProcess
from tests.support.sim_fleet import SimFleet, raise_fd_limit


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return float(sum(fields) - idle), float(sum(fields))


def log_warnings(server: ServerProcess) -> dict[str, int]:
    """The server's warnings and errors, counted by message (the log is JSON lines)."""
    counts: dict[str, int] = {}
    try:
        lines = server.log_path.read_text().splitlines()
    except FileNotFoundError:
        return counts
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("warning", "error", "critical"):
            key = str(entry.get("event"))[:100]
            counts[key] = counts.get(key, 0) + 1
    return counts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] if ordered else float("nan")


async def run_one(count: int, steady: float, heartbeat: float, processes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="docket-bench-") as tmp:
        server = ServerProcess(
            data_dir=Path(tmp) / "server",
            extra_args=["--heartbeat-interval", str(heartbeat), "--log-level", "warning"],
        ).start()
        assert server.proc is not None
        pid = server.proc.pid
        names = [f"sim{i:05d}" for i in range(count)]
        fleet = SimFleet(server, names, processes)
        try:
            enroll_s = await fleet.start()
            await asyncio.sleep(1)  # let the enrollment burst settle
            idle_rss = rss_bytes(pid)
            clients0 = sum(cpu_seconds(p) for p in fleet.pids)
            server0 = cpu_seconds(pid)
            busy0 = machine_busy()
            started = time.monotonic()
            latencies, refused = await fleet.connect()
            connect_all = time.monotonic() - started
            busy1 = machine_busy()
            clients_connect = sum(cpu_seconds(p) for p in fleet.pids) - clients0
            server_connect = cpu_seconds(pid) - server0
            await asyncio.sleep(min(steady, 5))  # let the connection burst settle
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            clients1 = sum(cpu_seconds(p) for p in fleet.pids)
            await asyncio.sleep(steady)
            elapsed = time.monotonic() - t0
            cpu = (cpu_seconds(pid) - cpu0) / elapsed
            clients_steady = (sum(cpu_seconds(p) for p in fleet.pids) - clients1) / elapsed
            rss = rss_bytes(pid)
            report = await fleet.report()
            ended, errors = report.ended, report.errors
        finally:
            await fleet.stop()
            server.stop()
            warnings = log_warnings(server)
        return {
            "warnings": warnings,
            "errors": errors,
            "agents": count,
            "processes": fleet.processes,
            "refused": refused,
            "ended": ended,
            "enroll_s": enroll_s,
            "connect_all_s": connect_all,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "server_connect_cpu_s": server_connect,
            "clients_connect_cpu_s": clients_connect,
            "machine_busy_pct": 100 * (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1),
            "cpu_pct": 100 * cpu,
            "clients_cpu_pct": 100 * clients_steady,
            "rss_mb": rss / 1e6,
            "per_agent_kb": (rss - idle_rss) / count / 1e3,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of steady state")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat interval, s")
    parser.add_argument(
        "--processes", type=int, default=0, help="client processes (default: one per 2500 agents)"
    )
    args = parser.parse_args()
    # The server (our child) and the clients inherit it: 10,000 streams are 10,000 sockets.
    limit = raise_fd_limit()
    rows = []
    for n in args.agents:
        processes = args.processes or math.ceil(n / 2500)
        rows.append(asyncio.run(run_one(n, args.steady, args.heartbeat, processes)))
    print(
        f"\nheartbeat every {args.heartbeat:g}s, longer past 2,500 agents (the server paces "
        f"them); steady state measured over {args.steady:g}s; "
        f"{os.cpu_count()} cores; open files limit {limit}; every agent is enrolled first, "
        f"outside the timed part (that took 'enrolled s'), then all connect at once over "
        f"mutual TLS from the client processes"
    )
    header = (
        "agents",
        "client procs",
        "refused",
        "enrolled s",
        "all welcomed s",
        "welcome p50 ms",
        "p99 ms",
        "CPU s while connecting: server / clients",
        "machine busy %",
        "server CPU % steady (1 core)",
        "clients CPU % steady",
        "server RSS MB",
        "RSS per agent kB",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print(
            f"| {r['agents']:.0f} | {r['processes']:.0f} | {r['refused']:.0f} | "
            f"{r['enroll_s']:.2f} | {r['connect_all_s']:.2f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['server_connect_cpu_s']:.1f} / {r['clients_connect_cpu_s']:.1f} | "
            f"{r['machine_busy_pct']:.0f} | {r['cpu_pct']:.1f} | {r['clients_cpu_pct']:.1f} | "
            f"{r['rss_mb']:.0f} | {r['per_agent_kb']:.0f} |"
        )
        if r["ended"]:
            print(f"  ({r['ended']:.0f} streams were ended by the server during the run)")
        for message, n in sorted(r["errors"].items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {n} streams ended with {message}")
        for message, n in sorted(r["warnings"].items(), key=lambda kv: -kv[1])[:5]:
            print(f"  server warned {n} times: {message}")


if __name__ == "__main__":
    main()
