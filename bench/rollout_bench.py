"""Docket vs a central registry vs the lower bound, on a shaped cluster of real hosts.

For each N, a cluster of N agent hosts plus a server host (bench/cluster.py: network
namespaces, every link shaped to --rate Mbit/s both ways) and, for each run, a fresh image of
--size-mib random bytes (one layer; --layers-mib 30,15,8,4,2,1,0.5,0.1 or --layout eight for
several), which:

* **Docket**: is pushed to docket-server in h0 (docketctl push --archive, inside h0), then
  rolled out to the N agents (group ``bench``) with ``docketctl rollout --prefetch-only``
  (with --with-load: ``docketctl rollout``, loading it into a dockerd in every host), timed
  from the command's start to its exit (it exits when the last host is done);
* **central**: is pushed to Debian's docker-registry in h0, then pulled by N parallel
  ``skopeo copy docker://… dir:…``, one from each agent host (with --with-load: N parallel
  ``docker pull`` into the hosts' dockerds, of the same uncompressed layers Docket moves),
  timed from the start to the last one finishing;
* **lower bound**: T_min = F/r with equal links (Kumar & Ross; see shared/DESIGN.md).

It prints a markdown table of medians over --runs, then the time-to-runnable table: when the
last host had its last piece (from the agents' logs), the tail after it, and the CPU seconds
per GB delivered of the agents, the hosts' dockerds and the central side; then what the
server and the hosts sent, and writes a plot of time vs N (--plot). Everything it starts runs
inside the cluster's namespaces and is torn down at the end, also on Ctrl-C or an error. Logs
go to a temporary directory whose path is printed.

    .venv/bin/python bench/rollout_bench.py                      # N = 2 4 8, 64 MiB, 100 Mbit/s
    .venv/bin/python bench/rollout_bench.py --hosts 4 --size-mib 128 --runs 1
    .venv/bin/python bench/rollout_bench.py --hosts 8 --with-load --layout eight
    .venv/bin/python bench/rollout_bench.py --hosts 8 --skip-central --compare-plaintext
    .venv/bin/python bench/rollout_bench.py --hosts 4 --with-load --skip-central \
        --compare-agent-args=--load-after-download
    .venv/bin/python bench/rollout_bench.py --matrix --json ttr.json   # issue 14, ~45 min

Docket runs as a user gets it: TLS, tokens, enrolled agents and SSL torrents.
--compare-plaintext also runs each rollout on a second server and agents with --insecure;
--compare-agent-args "ARGS" on a second TLS server and agents started with ARGS as well. The
fleets take turns, the first one first in even runs and last in odd ones (ABBA).
--matrix runs issue 14's whole matrix (see `matrix_groups`), one cluster per N and rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchimage import (  # noqa: E402
    LAYOUTS,
    MiB,
    RandomImage,
    layers_label,
    parse_layers,
    write_random_image,
)
from cluster import Cluster, Host, unavailable_reason  # noqa: E402
from dockerhosts import (  # noqa: E402
    EngineCPU,
    engines_inside,
    pull_everywhere_timed,
    remove_everywhere,
)
from procstat import cpu_seconds, machine_busy, machine_jiffies  # noqa: E402

from tests.support.registry import ReferenceRegistry  # noqa: E402

if TYPE_CHECKING:
    from tests.support.dockerd import DockerEngine

VENV_BIN = Path(sys.executable).parent
SERVER_PORT = 7800
SERVER_BT_PORT = 7881
SERVER_AGENT_PORT = 7801
PLAINTEXT_PORT_OFFSET = 100  # --compare-plaintext: the plaintext side's ports
COMPARE_PORT_OFFSET = 200  # --compare-agent-args: the second TLS side's ports
AGENT_BT_PORT = 6881
AGENT_REGISTRY_PORT = 5001  # the agents' registry face, inside each host, when on
REGISTRY_PORT = 5000
GROUP = "bench"
DUPLICATE = "duplicate peer-id"  # libtorrent's reason for a connection it closed as a duplicate

TABLE_COLUMNS = (
    "N",
    "size MiB",
    "rate Mbit/s",
    "Docket s",
    "central s",
    "T_min s",
    "Docket/T_min",
    "central/Docket",
    "server sent / size",
)


def venv_tool(name: str) -> str:
    path = VENV_BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (pip install -e . in the venv)")
    return str(path)


def system_tool(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()), None
    )
    if found is None:
        raise FileNotFoundError(f"{name} is missing (apt-get install {package})")
    return found


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def listening(host: Host, port: int) -> bool:
    out = host.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


# -- results ----------------------------------------------------------------------------------

GB = 1e9


@dataclass(frozen=True)
class Case:
    """One kind of rollout: the image (one layer of size_mib, or layers_mib), prefetch or
    loaded, and how many runs of Docket and of the central registry."""

    size_mib: float
    layers_mib: tuple[float, ...] = ()
    loaded: bool = False
    runs: int = 3
    central_runs: int = 3

    @property
    def total_mib(self) -> float:
        return sum(self.layers_mib) if self.layers_mib else self.size_mib

    @property
    def layer_count(self) -> int:
        return max(1, len(self.layers_mib))

    @property
    def image(self) -> str:
        return layers_label(self.layers_mib, self.size_mib)

    @property
    def mode(self) -> str:
        return "loaded" if self.loaded else "prefetch"

    @property
    def key(self) -> str:
        return f"{self.total_mib:g}m{self.layer_count}l-{self.mode}"

    @property
    def central_kind(self) -> str:
        return "docker pull" if self.loaded else "skopeo"

    def write(self, path: Path, tag: str) -> RandomImage:
        layers = [int(size * MiB) for size in self.layers_mib] if self.layers_mib else None
        return write_random_image(path, tag, int(self.size_mib * MiB), layers=layers)


@dataclass
class DocketRun:
    seconds: float  # docketctl rollout: start to exit
    rollout_seconds: float | None  # the rollout's create_time to end_time, on the server
    image_bytes: int
    hosts: list[dict[str, Any]]
    server_wire_bytes: int  # h0's eth0 tx bytes during the rollout (headers included)
    agents_wire_bytes: int  # the agent hosts' eth0 tx bytes during the rollout
    server_cpu: float = 0.0  # docket-server's CPU seconds during the rollout
    agents_cpu: float = 0.0  # the agents' CPU seconds during the rollout, summed
    # From the agents' logs, seconds from the rollout's start (wall clock) to the moment the
    # last host had all its bytes (its last piece in: "blobs in the cache" less verify_s),
    # had them verified in its cache, and had the image loaded. None: not in the logs.
    last_piece_seconds: float | None = None
    cached_seconds: float | None = None
    loaded_seconds: float | None = None
    dockerd_cpu: float | None = None  # the hosts' dockerds (and children), when loading
    # The share of the machine's cores busy during the rollout (every process, the kernel's
    # network shaping too): near 1, the run is bound by this machine's CPU, not its links.
    machine_busy: float | None = None
    # The rollout's create_time (server clock, the same machine's) less the command's start:
    # docketctl's start-up and the CreateRollout call, before any order goes out.
    created_seconds: float | None = None
    side: str = "TLS"
    loaded: bool = False
    agent_events: list[dict[str, Any]] = field(default_factory=list)  # per host, from logs

    @property
    def server_bytes(self) -> int:
        return sum(int(h["server_bytes"]) for h in self.hosts)

    @property
    def fallback_bytes(self) -> int:
        return sum(int(h["fallback_bytes"]) for h in self.hosts)

    @property
    def peer_bytes(self) -> int:
        return sum(int(h["peer_bytes"]) for h in self.hosts)

    @property
    def duplicates(self) -> int:
        """Peer connections the hosts closed as duplicates while fetching, from their logs:
        a second connection to a peer already connected (two hosts whose dials crossed;
        when both close their incoming one, neither connection is left)."""
        return sum(int((e.get("disconnects") or {}).get(DUPLICATE, 0)) for e in self.agent_events)

    @property
    def tail_seconds(self) -> float | None:
        """What comes after the bytes: the rollout's time less the last piece's."""
        if self.last_piece_seconds is None:
            return None
        return self.seconds - self.last_piece_seconds


@dataclass
class CentralRun:
    seconds: float  # start of the N pulls to the last one finishing
    host_seconds: list[float]
    image_bytes: int
    server_wire_bytes: int
    kind: str = "skopeo"  # or "docker pull" (--with-load: into the hosts' dockerds)
    cpu: float | None = None  # the skopeo processes', or the dockerds' (and children's), CPU s


@dataclass
class Row:
    n: int
    size_mib: float
    rate_mbit: float
    image_bytes: int
    docket: list[DocketRun] = field(default_factory=list)
    central: list[CentralRun] = field(default_factory=list)
    plaintext: list[DocketRun] = field(default_factory=list)  # --compare-plaintext
    compare: list[DocketRun] = field(default_factory=list)  # --compare-agent-args
    case: Case | None = None
    compare_args: str = ""

    @property
    def t_min(self) -> float:
        return self.image_bytes * 8 / (self.rate_mbit * 1e6)

    def med(self, values: Sequence[float]) -> float:
        return statistics.median(values) if values else float("nan")

    @property
    def docket_s(self) -> float:
        return self.med([r.seconds for r in self.docket])

    @property
    def central_s(self) -> float:
        return self.med([r.seconds for r in self.central])

    @property
    def server_sent_ratio(self) -> float:
        return self.med([r.server_bytes / r.image_bytes for r in self.docket])

    @property
    def delivered_gb(self) -> float:
        """N x F, in GB: what one rollout delivers."""
        return self.n * self.image_bytes / GB

    @property
    def mode(self) -> str:
        return self.case.mode if self.case else "prefetch"

    @property
    def image(self) -> str:
        return self.case.image if self.case else layers_label((), self.size_mib)

    def last_piece_s(self, runs: Sequence[DocketRun]) -> float:
        return self.med([x.last_piece_seconds for x in runs if x.last_piece_seconds is not None])

    def tail_s(self, runs: Sequence[DocketRun]) -> float:
        return self.med([x.tail_seconds for x in runs if x.tail_seconds is not None])

    @property
    def machine_busy(self) -> float:
        """The median share of the machine's cores busy during Docket's runs."""
        return self.med([x.machine_busy for x in self.docket if x.machine_busy is not None])

    def per_gb(self, values: Sequence[float | None]) -> float:
        """The median of CPU seconds over runs, per GB delivered (N x F)."""
        known = [v for v in values if v is not None]
        if not known or not self.image_bytes:
            return float("nan")
        return statistics.median(known) / self.delivered_gb

    def summary(self) -> dict[str, Any]:
        """The medians the tables show, for --json."""

        def num(value: float) -> float | None:
            return None if value != value else round(value, 4)

        out: dict[str, Any] = {
            "docket_s": num(self.docket_s),
            "docket_over_t_min": num(self.docket_s / self.t_min) if self.image_bytes else None,
            "last_piece_s": num(self.last_piece_s(self.docket)),
            "tail_s": num(self.tail_s(self.docket)),
            "central_s": num(self.central_s),
            "central_over_docket": num(self.central_s / self.docket_s),
            "agents_cpu_s_per_gb": num(self.per_gb([x.agents_cpu for x in self.docket])),
            "dockerd_cpu_s_per_gb": num(self.per_gb([x.dockerd_cpu for x in self.docket])),
            "central_cpu_s_per_gb": num(self.per_gb([x.cpu for x in self.central])),
            "server_sent_over_size": num(self.server_sent_ratio),
            "machine_busy": num(self.machine_busy),
            "duplicate_disconnects": sum(x.duplicates for x in self.docket),
        }
        for name, side in (("plaintext", self.plaintext), ("compare", self.compare)):
            if side:
                out[name] = {
                    "docket_s": num(self.med([x.seconds for x in side])),
                    "last_piece_s": num(self.last_piece_s(side)),
                    "tail_s": num(self.tail_s(side)),
                    "agents_cpu_s_per_gb": num(self.per_gb([x.agents_cpu for x in side])),
                    "dockerd_cpu_s_per_gb": num(self.per_gb([x.dockerd_cpu for x in side])),
                }
        return out

    def to_json(self) -> dict[str, Any]:
        case = self.case
        return {
            "n": self.n,
            "image_bytes": self.image_bytes,
            "rate_mbit": self.rate_mbit,
            "t_min": self.t_min,
            "size_mib": case.total_mib if case else self.size_mib,
            "layers_mib": list(case.layers_mib) if case else [],
            "layers": case.layer_count if case else 1,
            "image": self.image,
            "mode": self.mode,
            "central_kind": case.central_kind if case else "skopeo",
            "runs": len(self.docket),
            "central_runs": len(self.central),
            "compare_agent_args": self.compare_args,
            "summary": self.summary(),
            "docket": [vars(x) for x in self.docket],
            "central": [vars(x) for x in self.central],
            "plaintext": [vars(x) for x in self.plaintext],
            "compare": [vars(x) for x in self.compare],
        }


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # NaN: not measured
        return "-"
    return f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{value * 100:.0f} %"


def markdown(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def results_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        cells = [
            str(r.n),
            f"{r.size_mib:g}",
            f"{r.rate_mbit:g}",
            fmt(r.docket_s),
            fmt(r.central_s),
            fmt(r.t_min),
            fmt(r.docket_s / r.t_min),
            fmt(r.central_s / r.docket_s),
            fmt(r.server_sent_ratio),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TTR_COLUMNS = (
    "N",
    "image",
    "rate Mbit/s",
    "mode",
    "T_min s",
    "Docket s",
    "Docket/T_min",
    "last piece s",
    "tail s",
    "central",
    "central s",
    "central/Docket",
    "agents CPU s/GB",
    "dockerd CPU s/GB",
    "central CPU s/GB",
    "machine CPU busy",
    "runs Docket/central",
)


def ttr_table(rows: Sequence[Row]) -> str:
    """Time to runnable (issue 14): medians of Docket's time, of when the last host had its
    last piece, of the tail after it, and CPU seconds per GB delivered (N x F)."""
    body = []
    for r in rows:
        central_kind = r.central[0].kind if r.central else "-"
        body.append(
            [
                str(r.n),
                r.image,
                f"{r.rate_mbit:g}",
                r.mode,
                fmt(r.t_min),
                fmt(r.docket_s),
                fmt(r.docket_s / r.t_min),
                fmt(r.last_piece_s(r.docket)),
                fmt(r.tail_s(r.docket)),
                central_kind,
                fmt(r.central_s),
                fmt(r.central_s / r.docket_s),
                fmt(r.per_gb([x.agents_cpu for x in r.docket]), 1),
                fmt(r.per_gb([x.dockerd_cpu for x in r.docket]), 1),
                fmt(r.per_gb([x.cpu for x in r.central]), 1),
                percent(r.machine_busy),
                f"{len(r.docket)}/{len(r.central)}",
            ]
        )
    return markdown(TTR_COLUMNS, body)


def compare_table(rows: Sequence[Row]) -> str:
    """--compare-agent-args: fleet A (as started) and fleet B (with the extra agent
    arguments), the same kind of rollout in turns, side by side."""
    head = (
        "N",
        "image",
        "mode",
        "A s",
        "B s",
        "B/A",
        "A last piece s",
        "B last piece s",
        "A tail s",
        "B tail s",
        "agents CPU s/GB A / B",
        "dockerd CPU s/GB A / B",
        "A runs",
        "B runs",
    )
    body = []
    for r in rows:
        if not r.compare:
            continue
        a = r.med([x.seconds for x in r.docket])
        b = r.med([x.seconds for x in r.compare])
        cpu = [fmt(r.per_gb([x.agents_cpu for x in side]), 1) for side in (r.docket, r.compare)]
        dockerd = [
            fmt(r.per_gb([x.dockerd_cpu for x in side]), 1) for side in (r.docket, r.compare)
        ]
        body.append(
            [
                str(r.n),
                r.image,
                r.mode,
                fmt(a),
                fmt(b),
                fmt(b / a, 3),
                fmt(r.last_piece_s(r.docket)),
                fmt(r.last_piece_s(r.compare)),
                fmt(r.tail_s(r.docket)),
                fmt(r.tail_s(r.compare)),
                " / ".join(cpu),
                " / ".join(dockerd),
                ", ".join(f"{x.seconds:.2f}" for x in r.docket),
                ", ".join(f"{x.seconds:.2f}" for x in r.compare),
            ]
        )
    return markdown(head, body)


def tls_table(rows: Sequence[Row]) -> str:
    """--compare-plaintext: the same rollouts with TLS on (the default) and with --insecure,
    run in turns on the same cluster."""
    lines = [
        "| N | TLS s (median) | plaintext s (median) | TLS / plaintext | TLS runs "
        "| plaintext runs | agents CPU s TLS / plaintext | server CPU s TLS / plaintext |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.plaintext:
            continue
        tls = r.med([x.seconds for x in r.docket])
        plain = r.med([x.seconds for x in r.plaintext])
        agents = [r.med([x.agents_cpu for x in side]) for side in (r.docket, r.plaintext)]
        server = [r.med([x.server_cpu for x in side]) for side in (r.docket, r.plaintext)]
        lines.append(
            f"| {r.n} | {fmt(tls)} | {fmt(plain)} | {fmt(tls / plain, 3)} | "
            + ", ".join(f"{x.seconds:.2f}" for x in r.docket)
            + " | "
            + ", ".join(f"{x.seconds:.2f}" for x in r.plaintext)
            + f" | {fmt(agents[0])} / {fmt(agents[1])} | {fmt(server[0])} / {fmt(server[1])} |"
        )
    return "\n".join(lines)


def row_name(r: Row, cases: bool) -> str:
    """N, or with several kinds of rollout in one invocation, N and the kind."""
    if not cases or r.case is None:
        return str(r.n)
    return f"{r.n} ({r.image}, {r.mode}, {r.rate_mbit:g} Mbit/s)"


def details_table(rows: Sequence[Row], cases: bool = False) -> str:
    """Who sent what, medians over runs, as fractions of the image size F."""
    head = (
        "N",
        "runs",
        "Docket s (all runs)",
        "rollout s (server clock)",
        "from server / F",
        "from peers / F",
        "fallback / F",
        "h0 NIC sent / F (Docket)",
        "agents' NICs sent / F",
        "h0 NIC sent / F (central)",
        "central per-host s (min-max)",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d, c = r.docket, r.central

        def m(values: list[float]) -> str:
            return fmt(statistics.median(values)) if values else "-"

        rollout = [x.rollout_seconds for x in d if x.rollout_seconds is not None]
        spread = (
            f"{min(min(x.host_seconds) for x in c):.1f}-{max(max(x.host_seconds) for x in c):.1f}"
            if c
            else "-"
        )
        cells = [
            row_name(r, cases),
            str(max(len(d), len(c))),
            ", ".join(f"{x.seconds:.1f}" for x in d) or "-",
            m(rollout),
            m([x.server_bytes / x.image_bytes for x in d]),
            m([x.peer_bytes / x.image_bytes for x in d]),
            m([x.fallback_bytes / x.image_bytes for x in d]),
            m([x.server_wire_bytes / x.image_bytes for x in d]),
            m([x.agents_wire_bytes / x.image_bytes for x in d]),
            m([x.server_wire_bytes / x.image_bytes for x in c]),
            spread,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hosts_table(rows: Sequence[Row], cases: bool = False) -> str:
    """Each host's share in the last Docket run of every N."""
    lines = [
        "| N | host | s | from server MB | from peers MB | fallback MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.docket:
            continue
        for h in r.docket[-1].hosts:
            lines.append(
                f"| {row_name(r, cases)} | {h['host']} | {fmt(h['seconds'] or float('nan'), 1)} | "
                f"{h['server_bytes'] / 1e6:.1f} | {h['peer_bytes'] / 1e6:.1f} | "
                f"{h['fallback_bytes'] / 1e6:.1f} |"
            )
    return "\n".join(lines)


# -- Docket ----------------------------------------------------------------------------------


class DocketSide:
    """docket-server in h0 and one docket-agent in each agent host."""

    def __init__(
        self,
        cluster: Cluster,
        n: int,
        data: Path,
        logs: Path,
        *,
        with_load: bool = False,
        docker_hosts: dict[int, str] | None = None,
        server_args: Sequence[str] = (),
        insecure: bool = False,
        port_offset: int = 0,
        registry: bool = False,
        agent_args: Sequence[str] = (),
        label: str | None = None,
        engines: dict[int, DockerEngine] | None = None,
        log_prefix: str | None = None,
    ) -> None:
        """Secure as a user gets it (TLS, tokens, enrolled agents, SSL torrents); with
        ``insecure``, all of that off. ``port_offset`` moves every port, so that a second
        side can run beside the first in the same cluster. ``registry``: the server's and the
        agents' registry faces on (127.0.0.1:5000 in h0, 127.0.0.1:5001 in each host).
        ``label`` names the side in logs and tables (default TLS or plaintext); ``engines``:
        the hosts' dockerds, whose CPU is measured during loaded rollouts (and, without
        ``docker_hosts``, the agents' $DOCKER_HOST); ``log_prefix``: the start of every log
        file's name (default N<n>)."""
        self.server_args = list(server_args)
        self.agent_args = list(agent_args)
        self.cluster = cluster
        self.n = n
        self.insecure = insecure
        self.label = label or ("plaintext" if insecure else "TLS")
        self.data = data / self.label.lower()
        self.data.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.tag = f"{log_prefix or f'N{n}'}-{self.label}"
        self.with_load = with_load
        self.engines = engines or {}
        self.docker_hosts = docker_hosts or {i: e.host for i, e in self.engines.items()}
        self.port_offset = port_offset
        self.registry = registry
        self.server_address = f"{cluster.server.ip}:{SERVER_PORT + port_offset}"
        self.procs: list[subprocess.Popen[Any]] = []
        self.names: dict[int, str] = {}  # pid: what it is, for error messages

    @property
    def server_data(self) -> Path:
        return self.data / "server"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DOCKET_SERVER"] = self.server_address
        env.pop("DOCKER_HOST", None)
        token = self.server_data / "admin.token"
        if not self.insecure and token.exists():
            env["DOCKET_TOKEN"] = token.read_text().strip()
            env["DOCKET_CA"] = str(self.server_data / "ca.pem")
        return env

    def ctl_args(self) -> list[str]:
        return [venv_tool("docketctl"), *(["--insecure"] if self.insecure else [])]

    def docketctl(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.cluster.server.run(
            [*self.ctl_args(), *args], check=False, timeout=timeout, env=self.env()
        )

    def start(self) -> None:
        h0 = self.cluster.server
        server_log = (self.logs / f"{self.tag}-docket-server.log").open("ab")
        security = (
            ["--insecure"]
            if self.insecure
            else ["--agent-listen", f"{h0.ip}:{SERVER_AGENT_PORT + self.port_offset}"]
        )
        self.procs.append(
            h0.popen(
                [
                    venv_tool("docket-server"),
                    "--listen",
                    self.server_address,
                    "--bt-listen",
                    f"{h0.ip}:{SERVER_BT_PORT + self.port_offset}",
                    *([] if self.registry else ["--registry-listen", "off"]),
                    *security,
                    "--data-dir",
                    str(self.server_data),
                    "--log-level",
                    "info",
                    *self.server_args,
                ],
                stdout=server_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
            )
        )
        server_log.close()
        self.names[self.procs[-1].pid] = f"{self.label} docket-server"
        wait_for(
            "docket-server to listen",
            lambda: self._alive() and listening(h0, SERVER_PORT + self.port_offset),
            60,
        )
        joining: list[str] = ["--insecure"]
        if not self.insecure:
            made = self.docketctl("tokens", "create", "--role", "agent", "--group", GROUP)
            if made.returncode != 0:
                raise RuntimeError(f"docketctl tokens create failed: {made.stderr.strip()}")
            ca = str(self.server_data / "ca.pem")
            joining = ["--join-token", made.stdout.strip(), "--ca", ca]
        for host in self.cluster.agents[: self.n]:
            env = self.env()
            argv = [
                venv_tool("docket-agent"),
                "--server",
                self.server_address,
                *joining,
                *self._agent_registry_args(),
                "--bt-listen",
                f"{host.ip}:{AGENT_BT_PORT + self.port_offset}",
                "--data-dir",
                str(self.data / host.name),
                "--name",
                host.name,
                "--group",
                GROUP,
                "--log-level",
                "info",
                *self.agent_args,
            ]
            if self.with_load:
                env["DOCKER_HOST"] = self.docker_hosts[host.index]
            else:
                argv.append("--no-docker")
            agent_log = (self.logs / f"{self.tag}-{host.name}-agent.log").open("ab")
            self.procs.append(
                host.popen(
                    argv,
                    stdout=agent_log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            )
            agent_log.close()
            self.names[self.procs[-1].pid] = f"{self.label} docket-agent in {host.name}"
        wait_for(f"{self.n} {self.label} agents online", self._all_online, 90, interval=0.5)

    def _agent_registry_args(self) -> list[str]:
        """The agents' registry face: on with ``registry``, and otherwise on at a port of this
        side's unless the agent arguments say where: the default --load-via auto has the
        engine pull small images from it."""
        if self.registry:
            return []
        args = " ".join(self.agent_args).replace("=", " ").split()
        if "--registry-listen" in args:
            return []
        return ["--registry-listen", f"127.0.0.1:{AGENT_REGISTRY_PORT + self.port_offset}"]

    def _alive(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                name = self.names.get(proc.pid, "a process")
                raise RuntimeError(f"{name} exited {proc.returncode}; see the logs in {self.logs}")
        return True

    def _all_online(self) -> bool:
        self._alive()
        result = self.docketctl("agents", "--hosts", GROUP, "-o", "json", timeout=30)
        if result.returncode != 0:
            return False
        agents = json.loads(result.stdout)
        online = {a["name"] for a in agents if a["state"] == "online"}
        return online >= {h.name for h in self.cluster.agents[: self.n]}

    def push(self, image: RandomImage) -> None:
        result = self.docketctl("push", image.tag, "--archive", str(image.path), "-q")
        if result.returncode != 0:
            raise RuntimeError(f"docketctl push failed: {result.stderr.strip()}")

    def rollout(
        self, image: RandomImage, run: int, *, load: bool | None = None, name: str | None = None
    ) -> DocketRun:
        """Rolls `image` out to every agent (loading it with ``load``, default the side's
        with_load) and measures it; ``name`` names its log files (default run<run>)."""
        load = self.with_load if load is None else load
        h0 = self.cluster.server
        agents = self.cluster.agents[: self.n]
        args = [*self.ctl_args(), "rollout", image.tag, "--hosts", GROUP, "-o", "json"]
        args += ["--timeout", "15m"]
        if not load:
            args.append("--prefetch-only")
        before_h0 = h0.link_counters()["tx_bytes"]
        before_agents = sum(h.link_counters()["tx_bytes"] for h in agents)
        server_pid, agent_pids = self.procs[0].pid, [p.pid for p in self.procs[1:]]
        engines = [self.engines[h.index] for h in agents if h.index in self.engines]
        cpu0 = cpu_seconds(server_pid), sum(cpu_seconds(p) for p in agent_pids)
        machine0 = machine_jiffies()
        dockerd = EngineCPU(engines) if load and engines else None
        name = name or f"run{run}"
        out_path = self.logs / f"{self.tag}-{name}-rollout.jsonl"
        err_path = self.logs / f"{self.tag}-{name}-rollout.err"
        with out_path.open("w") as out, err_path.open("w") as err:
            wall_start = time.time()
            started = time.monotonic()
            proc = h0.popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env())
            code = proc.wait(timeout=20 * 60)
            seconds = time.monotonic() - started
        busy = machine_busy(machine0, machine_jiffies())
        server_cpu = cpu_seconds(server_pid) - cpu0[0]
        agents_cpu = sum(cpu_seconds(p) for p in agent_pids) - cpu0[1]
        dockerd_cpu = dockerd.stop() if dockerd is not None else None
        server_wire = h0.link_counters()["tx_bytes"] - before_h0
        agents_wire = sum(h.link_counters()["tx_bytes"] for h in agents) - before_agents
        summary = None
        for line in out_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and "summary" in event:
                    summary = event["summary"]
        if code != 0 or summary is None:
            raise RuntimeError(
                f"docketctl rollout exited {code} (see {out_path} and {err_path}): "
                f"{err_path.read_text().strip()[-1000:]}"
            )
        hosts = summary["hosts"]
        failed = [h["host"] for h in hosts if h["state"] != "succeeded"]
        if failed or len(hosts) != self.n:
            raise RuntimeError(f"rollout hosts not all succeeded: {failed} ({out_path})")
        if load and not all(h.get("image_id") for h in hosts):
            raise RuntimeError(f"a host reports no Docker image id ({out_path})")
        events = self.agent_events(hosts, wall_start, load)
        return DocketRun(
            seconds=seconds,
            rollout_seconds=_span(summary.get("create_time"), summary.get("end_time")),
            image_bytes=image.size_bytes,
            hosts=hosts,
            server_wire_bytes=server_wire,
            agents_wire_bytes=agents_wire,
            server_cpu=server_cpu,
            agents_cpu=agents_cpu,
            last_piece_seconds=_last([e.get("last_piece_s") for e in events]),
            cached_seconds=_last([e.get("cached_s") for e in events]),
            loaded_seconds=_last([e.get("loaded_s") for e in events]) if load else None,
            dockerd_cpu=dockerd_cpu,
            machine_busy=busy,
            created_seconds=_since(summary.get("create_time"), wall_start),
            side=self.label,
            loaded=load,
            agent_events=events,
        )

    def agent_log(self, host: Host) -> Path:
        return self.logs / f"{self.tag}-{host.name}-agent.log"

    def agent_events(
        self, hosts: Sequence[dict[str, Any]], wall_start: float, load: bool
    ) -> list[dict[str, Any]]:
        """Per host, what its agent logged about its order: when its last piece came in
        ("blobs in the cache" less its verify_s), when the blobs were verified in the cache and
        when the image was loaded, in seconds from `wall_start` (the bench's wall clock, the
        agents' too: one machine), with the durations the agent logged."""
        by_name = {h.name: h for h in self.cluster.agents[: self.n]}
        deadline = time.monotonic() + 3  # the last lines may still be on their way
        while True:
            out = [self._host_events(by_name[h["host"]], h, wall_start) for h in hosts]
            complete = all(e["last_piece_s"] is not None for e in out) and (
                not load or all(e.get("loaded_s") is not None for e in out)
            )
            if complete or time.monotonic() > deadline:
                return out
            time.sleep(0.2)

    def _host_events(
        self, host: Host, summary: dict[str, Any], wall_start: float
    ) -> dict[str, Any]:
        order = summary.get("order_id")
        found: dict[str, Any] = {"host": host.name, "order": order, "last_piece_s": None}
        with contextlib.suppress(OSError):
            for line in self.agent_log(host).read_text(errors="replace").splitlines():
                if order is None or f'"{order}"' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if not isinstance(event, dict) or event.get("order") != order:
                        continue
                    at = _wall(event.get("timestamp"))
                    if at is None:
                        continue
                    if event.get("event") == "blobs in the cache":
                        verify = float(event.get("verify_s") or 0.0)
                        found["cached_s"] = round(at - wall_start, 3)
                        found["last_piece_s"] = round(at - verify - wall_start, 3)
                        for key in ("download_s", "verify_s", "blobs"):
                            if key in event:
                                found[key] = event[key]
                        # Peer connections that ended while blobs were in flight, by why.
                        ended: dict[str, int] = {}
                        for timeline in event.get("timelines") or []:
                            for reason, count in (timeline.get("disconnects") or {}).items():
                                ended[reason] = ended.get(reason, 0) + int(count)
                        found["disconnects"] = ended
                    elif event.get("event") == "image loaded":
                        found["loaded_s"] = round(at - wall_start, 3)
                        for key in ("load_s", "order_s", "overlapped"):
                            if key in event:
                                found[key] = event[key]
        if found["last_piece_s"] is None:
            # No "blobs in the cache": nothing was missing, if the rollout says so (or, for
            # a loaded order, if the agent logged the load); the bytes were there at the start.
            total = int(summary.get("total_bytes") or 0)
            nothing_missing = total > 0 and int(summary.get("cached_bytes") or 0) >= total
            if nothing_missing or "loaded_s" in found:
                found["last_piece_s"] = 0.0
                found["nothing_missing"] = True
        return found

    def stop(self) -> None:
        # Agents first, then the server; SIGTERM, and SIGKILL after a grace period.
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def _wall(stamp: Any) -> float | None:
    """An agent log's ISO timestamp (``...Z``) as seconds since the epoch."""
    from datetime import datetime

    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _since(stamp: Any, wall_start: float) -> float | None:
    at = _wall(stamp)
    return None if at is None else round(at - wall_start, 3)


def _last(values: Sequence[float | None]) -> float | None:
    """The latest of the hosts' moments, or None if any host's is unknown."""
    if not values or any(v is None for v in values):
        return None
    return max(v for v in values if v is not None)


def _span(start: str | None, end: str | None) -> float | None:
    from datetime import datetime

    if not start or not end:
        return None
    try:
        a = datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (b - a).total_seconds()


# -- the central registry ---------------------------------------------------------------------


class CentralSide:
    """Debian's docker-registry in h0; skopeo pulls (or, with the hosts' dockerds, docker
    pulls) from every agent host."""

    def __init__(
        self, cluster: Cluster, n: int, data: Path, logs: Path, log_prefix: str | None = None
    ) -> None:
        self.cluster = cluster
        self.n = n
        self.data = data
        self.logs = logs
        self.prefix = log_prefix or f"N{n}"
        h0 = cluster.server
        self.reference = ReferenceRegistry(
            data / "registry",
            host=h0.ip,
            port=REGISTRY_PORT,
            popen=h0.popen,
            log=logs / f"{self.prefix}-registry.log",
        )
        self.registry = self.reference.address
        self.skopeo = system_tool("skopeo", "skopeo")

    def start(self) -> None:
        self.reference.start(listening=lambda: listening(self.cluster.server, REGISTRY_PORT))

    def ref(self, image: RandomImage) -> str:
        return f"docker://{self.registry}/{image.tag}"

    def push(self, image: RandomImage) -> None:
        self.cluster.server.run(
            [
                self.skopeo,
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"docker-archive:{image.path}",
                self.ref(image),
            ],
            timeout=600,
        )

    def pull_all(self, image: RandomImage, run: int, name: str | None = None) -> CentralRun:
        """N parallel skopeo copies to dir:, one in each agent host."""
        name = name or f"run{run}"
        h0 = self.cluster.server
        agents = self.cluster.agents[: self.n]
        before = h0.link_counters()["tx_bytes"]
        procs: list[tuple[Host, subprocess.Popen[Any], Path]] = []
        # The skopeos are the only children this process reaps while they run.
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        for host in agents:
            dest = self.data / "pulls" / f"{name}-{host.name}"
            dest.mkdir(parents=True, exist_ok=True)
            err = (self.logs / f"{self.prefix}-{name}-{host.name}-skopeo.log").open("w")
            proc = host.popen(
                [
                    self.skopeo,
                    "--insecure-policy",
                    "copy",
                    "--quiet",
                    "--src-tls-verify=false",
                    self.ref(image),
                    f"dir:{dest}",
                ],
                stdout=err,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            err.close()
            procs.append((host, proc, dest))
        finished: dict[str, float] = {}
        while len(finished) < len(procs):
            for host, proc, _dest in procs:
                if host.name not in finished and proc.poll() is not None:
                    finished[host.name] = time.monotonic() - started
            if time.monotonic() - started > 20 * 60:
                raise TimeoutError("skopeo pulls did not finish in 20 minutes")
            time.sleep(0.02)
        seconds = max(finished.values())
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
        wire = h0.link_counters()["tx_bytes"] - before
        failed = [host.name for host, proc, _ in procs if proc.returncode != 0]
        if failed:
            raise RuntimeError(f"skopeo pulls failed on {failed}; see {self.logs}")
        for _host, _proc, dest in procs:
            if not (dest / "manifest.json").exists():
                raise RuntimeError(f"{dest} has no manifest.json after skopeo copy")
            shutil.rmtree(dest, ignore_errors=True)
        return CentralRun(
            seconds=seconds,
            host_seconds=[finished[h.name] for h in agents],
            image_bytes=image.size_bytes,
            server_wire_bytes=wire,
            kind="skopeo",
            cpu=cpu,
        )

    def docker_pull_all(
        self, image: RandomImage, engines: Sequence[DockerEngine], name: str
    ) -> CentralRun:
        """The central baseline that loads: the image's blobs, byte for byte as Docket holds
        them (uncompressed layers, an OCI manifest), pushed to docker-registry, then N
        parallel ``docker pull`` from it, one into each host's dockerd (inside the host: over
        its link). Afterwards the image is removed from every engine again."""
        h0 = self.cluster.server
        h0.run(
            [
                sys.executable,
                str(BENCH / "dockerhosts.py"),
                "push-archive",
                str(image.path),
                self.registry,
                image.tag,
            ],
            timeout=600,
        )
        ref = f"{self.registry}/{image.tag}"
        before = h0.link_counters()["tx_bytes"]
        cpu = EngineCPU(engines)
        seconds, each = pull_everywhere_timed(
            engines, [ref] * len(engines), self.logs, f"{self.prefix}-{name}-central"
        )
        used = cpu.stop()
        wire = h0.link_counters()["tx_bytes"] - before
        remove_everywhere(engines, ref)
        return CentralRun(
            seconds=seconds,
            host_seconds=each,
            image_bytes=image.size_bytes,
            server_wire_bytes=wire,
            kind="docker pull",
            cpu=used,
        )

    def stop(self) -> None:
        self.reference.stop()


# -- one cluster ------------------------------------------------------------------------------


def single_case(args: argparse.Namespace) -> Case:
    """The one kind of rollout the options ask for (without --matrix)."""
    layers = parse_layers(args.layers_mib or args.layout or "one")
    return Case(
        size_mib=sum(layers) if layers else args.size_mib,
        layers_mib=layers,
        loaded=args.with_load,
        runs=args.runs,
        central_runs=args.runs if args.central_runs is None else args.central_runs,
    )


@dataclass
class Group:
    """The cases run on one cluster (one N, one link rate)."""

    n: int
    rate_mbit: float
    cases: list[Case]


def matrix_groups(args: argparse.Namespace) -> list[Group]:
    """Issue 14's matrix: for N in --hosts (2 4 8) at 100 Mbit/s, {64 MiB one layer, 256 MiB
    one layer, 64 MiB in 8 layers (30, 15, 8, 4, 2, 1, 0.5, 0.1 MiB)} x {prefetch, loaded};
    the 1 MiB control, loaded, on the N=8 cluster; and N=4 at 1 Gbit/s, 256 MiB, prefetch and
    loaded. Docket --runs times each; the central registry too, except for the 256 MiB and
    8-layer rows at 100 Mbit/s (N·F/r: ~45-170 s a run): --matrix-central-runs times."""
    runs = args.runs
    big = args.matrix_central_runs
    eight = LAYOUTS["eight"]
    groups = []
    for n in args.hosts:
        cases = []
        for loaded in (False, True):
            cases += [
                Case(64, loaded=loaded, runs=runs, central_runs=runs),
                Case(256, loaded=loaded, runs=runs, central_runs=big),
                Case(sum(eight), eight, loaded=loaded, runs=runs, central_runs=big),
            ]
        if n == max(args.hosts):
            cases.append(Case(1, loaded=True, runs=runs, central_runs=runs))
        groups.append(Group(n, 100.0, cases))
    groups.append(
        Group(
            4,
            1000.0,
            [Case(256, loaded=loaded, runs=runs, central_runs=runs) for loaded in (False, True)],
        )
    )
    return groups


def warming_up(args: argparse.Namespace) -> bool:
    warmup = getattr(args, "warmup", None)
    return bool(warmup) or (warmup is None and bool(getattr(args, "matrix", False)))


def estimate_seconds(groups: Sequence[Group], args: argparse.Namespace) -> float:
    """Rough wall time of the whole invocation on this 2-core machine (from measured runs:
    links at ~96% of the rate, Docket at ~1.3 T_min + 1.5 s, push and image writing at
    ~60-100 MB/s)."""
    sides = 1 + bool(args.compare_plaintext) + bool(args.compare_agent_args)
    total = 0.0
    for g in groups:
        loaded = any(c.loaded for c in g.cases)
        total += 8 + 1.0 * g.n + (0.7 * g.n if loaded else 0) + 5  # up, agents, down
        total += 4 * sides if warming_up(args) else 0
        for c in g.cases:
            f = c.total_mib * MiB
            t_min = f * 8 / (g.rate_mbit * 1e6) / 0.96
            docket = f / 150e6 + f / 80e6 + 1 + 1.3 * t_min + 1.5
            if c.loaded:
                docket += g.n * f / 400e6 + 0.5  # dockerds' work, rmi
            total += c.runs * sides * docket
            if not args.skip_central:
                central = f / 60e6 + 1 + g.n * t_min * 1.03 + 0.5
                total += c.central_runs * central
    return total


def bench_one(
    n: int,
    args: argparse.Namespace,
    logs: Path,
    work: Path,
) -> Row:
    """One N, the one kind of rollout the options ask for."""
    (row,) = bench_cluster(Group(n, args.rate, [single_case(args)]), args, logs, work)
    return row


def bench_cluster(
    group: Group,
    args: argparse.Namespace,
    logs: Path,
    work: Path,
) -> list[Row]:
    """One cluster; every case of `group` on it, run by run (run 1 of every case, then run 2,
    ...), each on fresh random bytes."""
    n = group.n
    prefix = f"N{n}" if group.rate_mbit == args.rate else f"N{n}-{group.rate_mbit:g}M"
    rows = [
        Row(
            n=n,
            size_mib=c.total_mib,
            rate_mbit=group.rate_mbit,
            image_bytes=0,
            case=c,
            compare_args=args.compare_agent_args or "",
        )
        for c in group.cases
    ]
    loading = any(c.loaded for c in group.cases)
    who = f"N={n}" + ("" if group.rate_mbit == args.rate else f" {group.rate_mbit:g} Mbit/s")
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(Cluster(n, group.rate_mbit, args.prefix))
        log(f"{prefix}: cluster up ({cluster.bridge_ns}, {len(cluster.hosts)} hosts)")
        data = work / prefix
        data.mkdir()
        stack.callback(shutil.rmtree, data, True)
        agents = cluster.agents[:n]
        engines: dict[int, DockerEngine] = {}
        if loading:
            engines = stack.enter_context(engines_inside(agents, cluster.server))

        def side(**kw: Any) -> DocketSide:
            made = DocketSide(
                cluster, n, data, logs, with_load=loading, engines=engines, log_prefix=prefix, **kw
            )
            stack.callback(made.stop)
            return made

        docket = side(agent_args=args.agent_arg)
        others: list[tuple[DocketSide, str]] = []
        if args.compare_plaintext:
            others.append((side(insecure=True, port_offset=PLAINTEXT_PORT_OFFSET), "plaintext"))
        if args.compare_agent_args:
            extra = [*args.agent_arg, *shlex.split(args.compare_agent_args)]
            others.append(
                (side(label="B", agent_args=extra, port_offset=COMPARE_PORT_OFFSET), "compare")
            )
        central: CentralSide | None = None
        if not args.skip_central:
            central = CentralSide(cluster, n, data, logs, log_prefix=prefix)
            stack.callback(central.stop)
            central.start()
        docket.start()
        log(f"{prefix}: docket-server and {n} agents online")
        for other, _ in others:
            other.start()
            log(f"{prefix}: and a {other.label} docket-server with {n} agents beside it")
        if warming_up(args):
            for fleet in [docket, *(other for other, _ in others)]:
                warm = Case(1).write(data / "warmup.tar", f"bench/warmup:{secrets.token_hex(4)}")
                fleet.push(warm)
                took = fleet.rollout(warm, 0, load=False, name="warmup").seconds
                warm.path.unlink()
                log(
                    f"{prefix}: {fleet.label} warmed up (1 MiB, prefetch, {took:.2f}s, not counted)"
                )
        for run in range(max(c.runs for c in group.cases)):
            for case, row in zip(group.cases, rows, strict=True):
                if run < case.runs:
                    many = len(group.cases) > 1
                    run_case(case, row, run, docket, others, central, engines, data, many, who)
    return rows


def run_case(
    case: Case,
    row: Row,
    run: int,
    docket: DocketSide,
    others: Sequence[tuple[DocketSide, str]],
    central: CentralSide | None,
    engines: dict[int, DockerEngine],
    data: Path,
    many: bool,
    who: str,
) -> None:
    """One run of one case: the fleets in turns (the first one first in even runs, last in
    odd ones), each on fresh random bytes (so no host, and no dockerd, has any of them),
    then the central registry. ``many``: the cluster runs several cases (their names go
    into the log files' and the progress lines)."""
    n = row.n
    name = f"{case.key}-run{run}" if many else f"run{run}"
    layers = f"-{case.layer_count}l" if case.layer_count > 1 else ""
    tag = f"bench/r{int(case.total_mib)}m{layers}:n{n}-run{run}-{secrets.token_hex(4)}"
    what = f"{who} {case.image} {case.mode}" if many else who
    runs = f"run {run + 1}/{case.runs}"
    sides: list[tuple[DocketSide, str]] = [(docket, "docket"), *others]
    if run % 2 == 1:
        sides.reverse()
    by_host = {f"h{index}": engine for index, engine in engines.items()}
    image: RandomImage | None = None
    for turn, (fleet, where) in enumerate(sides):
        if image is not None:
            image.path.unlink()
        # Fresh bytes for every fleet: with load, the fleets share the hosts' dockerds.
        image = case.write(data / f"image-{run}.tar", tag + ("" if turn == 0 else f"{turn}"))
        row.image_bytes = image.size_bytes
        fleet.push(image)
        result = fleet.rollout(image, run, load=case.loaded, name=name)
        getattr(row, where).append(result)
        if case.loaded:
            # Out of the dockerds again, layers too: no later pull or load finds them there.
            for host in result.hosts:
                engine = by_host.get(host["host"])
                if engine is not None and host.get("image_id"):
                    subprocess.run(
                        ["docker", "rmi", "-f", host["image_id"]],
                        env=engine.env(),
                        capture_output=True,
                        check=False,
                    )
        last = (
            f", last piece {result.last_piece_seconds:.2f}s"
            if result.last_piece_seconds is not None
            else ""
        )
        label = "Docket" if where == "docket" else f"Docket {fleet.label}"
        log(
            f"{what} {runs}: {label} {result.seconds:.2f}s{last} "
            f"(server sent {result.server_bytes / image.size_bytes:.2f}x the image)"
        )
    assert image is not None
    if central is not None and run < case.central_runs:
        if case.loaded and engines:
            ordered = [engines[h.index] for h in docket.cluster.agents[:n]]
            pulled = central.docker_pull_all(image, ordered, name)
        else:
            central.push(image)
            pulled = central.pull_all(image, run, name)
        row.central.append(pulled)
        log(f"{what} {runs}: central ({pulled.kind}) {pulled.seconds:.2f}s")
    image.path.unlink()


def plot(rows: Sequence[Row], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return False
    ns = [r.n for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
        ns,
        [r.docket_s for r in rows],
        "o-",
        label="Docket (first pieces from the server, the rest between hosts)",
    )
    if any(r.central for r in rows):
        kind = next(r.central[0].kind for r in rows if r.central)
        ax.plot(ns, [r.central_s for r in rows], "s-", label=f"central registry ({kind})")
    ax.plot(ns, [r.t_min for r in rows], "k--", label="lower bound T_min = F/r")
    ax.set_xlabel("hosts N")
    ax.set_ylabel("seconds until every host has the image")
    ax.set_xticks(ns)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 4, 8], help="values of N")
    parser.add_argument("--rate", type=float, default=100.0, help="Mbit/s of every link")
    parser.add_argument("--size-mib", type=float, default=64.0, help="image size, MiB")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument(
        "--layers-mib",
        help="several layers instead of one of --size-mib: MiB each, first layer first, "
        "e.g. 30,15,8,4,2,1,0.5,0.1",
    )
    layout.add_argument(
        "--layout",
        choices=sorted(LAYOUTS),
        help="a named layer layout: eight = 30,15,8,4,2,1,0.5,0.1 MiB",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per N (medians reported)")
    parser.add_argument(
        "--central-runs", type=int, help="runs of the central registry (default: --runs)"
    )
    parser.add_argument("--plot", type=Path, default=BENCH / "rollout.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--prefix", default="dkt", help="namespace name prefix")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--logs", type=Path, help="log directory (default: a new temp dir)")
    parser.add_argument("--skip-central", action="store_true", help="Docket only")
    parser.add_argument(
        "--compare-plaintext",
        action="store_true",
        help="also run every rollout on a second Docket with --insecure (no TLS, plain "
        "torrents), in turns, and print the two side by side",
    )
    parser.add_argument(
        "--compare-agent-args",
        metavar="ARGS",
        help="also run every rollout on a second TLS Docket (server B and its agents, in the "
        "same cluster) whose agents get these extra arguments, in turns (ABBA), and print "
        "the two side by side; e.g. --compare-agent-args=--load-after-download",
    )
    parser.add_argument(
        "--with-load",
        action="store_true",
        help="a dockerd per host; load, not prefetch (central: docker pull, not skopeo)",
    )
    parser.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        help="an extra docket-agent argument (repeat for more), "
        "e.g. --agent-arg=--load-after-download",
    )
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="issue 14's whole matrix (time to runnable): N in --hosts x {64 MiB, 256 MiB, "
        "64 MiB in 8 layers} x {prefetch, loaded}, the 1 MiB control to the largest N, N=4 "
        "at 1 Gbit/s; one cluster per N and rate. --size-mib, --layers-mib, --layout, "
        "--with-load and --rate do not apply",
    )
    parser.add_argument(
        "--matrix-central-runs",
        type=int,
        default=1,
        help="--matrix: central runs of the 256 MiB and 8-layer rows at 100 Mbit/s",
    )
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="roll a 1 MiB image out on every fleet once before the measured runs, not "
        "counted (the first rollout of a fresh fleet pays for first connections); default: "
        "on with --matrix, off otherwise",
    )
    parser.add_argument(
        "--estimate", action="store_true", help="print the estimated wall time and exit"
    )
    args = parser.parse_args(argv)
    if args.matrix and (args.layers_mib or args.layout or args.with_load):
        parser.error("--matrix runs its own sizes, layouts and modes")
    try:
        groups = (
            matrix_groups(args)
            if args.matrix
            else [Group(n, args.rate, [single_case(args)]) for n in args.hosts]
        )
    except ValueError as exc:
        parser.error(str(exc))
    estimate = estimate_seconds(groups, args)
    if args.estimate:
        print(f"estimated wall time: {estimate / 60:.0f} min")
        return 0

    reason = unavailable_reason()
    if reason is not None:
        print(f"rollout_bench: {reason}", file=sys.stderr)
        return 1
    for tool in ("docket-server", "docket-agent", "docketctl"):
        venv_tool(tool)
    if not args.skip_central:
        system_tool("skopeo", "skopeo")
        system_tool("docker-registry", "docker-registry")

    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
        logs = args.logs
    else:
        logs = Path(tempfile.mkdtemp(prefix="docket-rollout-bench-logs-"))
    log(f"logs: {logs}")
    log(f"estimated wall time: {estimate / 60:.1f} min")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    rows: list[Row] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="docket-rollout-bench-") as tmp:
        try:
            for group in groups:
                rows += bench_cluster(group, args, logs, Path(tmp))
        except KeyboardInterrupt:
            log("interrupted: torn down")
            return 130
    took = time.monotonic() - began
    if args.matrix:
        print_matrix(rows, args, took)
    else:
        print_single(rows, args)
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in rows], indent=1))
    if (
        not args.matrix
        and not args.no_plot
        and rows
        and plot(rows, args.plot, f"{plot_image(rows[0])}, {args.rate:g} Mbit/s links")
    ):
        print(f"\nplot: {args.plot}")
    print(f"logs: {logs}")
    return 0


