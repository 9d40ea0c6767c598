"""Docket vs a central registry vs the lower bound, on a shaped cluster of real hosts.

For each N, a cluster of N agent hosts plus a server host (bench/cluster.py: network
namespaces, every link shaped to --rate Mbit/s both ways) and, for each run, a fresh image of
--size-mib random bytes (one layer), which:

* **Docket**: is pushed to docket-server in h0 (docketctl push --archive, inside h0), then
  rolled out to the N agents (group ``bench``) with ``docketctl rollout --prefetch-only``,
  timed from the command's start to its exit (it exits when the last host is done);
* **central**: is pushed to Debian's docker-registry in h0 (skopeo), then pulled by N
  parallel ``skopeo copy docker://… dir:…``, one from each agent host, timed from the start
  to the last one finishing;
* **lower bound**: T_min = F/r with equal links (Kumar & Ross; see shared/DESIGN.md).

It prints a markdown table of medians over --runs, a second table of what the server and
the hosts sent, and writes a plot of time vs N (--plot). Everything it starts runs inside the
cluster's namespaces and is torn down at the end, also on Ctrl-C or an error. Logs go to a
temporary directory whose path is printed.

    .venv/bin/python bench/rollout_bench.py                      # N = 2 4 8, 64 MiB, 100 Mbit/s
    .venv/bin/python bench/rollout_bench.py --hosts 4 --size-mib 128 --runs 1
    .venv/bin/python bench/rollout_bench.py --hosts 8 --skip-central --compare-plaintext

Docket runs as a user gets it: TLS, tokens, enrolled agents and SSL torrents.
--compare-plaintext also runs each rollout on a second server and agents with --insecure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchimage import MiB, RandomImage, write_random_image  # noqa: E402
from cluster import Cluster, Host, unavailable_reason  # noqa: E402
from procstat import cpu_seconds  # noqa: E402

from tests.support.registry import ReferenceRegistry  # noqa: E402

VENV_BIN = Path(sys.executable).parent
SERVER_PORT = 7800
SERVER_BT_PORT = 7881
SERVER_AGENT_PORT = 7801
PLAINTEXT_PORT_OFFSET = 100  # --compare-plaintext: the plaintext side's ports
AGENT_BT_PORT = 6881
REGISTRY_PORT = 5000
GROUP = "bench"

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

    @property
    def server_bytes(self) -> int:
        return sum(int(h["server_bytes"]) for h in self.hosts)

    @property
    def fallback_bytes(self) -> int:
        return sum(int(h["fallback_bytes"]) for h in self.hosts)

    @property
    def peer_bytes(self) -> int:
        return sum(int(h["peer_bytes"]) for h in self.hosts)


@dataclass
class CentralRun:
    seconds: float  # start of the N pulls to the last one finishing
    host_seconds: list[float]
    image_bytes: int
    server_wire_bytes: int


@dataclass
class Row:
    n: int
    size_mib: float
    rate_mbit: float
    image_bytes: int
    docket: list[DocketRun] = field(default_factory=list)
    central: list[CentralRun] = field(default_factory=list)
    plaintext: list[DocketRun] = field(default_factory=list)  # --compare-plaintext

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


def fmt(value: float, digits: int = 2) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN: not measured


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


def details_table(rows: Sequence[Row]) -> str:
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
            str(r.n),
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


def hosts_table(rows: Sequence[Row]) -> str:
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
                f"| {r.n} | {h['host']} | {fmt(h['seconds'] or float('nan'), 1)} | "
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
    ) -> None:
        """Secure as a user gets it (TLS, tokens, enrolled agents, SSL torrents); with
        ``insecure``, all of that off. ``port_offset`` moves every port, so that a second
        side can run beside the first in the same cluster. ``registry``: the server's and the
        agents' registry faces on (127.0.0.1:5000 in h0, 127.0.0.1:5001 in each host)."""
        self.server_args = list(server_args)
        self.agent_args = list(agent_args)
        self.cluster = cluster
        self.n = n
        self.insecure = insecure
        self.label = "plaintext" if insecure else "TLS"
        self.data = data / ("plaintext" if insecure else "tls")
        self.data.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.tag = f"N{n}-{self.label}"
        self.with_load = with_load
        self.docker_hosts = docker_hosts or {}
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
                *([] if self.registry else ["--registry-listen", "off"]),
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

    def rollout(self, image: RandomImage, run: int) -> DocketRun:
        h0 = self.cluster.server
        agents = self.cluster.agents[: self.n]
        args = [*self.ctl_args(), "rollout", image.tag, "--hosts", GROUP, "-o", "json"]
        args += ["--timeout", "15m"]
        if not self.with_load:
            args.append("--prefetch-only")
        before_h0 = h0.link_counters()["tx_bytes"]
        before_agents = sum(h.link_counters()["tx_bytes"] for h in agents)
        server_pid, agent_pids = self.procs[0].pid, [p.pid for p in self.procs[1:]]
        cpu0 = cpu_seconds(server_pid), sum(cpu_seconds(p) for p in agent_pids)
        out_path = self.logs / f"{self.tag}-run{run}-rollout.jsonl"
        err_path = self.logs / f"{self.tag}-run{run}-rollout.err"
        with out_path.open("w") as out, err_path.open("w") as err:
            started = time.monotonic()
            proc = h0.popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env())
            code = proc.wait(timeout=20 * 60)
            seconds = time.monotonic() - started
        server_cpu = cpu_seconds(server_pid) - cpu0[0]
        agents_cpu = sum(cpu_seconds(p) for p in agent_pids) - cpu0[1]
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
        if self.with_load and not all(h.get("image_id") for h in hosts):
            raise RuntimeError(f"a host reports no Docker image id ({out_path})")
        return DocketRun(
            seconds=seconds,
            rollout_seconds=_span(summary.get("create_time"), summary.get("end_time")),
            image_bytes=image.size_bytes,
            hosts=hosts,
            server_wire_bytes=server_wire,
            agents_wire_bytes=agents_wire,
            server_cpu=server_cpu,
            agents_cpu=agents_cpu,
        )

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
    """Debian's docker-registry in h0; skopeo pulls from every agent host."""

    def __init__(self, cluster: Cluster, n: int, data: Path, logs: Path) -> None:
        self.cluster = cluster
        self.n = n
        self.data = data
        self.logs = logs
        h0 = cluster.server
        self.reference = ReferenceRegistry(
            data / "registry",
            host=h0.ip,
            port=REGISTRY_PORT,
            popen=h0.popen,
            log=logs / f"N{n}-registry.log",
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

    def pull_all(self, image: RandomImage, run: int) -> CentralRun:
        h0 = self.cluster.server
        agents = self.cluster.agents[: self.n]
        before = h0.link_counters()["tx_bytes"]
        procs: list[tuple[Host, subprocess.Popen[Any], Path]] = []
        started = time.monotonic()
        for host in agents:
            dest = self.data / "pulls" / f"run{run}-{host.name}"
            dest.mkdir(parents=True, exist_ok=True)
            err = (self.logs / f"N{self.n}-run{run}-{host.name}-skopeo.log").open("w")
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
        )

    def stop(self) -> None:
        self.reference.stop()


