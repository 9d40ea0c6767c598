"""A quick swarm experiment on loopback, with libtorrent's own rate limits standing in for
shaped links: server upload and every agent's download and upload capped at --rate MB/s.
Server and agents run secure, as a user gets them: the agents enroll with a join token, and
the pieces go over libtorrent SSL torrents.

    .venv/bin/python bench/swarm_loopback.py --hosts 2 4 8 --size-mib 64 --rate 12.5

With --compare-plaintext every run is made twice, in turns (plaintext first every other run):
once secure and once with --insecure (plain torrents), and the table shows both with the
agents' and the server's CPU seconds during the rollout: where the CPU is not the limit, that
is what TLS peers cost.

    .venv/bin/python bench/swarm_loopback.py --hosts 8 --runs 3 --compare-plaintext

Settings to try go in $DOCKET_LIBTORRENT_SETTINGS (JSON). bench/rollout_bench.py on the
namespace cluster is the measurement of record; this is for fast iteration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from procstat import cpu_seconds

from tests.support.agents import AgentProcess, wait_for_states
from tests.support.archives import layer_tar, random_bytes, write_legacy_archive
from tests.support.server import ServerProcess, docketctl


@dataclass
class Run:
    seconds: float
    server_sent: float  # bytes the hosts got from the server, over the image size
    server_cpu: float  # CPU seconds during the rollout
    agents_cpu: float


def one(n: int, size: int, rate: int, seed: int, insecure: bool = False) -> Run:
    with tempfile.TemporaryDirectory(prefix="swarm-") as tmp:
        root = Path(tmp)
        server = ServerProcess(
            data_dir=root / "server",
            extra_args=["--max-upload-rate", str(rate), "--log-level", "warning"],
            insecure=insecure,
        ).start()
        agents = []
        try:
            block = random_bytes(1 << 20, seed)
            data = block * (size // len(block))
            archive = write_legacy_archive(root / "i.tar", "swarm:1", [layer_tar({"d": data})])
            assert (
                docketctl(
                    "push", "swarm:1", "--archive", str(archive.path), "-q", server=server
                ).returncode
                == 0
            )
            for i in range(n):
                agents.append(
                    AgentProcess(
                        server=server,
                        data_dir=root / f"a{i}",
                        name=f"a{i}",
                        groups=["s"],
                        extra_args=[
                            "--max-download-rate",
                            str(rate),
                            "--max-upload-rate",
                            str(rate),
                            "--log-level",
                            "warning",
                        ],
                    ).start()
                )
            wait_for_states(server, {f"a{i}": "online" for i in range(n)})
            assert server.proc is not None
            pids = [server.proc.pid, *(a.proc.pid for a in agents if a.proc is not None)]
            cpu0 = [cpu_seconds(p) for p in pids]
            start = time.monotonic()
            result = docketctl(
                "rollout",
                "swarm:1",
                "--hosts",
                "s",
                "--prefetch-only",
                "-o",
                "json",
                server=server,
                timeout=600,
            )
            took = time.monotonic() - start
            cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
            lines = result.stdout.splitlines()
            if not lines:
                raise RuntimeError(f"docketctl rollout exited {result.returncode}: {result.stderr}")
            summary = json.loads(lines[-1])["summary"]
            assert summary["state"] == "succeeded", summary
            sent = sum(h["server_bytes"] for h in summary["hosts"]) / len(data)
            return Run(took, sent, cpu[0], sum(cpu[1:]))
        finally:
            for agent in agents:
                agent.stop()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rate", type=float, default=12.5, help="MB/s")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--compare-plaintext",
        action="store_true",
        help="also run each rollout with --insecure (plain torrents), in turns",
    )
    args = parser.parse_args()
    rate = int(args.rate * 1e6)
    size = args.size_mib << 20
    tmin = size / rate
    sides = [False, True] if args.compare_plaintext else [False]
    print(
        "N | side | Docket s | T_min s | ratio | server sent / size | agents CPU s | server CPU s"
    )
    print("--- | --- | --- | --- | --- | --- | --- | ---")
    for n in args.hosts:
        runs: dict[bool, list[Run]] = {side: [] for side in sides}
        for seed in range(args.runs):
            for insecure in sides if seed % 2 == 0 else sides[::-1]:
                runs[insecure].append(one(n, size, rate, 2 * seed + insecure, insecure))
        for insecure, got in runs.items():
            took = statistics.median(r.seconds for r in got)
            sent = statistics.median(r.server_sent for r in got)
            agents_cpu = statistics.median(r.agents_cpu for r in got)
            server_cpu = statistics.median(r.server_cpu for r in got)
            print(
                f"{n} | {'plaintext' if insecure else 'TLS'} | {took:.1f} | {tmin:.1f} | "
                f"{took / tmin:.2f} | {sent:.2f} | {agents_cpu:.1f} | {server_cpu:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