def plot_image(row: Row) -> str:
    if row.case is None or row.case.layer_count == 1:
        return f"{row.size_mib:g} MiB image"
    return f"{row.case.image} image"


TTR_NOTES = (
    "T_min = F/r. Docket s: `docketctl rollout` start to exit (loaded: the last host "
    "reports the image loaded in its dockerd). last piece s: the rollout's start to the "
    'moment the last host had all its bytes (its agent\'s "blobs in the cache" log line less '
    "its verify_s; one clock: one machine); tail s: Docket s - last piece s (median of the "
    "runs' tails): verifying, loading and reporting after the bytes. central: N parallel "
    "`skopeo copy` to dir: (prefetch) or `docker pull` into the hosts' dockerds of the same "
    "uncompressed layers (loaded), start to the last exit. CPU s/GB: CPU seconds during the "
    "rollout over N x F in GB (medians of the runs): the agents summed; the hosts' dockerds "
    "and their children (loaded rows); the central side's skopeos or dockerds. machine CPU "
    "busy: the share of all the machine's cores busy during Docket's rollouts (every host, "
    "server and engine share them; near 100 %, the row is bound by this machine's CPU, not by "
    "its links)."
)


def duplicates_line(rows: Sequence[Row]) -> str:
    """How many Docket rollouts lost peer connections as duplicates, and how many."""
    runs = [x for r in rows for x in r.docket]
    hit = [x.duplicates for x in runs if x.duplicates]
    return (
        f"Peer connections closed as duplicates while fetching (a second connection to a "
        f"peer: two hosts' dials crossed): {sum(hit)}, in {len(hit)} of {len(runs)} Docket "
        f"rollouts."
    )


