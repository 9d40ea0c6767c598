"""`docker pull` on N hosts at once: through their Docket agents, against a central registry,
against the lower bound, on a shaped cluster of real hosts; and the time to the first byte of
a blob an agent does not hold, on loopback.

Part 1. For each N, a cluster of N agent hosts plus a server host (bench/cluster.py: network
namespaces, every link shaped to --rate Mbit/s both ways), a dockerd inside each agent host's
namespace (so that its pulls go over that host's link), docket-server and Debian's
docker-registry in h0, and a docket-agent in each agent host. For each run a fresh image of
--size-mib random bytes (one layer) is pushed to docket-server (docketctl push) and copied,
byte for byte, to docker-registry; then:

* **Docket**: every host runs ``docker pull 127.0.0.1:5001/IMAGE`` against its own agent at
  once, timed from the start to the last pull's exit;
* **central**: every host runs ``docker pull H0:5000/IMAGE`` against docker-registry at once;
* **lower bound**: T_min = F/r with equal links (Kumar & Ross; see shared/DESIGN.md).

Both pulls are dockerd's own: download, verify, extract. The server's share is what the
pulls' records say it sent (first pieces, seed, fallback) and what h0's link counter saw.

Part 2 (loopback, no shaping): a docket-server and one agent; --ttfb-runs times, a fresh blob
of --ttfb-mib is uploaded, then fetched through the agent (not in its cache), and the time to
the response's first byte and to its end are taken; the same for the server's own registry
face (a blob on its disk).

    .venv/bin/python bench/pull_bench.py                 # N = 2 4 8, 64 MiB, 100 Mbit/s, 3 runs
    .venv/bin/python bench/pull_bench.py --hosts 2 --runs 1 --skip-ttfb
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (BENCH, ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchimage import MiB, write_random_image  # noqa: E402
from cluster import Cluster, unavailable_reason  # noqa: E402
from dockerhosts import (  # noqa: E402
    copy_image,
    engines_inside,
    pull_everywhere,
    remove_everywhere,
)
from rollout_bench import (  # noqa: E402
    CentralSide,
    DocketSide,
    log,
)

AGENT_REGISTRY = "127.0.0.1:5001"  # each agent's registry face, inside its host
MB = 1e6


@dataclass
class Run:
    seconds: float
    server_bytes: int = 0  # what the pulls' records say the server sent
    server_wire_bytes: int = 0  # h0's link counter
    cpu_busy: float = 0.0  # the machine's CPUs, busy share while the pulls ran


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_since(before: tuple[int, int]) -> float:
    busy, total = cpu_times()
    return (busy - before[0]) / max(total - before[1], 1)


@dataclass
class Row:
    n: int
    size_mib: float
    rate_mbit: float
    image_bytes: int = 0
    docket: list[Run] = field(default_factory=list)
    central: list[Run] = field(default_factory=list)

    @property
    def t_min(self) -> float:
        return self.image_bytes * 8 / (self.rate_mbit * 1e6)


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def results_table(rows: Sequence[Row]) -> str:
    lines = [
        "| N | size MiB | rate Mbit/s | Docket s | central s | T_min s | Docket/T_min | "
        "central/Docket | server sent / size | CPU busy, Docket / central |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        docket = med([x.seconds for x in r.docket])
        central = med([x.seconds for x in r.central])
        sent = med([x.server_bytes / r.image_bytes for x in r.docket]) if r.image_bytes else 0
        busy = med([x.cpu_busy for x in r.docket]) * 100
        busy_central = med([x.cpu_busy for x in r.central]) * 100
        lines.append(
            f"| {r.n} | {r.size_mib:g} | {r.rate_mbit:g} | {docket:.2f} | {central:.2f} | "
            f"{r.t_min:.2f} | {docket / r.t_min:.2f} | {central / docket:.2f} | {sent:.2f} | "
            f"{busy:.0f}% / {busy_central:.0f}% |"
        )
    return "\n".join(lines)


def bench_one(n: int, args: argparse.Namespace, logs: Path, work: Path) -> Row:
    row = Row(n=n, size_mib=args.size_mib, rate_mbit=args.rate)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(Cluster(n, args.rate, args.prefix))
        log(f"N={n}: cluster up")
        data = work / f"N{n}"
        data.mkdir()
        stack.callback(shutil.rmtree, data, True)
        h0 = cluster.server
        hosts = cluster.agents[:n]
        engines = stack.enter_context(engines_inside(hosts, h0))
        docket = DocketSide(cluster, n, data, logs, registry=True)
        stack.callback(docket.stop)
        central = CentralSide(cluster, n, data, logs)
        stack.callback(central.stop)
        central.start()
        docket.start()
        for run in range(args.runs):
            tag = f"bench/p{int(args.size_mib)}m:n{n}-run{run}-{secrets.token_hex(4)}"
            image = write_random_image(data / f"image-{run}.tar", tag, int(args.size_mib * MiB))
            row.image_bytes = image.size_bytes
            docket.push(image)
            h0.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--copy",
                    "127.0.0.1:5000",
                    central.registry,
                    tag,
                ],
                timeout=600,
                env=docket.env(),
            )
            image.path.unlink()
            ordered = [engines[h.index] for h in hosts]
            before = h0.link_counters()["tx_bytes"]
            cpu = cpu_times()
            seconds = pull_everywhere(
                ordered, [f"{AGENT_REGISTRY}/{tag}"] * n, logs, f"N{n}-run{run}-docket"
            )
            busy = busy_since(cpu)
            wire = h0.link_counters()["tx_bytes"] - before
            pulls = json.loads(
                docket.docketctl("pulls", "-o", "json", "--limit", "200").stdout or "[]"
            )
            mine = [p for p in pulls if p["image"] == tag]
            sent = sum(p["server_bytes"] + p["fallback_bytes"] for p in mine)
            row.docket.append(Run(seconds, sent, wire, busy))
            log(
                f"N={n} run {run + 1}: docker pull through agents {seconds:.2f}s "
                f"(server sent {sent / image.size_bytes:.2f}x)"
            )
            remove_everywhere(ordered, f"{AGENT_REGISTRY}/{tag}")  # its layers too
            if args.skip_central:
                continue
            before = h0.link_counters()["tx_bytes"]
            cpu = cpu_times()
            seconds = pull_everywhere(
                ordered, [f"{central.registry}/{tag}"] * n, logs, f"N{n}-run{run}-central"
            )
            wire = h0.link_counters()["tx_bytes"] - before
            row.central.append(Run(seconds, 0, wire, busy_since(cpu)))
            log(f"N={n} run {run + 1}: docker pull from docker-registry {seconds:.2f}s")
            remove_everywhere(ordered, f"{central.registry}/{tag}")
    return row


def plot(rows: Sequence[Row], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ns = [r.n for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(
        ns, [med([x.seconds for x in r.docket]) for r in rows], "o-", label="docker pull via agents"
    )
    ax.plot(
        ns,
        [med([x.seconds for x in r.central]) for r in rows],
        "s--",
        label="docker pull, central registry",
    )
    ax.plot(ns, [r.t_min for r in rows], ":", label="T_min (lower bound)")
    ax.set_xlabel("hosts pulling at once (N)")
    ax.set_ylabel("seconds until the last host has the image")
    ax.set_xticks(ns)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# -- part 2 -----------------------------------------------------------------------------------


def ttfb_part(size_mib: int, runs: int, tmp: Path) -> list[tuple[str, list[float], list[float]]]:
    import requests

    from tests.support.agents import AgentProcess, wait_for_states
    from tests.support.server import ServerProcess

    server = ServerProcess(data_dir=tmp / "ttfb-server").start()
    agent = AgentProcess(server=server, data_dir=tmp / "ttfb-agent", name="ttfb").start()
    docket = requests.Session()  # the server's registry face: TLS, the admin's token
    docket.trust_env = False  # $REQUESTS_CA_BUNDLE would replace the CA below
    docket.verify = str(server.ca_path)
    docket.auth = ("docket", server.admin_token)
    through: tuple[list[float], list[float]] = ([], [])
    direct: tuple[list[float], list[float]] = ([], [])
    try:
        wait_for_states(server, {"ttfb": "online"})
        for run in range(runs):
            data = os.urandom(size_mib * MiB)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            start = docket.post(f"{server.registry_url}/v2/bench/ttfb/blobs/uploads/", timeout=60)
            docket.put(
                server.registry_url + start.headers["Location"],
                params={"digest": digest},
                data=data,
                timeout=600,
            ).raise_for_status()
            for session, url, (first, whole) in (
                (
                    requests.Session(),
                    f"http://{agent.registry}/v2/bench/ttfb/blobs/{digest}",
                    through,
                ),
                (docket, f"{server.registry_url}/v2/bench/ttfb/blobs/{digest}", direct),
            ):
                began = time.monotonic()
                with session.get(url, stream=True, timeout=600) as response:
                    response.raise_for_status()
                    chunks = response.iter_content(64 * 1024)
                    received = len(next(chunks))
                    first.append(time.monotonic() - began)
                    sha = hashlib.sha256(data[:received])
                    for chunk in chunks:
                        received += len(chunk)
                    whole.append(time.monotonic() - began)
                if received != len(data):
                    raise RuntimeError(f"{url}: {received} of {len(data)} bytes")
                del sha
            log(
                f"ttfb run {run + 1}: agent {through[0][-1] * 1000:.0f} ms, "
                f"server {direct[0][-1] * 1000:.0f} ms"
            )
    finally:
        agent.stop()
        server.stop()
    return [
        ("through an agent, not in its cache", *through),
        ("the server's face, on its disk", *direct),
    ]


def ttfb_table(size_mib: int, rows: list[tuple[str, list[float], list[float]]]) -> str:
    lines = ["| GET of a blob | first byte ms | whole blob s | MB/s |", "|---|---|---|---|"]
    for name, first, whole in rows:
        rate = size_mib * MiB / MB / med(whole)
        lines.append(
            f"| {name} | {med(first) * 1000:.0f} ({min(first) * 1000:.0f}-"
            f"{max(first) * 1000:.0f}) | {med(whole):.2f} | {rate:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--copy"]:  # inside h0: copy one image between the registries
        source, dest, tag = argv[1:4]
        repository, _, version = tag.partition(":")
        copy_image(source, dest, repository, version)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--size-mib", type=float, default=64)
    parser.add_argument("--rate", type=float, default=100, help="Mbit/s on every link")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prefix", default="dkp")
    parser.add_argument("--plot", type=Path, default=BENCH / "pull.png")
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--skip-central", action="store_true", help="Docket's pulls only")
    parser.add_argument("--skip-ttfb", action="store_true")
    parser.add_argument("--ttfb-mib", type=int, default=256)
    parser.add_argument("--ttfb-runs", type=int, default=5)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like an error: the cluster and every process in it are torn down.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    logs = Path(tempfile.mkdtemp(prefix="docket-pull-bench-logs-"))
    log(f"logs: {logs}")
    with tempfile.TemporaryDirectory(prefix="docket-pull-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_cluster:
            reason = unavailable_reason()
            if reason is not None:
                print(f"cluster part skipped: {reason}")
            else:
                rows = [bench_one(n, args, logs, tmp) for n in args.hosts]
                print(
                    f"\n## docker pull on N hosts at once ({args.size_mib:g} MiB, "
                    f"{args.rate:g} Mbit/s links, medians of {args.runs})\n"
                )
                print(results_table(rows))
                if plot(
                    rows, args.plot, f"docker pull of {args.size_mib:g} MiB, {args.rate:g} Mbit/s"
                ):
                    print(f"\nplot: {args.plot}")
        if not args.skip_ttfb:
            rows2 = ttfb_part(args.ttfb_mib, args.ttfb_runs, tmp)
            print(
                f"\n## Time to the first byte, loopback ({args.ttfb_mib} MiB blob, medians of "
                f"{args.ttfb_runs}, min-max in brackets)\n"
            )
            print(ttfb_table(args.ttfb_mib, rows2))
    print(f"\nlogs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
