"""A quick swarm experiment on loopback, with libtorrent's own rate limits standing in for
shaped links: server upload and every agent's download and upload capped at --rate MB/s.
Server and agents run secure, as a user gets them: the agents enroll with a join token, and
the pieces go over libtorrent SSL torrents.

    .venv/bin/python bench/swarm_loopback.py --hosts 2 4 8 --size-mib 64 --rate 12.5

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.agents import AgentProcess, wait_for_states
from tests.support.archives import layer_tar, random_bytes, write_legacy_archive
from tests.support.server import ServerProcess, docketctl


def one(n: int, size: int, rate: int, seed: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="swarm-") as tmp:
        root = Path(tmp)
        server = ServerProcess(
            data_dir=root / "server",
            extra_args=["--max-upload-rate", str(rate), "--log-level", "warning"],
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
            lines = result.stdout.splitlines()
            if not lines:
                raise RuntimeError(f"docketctl rollout exited {result.returncode}: {result.stderr}")
            summary = json.loads(lines[-1])["summary"]
            assert summary["state"] == "succeeded", summary
            sent = sum(h["server_bytes"] for h in summary["hosts"]) / len(data)
            return took, sent
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
    args = parser.parse_args()
    rate = int(args.rate * 1e6)
    size = args.size_mib << 20
    tmin = size / rate
    print("N | Docket s | T_min s | ratio | server sent / size")
    print("--- | --- | --- | --- | ---")
    for n in args.hosts:
        runs = [one(n, size, rate, seed) for seed in range(args.runs)]
        took = statistics.median(r[0] for r in runs)
        sent = statistics.median(r[1] for r in runs)
        print(f"{n} | {took:.1f} | {tmin:.1f} | {took / tmin:.2f} | {sent:.2f}", flush=True)


if __name__ == "__main__":
    main()