def print_single(rows: Sequence[Row], args: argparse.Namespace) -> None:
    case = rows[0].case if rows else None
    mode = "load into Docker" if args.with_load else "--prefetch-only"
    layers = (
        f"{case.layer_count} layers ({', '.join(f'{x:g}' for x in case.layers_mib)} MiB)"
        if case is not None and case.layer_count > 1
        else "one layer"
    )
    size = case.total_mib if case is not None else args.size_mib
    print(
        f"\n{size:g} MiB image ({layers} of fresh random bytes), every link "
        f"{args.rate:g} Mbit/s each way, medians of {args.runs} run(s), Docket {mode}; "
        f"{os.cpu_count()} cores\n"
    )
    print(results_table(rows))
    if any(r.plaintext for r in rows):
        print(
            "\nTLS (the default: TLS to the server, enrolled agents, SSL torrents) against the "
            "same rollouts on a server and agents with --insecure, in turns:\n"
        )
        print(tls_table(rows))
    if any(r.compare for r in rows):
        print(
            f"\nA: the fleet as started; B: a second TLS fleet in the same cluster whose agents "
            f"also get `{args.compare_agent_args}`; the same rollouts on fresh bytes, in turns "
            "(ABBA):\n"
        )
        print(compare_table(rows))
    print(
        "\nDocket s: `docketctl rollout` start to exit. central s: N parallel "
        + ("`docker pull`" if args.with_load else "`skopeo copy`")
        + " start to the last exit. T_min = F/r. server sent / size: the sum over hosts of the "
        "bytes each got from the server (first pieces over gRPC and its BitTorrent seed), "
        "over F; h0's NIC counters below check it."
        + (
            " With --with-load, Docket's time includes `docker load` on every host, and the "
            "central pulls are `docker pull` into the same dockerds."
            if args.with_load
            else ""
        )
        + "\n"
    )
    print("Time to runnable:\n")
    print(ttr_table(rows))
    print("\n" + TTR_NOTES + "\n")
    print(details_table(rows))
    print("\n" + duplicates_line(rows))
    print("\nPer host, last run of each N:\n")
    print(hosts_table(rows))


def print_matrix(rows: Sequence[Row], args: argparse.Namespace, took: float) -> None:
    big = args.matrix_central_runs
    print(
        f"\nTime to runnable (issue 14): fresh random bytes every run, Docket medians of "
        f"{args.runs} run(s), the central registry's of {args.runs}, but of {big} for the "
        f"256 MiB and 8-layer rows at 100 Mbit/s (link-bound: N·F/r); one cluster per N and "
        f"rate, a dockerd in every host (prefetch rows too), {os.cpu_count()} cores; "
        f"{took / 60:.1f} min in all\n"
    )
    print(ttr_table(rows))
    print("\n" + TTR_NOTES)
    if any(r.compare for r in rows):
        print(
            f"\nA: the fleet as started; B: agents also given `{args.compare_agent_args}`, "
            "in turns (ABBA):\n"
        )
        print(compare_table(rows))
    if any(r.plaintext for r in rows):
        print("\nTLS against --insecure, in turns:\n")
        print(tls_table(rows))
    print("\nWho sent what:\n")
    print(details_table(rows, cases=True))
    print("\n" + duplicates_line(rows))


if __name__ == "__main__":
    sys.exit(main())
