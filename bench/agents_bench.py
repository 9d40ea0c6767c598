"""How one docket-server copes with many agent streams.

Opens N simulated agent streams (each on its own mutual-TLS connection to the agent port, with
its own certificate, as real agents are) against a fresh docket-server process, and prints: how
long until every agent is welcomed, the spread of welcome latencies, and the server's CPU and
memory while the fleet only heartbeats. All N agents are enrolled (join token, CSR, signed
certificate) first, outside the timed part: the times are N agents connecting at once with the
certificates they already hold (TLS handshakes included), not N enrolling.

    .venv/bin/python bench/agents_bench.py            # N = 100 and 1000
    .venv/bin/python bench/agents_bench.py --agents 100 500 2000 --steady 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from procstat import cpu_seconds

from docket_common.pb import agent_service_pb2_grpc as pb_grpc
from tests.support.agents import SimIdentity, SimulatedAgent, agent_channel, enroll
from tests.support.server import ServerProcess


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def enroll_all(server: ServerProcess, names: list[str]) -> list[SimIdentity]:
    """Enrolls every name (a few at a time), as each agent's first start would."""
    server.join_token()  # made once, before the concurrent enrollments use it
    limit = asyncio.Semaphore(32)

    async def one(name: str) -> SimIdentity:
        async with limit:
            return await enroll(server, name)

    return await asyncio.gather(*(one(name) for name in names))


async def run_one(count: int, steady: float, heartbeat: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="docket-bench-") as tmp:
        server = ServerProcess(
            data_dir=Path(tmp) / "server",
            extra_args=["--heartbeat-interval", str(heartbeat), "--log-level", "warning"],
        ).start()
        assert server.proc is not None
        pid = server.proc.pid
        names = [f"sim{i:05d}" for i in range(count)]
        enroll_started = time.monotonic()
        identities = await enroll_all(server, names)
        enroll_s = time.monotonic() - enroll_started
        await asyncio.sleep(1)  # let the enrollment burst settle
        idle_rss = rss_bytes(pid)
        channels = [agent_channel(server, identity) for identity in identities]
        sims = [
            SimulatedAgent(pb_grpc.AgentServiceStub(ch), identity.name)
            for identity, ch in zip(identities, channels, strict=True)
        ]
        latencies: list[float] = []

        async def timed(sim: SimulatedAgent) -> None:
            start = time.monotonic()
            await sim.welcomed.wait()
            latencies.append(time.monotonic() - start)

        started = time.monotonic()
        tasks = [asyncio.create_task(s.run()) for s in sims]
        await asyncio.wait_for(asyncio.gather(*(timed(s) for s in sims)), 300)
        connect_all = time.monotonic() - started
        refused = sum(1 for s in sims if s.welcome is None)
        await asyncio.sleep(min(steady, 5))  # let the connection burst settle
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(steady)
        cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        rss = rss_bytes(pid)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        server.stop()
        latencies.sort()
        return {
            "agents": count,
            "refused": refused,
            "enroll_s": enroll_s,
            "connect_all_s": connect_all,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "cpu_pct": 100 * cpu,
            "rss_mb": rss / 1e6,
            "per_agent_kb": (rss - idle_rss) / count / 1e3,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of steady state")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat interval, s")
    args = parser.parse_args()
    rows = [asyncio.run(run_one(n, args.steady, args.heartbeat)) for n in args.agents]
    print(
        f"\nheartbeat every {args.heartbeat:g}s; steady state measured over {args.steady:g}s; "
        f"{os.cpu_count()} cores; every agent is enrolled first, outside the timed part "
        f"(that took 'enrolled s'), then all connect at once over mutual TLS"
    )
    header = (
        "agents",
        "refused",
        "enrolled s",
        "all welcomed s",
        "welcome p50 ms",
        "p99 ms",
        "server CPU % (1 core)",
        "server RSS MB",
        "RSS per agent kB",
    )
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(
            f"{r['agents']:.0f} | {r['refused']:.0f} | {r['enroll_s']:.2f} | "
            f"{r['connect_all_s']:.2f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['cpu_pct']:.1f} | {r['rss_mb']:.0f} | "
            f"{r['per_agent_kb']:.0f}"
        )


if __name__ == "__main__":
    main()