# -- one N ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def docker_engines(hosts: Sequence[Host], logs: Path) -> Iterator[dict[int, str]]:
    """A private dockerd for each agent host (--with-load).

    dockerd runs in the root namespace (--bridge=none, so it needs no network); the agent
    in the host's namespace reaches it over its unix socket, which a network namespace does
    not confine. Loading an image needs no network, so this is the same as a dockerd inside.
    """
    from tests.support.dockerd import DockerEngine

    with contextlib.ExitStack() as stack:
        sockets: dict[int, str] = {}
        for host in hosts:
            engine = stack.enter_context(DockerEngine())
            sockets[host.index] = engine.host
            log(f"dockerd for {host.name}: {engine.host} ({engine.storage_driver})")
        del logs
        yield sockets


def bench_one(
    n: int,
    args: argparse.Namespace,
    logs: Path,
    work: Path,
) -> Row:
    data_bytes = int(args.size_mib * MiB)
    row = Row(n=n, size_mib=args.size_mib, rate_mbit=args.rate, image_bytes=0)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(Cluster(n, args.rate, args.prefix))
        log(f"N={n}: cluster up ({cluster.bridge_ns}, {len(cluster.hosts)} hosts)")
        data = work / f"N{n}"
        data.mkdir()
        stack.callback(shutil.rmtree, data, True)
        docker_hosts = (
            stack.enter_context(docker_engines(cluster.agents, logs)) if args.with_load else {}
        )
        docket = DocketSide(
            cluster,
            n,
            data,
            logs,
            with_load=args.with_load,
            docker_hosts=docker_hosts,
            agent_args=args.agent_arg,
        )
        stack.callback(docket.stop)
        plaintext: DocketSide | None = None
        if args.compare_plaintext:
            plaintext = DocketSide(
                cluster,
                n,
                data,
                logs,
                with_load=args.with_load,
                docker_hosts=docker_hosts,
                insecure=True,
                port_offset=PLAINTEXT_PORT_OFFSET,
            )
            stack.callback(plaintext.stop)
        central: CentralSide | None = None
        if not args.skip_central:
            central = CentralSide(cluster, n, data, logs)
            stack.callback(central.stop)
            central.start()
        docket.start()
        log(f"N={n}: docket-server and {n} agents online")
        if plaintext is not None:
            plaintext.start()
            log(f"N={n}: and a plaintext docket-server (--insecure) with {n} agents beside it")
        for run in range(args.runs):
            tag = f"bench/r{int(args.size_mib)}m:n{n}-run{run}-{secrets.token_hex(4)}"
            image = write_random_image(data / f"image-{run}.tar", tag, data_bytes)
            row.image_bytes = image.size_bytes

            def run_plaintext(
                side: DocketSide, image: RandomImage, run: int = run, tag: str = tag
            ) -> RandomImage:
                # Fresh bytes for the second fleet too: none of its hosts has any of them.
                image.path.unlink()
                image = write_random_image(data / f"image-{run}.tar", tag + "p", data_bytes)
                side.push(image)
                plain = side.rollout(image, run)
                row.plaintext.append(plain)
                log(f"N={n} run {run + 1}/{args.runs}: Docket plaintext {plain.seconds:.2f}s")
                return image

            # In turns, plaintext first every other run: the side that goes second starts on
            # a machine still writing back the first side's blobs.
            plaintext_first = plaintext is not None and run % 2 == 1
            if plaintext is not None and plaintext_first:
                image = run_plaintext(plaintext, image)
            docket.push(image)
            result = docket.rollout(image, run)
            row.docket.append(result)
            log(
                f"N={n} run {run + 1}/{args.runs}: Docket {result.seconds:.2f}s "
                f"(server sent {result.server_bytes / image.size_bytes:.2f}x the image)"
            )
            if plaintext is not None and not plaintext_first:
                image = run_plaintext(plaintext, image)
            if central is not None:
                central.push(image)
                pulled = central.pull_all(image, run)
                row.central.append(pulled)
                log(f"N={n} run {run + 1}/{args.runs}: central {pulled.seconds:.2f}s")
            image.path.unlink()
    return row


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
        ax.plot(ns, [r.central_s for r in rows], "s-", label="central registry (skopeo)")
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
    parser.add_argument("--runs", type=int, default=3, help="runs per N (medians reported)")
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
        "--with-load", action="store_true", help="a dockerd per host; load, not prefetch"
    )
    parser.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        help="an extra docket-agent argument (repeat for more), "
        "e.g. --agent-arg=--load-after-download",
    )
    args = parser.parse_args(argv)

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

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="docket-rollout-bench-") as tmp:
        try:
            for n in args.hosts:
                rows.append(bench_one(n, args, logs, Path(tmp)))
        except KeyboardInterrupt:
            log("interrupted: torn down")
            return 130

    mode = "load into Docker" if args.with_load else "--prefetch-only"
    print(
        f"\n{args.size_mib:g} MiB image (one layer of fresh random bytes), every link "
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
    print(
        "\nDocket s: `docketctl rollout` start to exit. central s: N parallel `skopeo copy` "
        "start to the last exit. T_min = F/r. server sent / size: the sum over hosts of the "
        "bytes each got from the server (first pieces over gRPC and its BitTorrent seed), "
        "over F; h0's NIC counters below check it."
        + (
            " With --with-load, Docket's time includes `docker load` on every host; the "
            "central pulls still stop at skopeo's dir: copy."
            if args.with_load
            else ""
        )
        + "\n"
    )
    print(details_table(rows))
    print("\nPer host, last run of each N:\n")
    print(hosts_table(rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "n": r.n,
                        "image_bytes": r.image_bytes,
                        "rate_mbit": r.rate_mbit,
                        "t_min": r.t_min,
                        "docket": [vars(x) for x in r.docket],
                        "central": [vars(x) for x in r.central],
                    }
                    for r in rows
                ],
                indent=1,
            )
        )
    if (
        not args.no_plot
        and rows
        and plot(rows, args.plot, f"{args.size_mib:g} MiB image, {args.rate:g} Mbit/s links")
    ):
        print(f"\nplot: {args.plot}")
    print(f"logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
