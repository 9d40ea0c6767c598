"""A test cluster of real hosts on one machine: network namespaces behind a shaped bridge.

``Cluster(hosts=N, rate_mbit=100)`` makes N+1 hosts, ``<prefix>-h0`` … ``<prefix>-hN`` (host 0
runs the server, hosts 1..N the agents), plus a namespace ``<prefix>-br`` that holds the
Linux bridge ``br0``::

    <prefix>-h0  eth0 10.77.0.1/24 ─┐            ┌─ <prefix>-br ─────────────┐
    <prefix>-h1  eth0 10.77.0.2/24 ─┼── veth ────┤ v0 v1 … vN  ── br0         │
    …                               ─┘            └───────────────────────────┘

Every host's link is shaped to ``rate_mbit`` in both directions with a token bucket
(``tc qdisc … tbf``) on both ends of its veth: on ``eth0`` in the host (what the host sends)
and on ``v<i>`` in the bridge namespace (what the host receives). Nothing is routed out of
the namespaces; all addresses are in 10.77.0.0/24 and exist only inside them.

    with Cluster(hosts=4, rate_mbit=100) as cluster:
        server = cluster.hosts[0].popen(["docket-server", "--listen", "10.77.0.1:7800"])
        cluster.hosts[1].run(["ping", "-c1", cluster.hosts[0].ip])
        print(cluster.measure([(1, 2)]))   # achieved Mbit/s from h1 to h2

Command line (as root)::

    python bench/cluster.py up --hosts 4 --rate 100 [--verify]
    python bench/cluster.py status
    python bench/cluster.py verify          # measure the shaping of a cluster that is up
    python bench/cluster.py down            # also removes leftovers of a crashed run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

SUBNET = "10.77.0"
PREFIX_LENGTH = 24
BRIDGE = "br0"
#: TCP port the shaping measurement uses (inside the namespaces only).
MEASURE_PORT = 5201
MTU = 1500


def _ip() -> str:
    found = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if Path(p).exists()), None
    )
    if found is None:
        raise RuntimeError("the ip command is missing (apt-get install iproute2)")
    return found


def _tc() -> str:
    found = shutil.which("tc") or next(
        (p for p in ("/usr/sbin/tc", "/sbin/tc") if Path(p).exists()), None
    )
    if found is None:
        raise RuntimeError("the tc command is missing (apt-get install iproute2)")
    return found


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why a cluster cannot be made here (not root, no ip netns), or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        ip = _ip()
        _tc()
    except RuntimeError as exc:
        return str(exc)
    probe = f"dktprobe{os.getpid()}"
    made = _run([ip, "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"ip netns add fails: {made.stderr.strip()}"
    _run([ip, "netns", "del", probe], check=False)
    return None


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    out = _run([_ip(), "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    out = _run([_ip(), "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _prefix_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}-(h\d+|br)$")


def cleanup(prefix: str) -> list[str]:
    """Remove every namespace of `prefix` (ours, from this or a crashed run).

    Processes still running inside them (which a run of ours started) get SIGTERM, then
    SIGKILL; then the namespaces are deleted, which deletes their veths and bridge.
    Returns the names removed.
    """
    pattern = _prefix_pattern(prefix)
    names = [ns for ns in list_netns() if pattern.match(ns)]
    _kill_in(names)
    for ns in names:
        _run([_ip(), "netns", "del", ns], check=False)
    return names


def _kill_in(namespaces: Sequence[str], grace: float = 5.0) -> None:
    pids = {pid for ns in namespaces for pid in netns_pids(ns)}
    pids.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = {pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)}
            time.sleep(0.05)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@dataclass
class Host:
    """One host of the cluster: a network namespace with eth0 at `ip`."""

    index: int
    ns: str
    ip: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        return f"h{self.index}"

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [_ip(), "netns", "exec", self.ns, *argv]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside this host (``ip netns exec``, which execs it: same pid)."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv), **kw)
        self.procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float | None = 120, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside this host, capturing text output."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        result: subprocess.CompletedProcess[str] = subprocess.run(
            self.argv(argv), check=False, timeout=timeout, **kw
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"[{self.ns}] {' '.join(argv)} exited {result.returncode}: "
                f"{(result.stderr or '').strip()[-2000:]}"
            )
        return result

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every process started with `popen`, SIGKILL after `grace` seconds."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self.procs.clear()

    def link_counters(self) -> dict[str, int]:
        """eth0's byte and packet counters, as the host sees them."""
        out = _run(self.argv([_ip(), "-j", "-s", "link", "show", "eth0"])).stdout
        stats = json.loads(out)[0]["stats64"]
        return {
            "rx_bytes": int(stats["rx"]["bytes"]),
            "tx_bytes": int(stats["tx"]["bytes"]),
            "rx_packets": int(stats["rx"]["packets"]),
            "tx_packets": int(stats["tx"]["packets"]),
            "tx_dropped": int(stats["tx"]["dropped"]),
        }


def tbf_params(rate_mbit: float) -> dict[str, int]:
    """Token bucket parameters for a link of `rate_mbit`.

    burst: rate/250 bytes (4 ms of traffic; 50 kB at 100 Mbit/s) but at least 4 MTUs, so the
    bucket always holds a few full frames; queue limit: 50 ms of traffic plus the burst.
    """
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(int(rate_bytes / 250), 4 * (MTU + 14))
    latency_ms = 50
    limit = int(rate_bytes * latency_ms / 1000) + burst
    return {"rate_bit": int(rate_mbit * 1e6), "burst": burst, "limit": limit}


class Cluster:
    """N+1 hosts in network namespaces on one shaped bridge; see the module docstring."""

    def __init__(self, hosts: int, rate_mbit: float, prefix: str = "dkt") -> None:
        if hosts < 1 or hosts > 250:
            raise ValueError("hosts must be 1..250")
        if rate_mbit <= 0:
            raise ValueError("rate_mbit must be positive")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", prefix):
            raise ValueError("prefix: a lower-case letter, then up to 15 letters or digits")
        self.n = hosts
        self.rate_mbit = rate_mbit
        self.prefix = prefix
        self.bridge_ns = f"{prefix}-br"
        self.hosts = [
            Host(index=i, ns=f"{prefix}-h{i}", ip=f"{SUBNET}.{i + 1}") for i in range(hosts + 1)
        ]
        self.tbf = tbf_params(rate_mbit)
        self._up = False

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def server(self) -> Host:
        return self.hosts[0]

    @property
    def agents(self) -> list[Host]:
        return self.hosts[1:]

    def up(self) -> Cluster:
        """Make the namespaces, bridge, veths and shaping (first removing leftovers)."""
        cleanup(self.prefix)
        ip, tc = _ip(), _tc()
        try:
            self._up = True
            _run([ip, "netns", "add", self.bridge_ns])
            br = self.bridge_ns
            _run([ip, "-n", br, "link", "set", "lo", "up"])
            _run([ip, "-n", br, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0"])
            _run([ip, "-n", br, "link", "set", BRIDGE, "up"])
            for host in self.hosts:
                peer = f"v{host.index}"
                _run([ip, "netns", "add", host.ns])
                _disable_ipv6(host.ns)
                _run([ip, "-n", host.ns, "link", "set", "lo", "up"])
                veth = ["eth0", "type", "veth", "peer", "name", peer, "netns", br]
                _run([ip, "-n", host.ns, "link", "add", *veth])
                _run(
                    [ip, "-n", host.ns, "addr", "add", f"{host.ip}/{PREFIX_LENGTH}", "dev", "eth0"]
                )
                _run([ip, "-n", br, "link", "set", peer, "master", BRIDGE])
                _run([ip, "-n", br, "link", "set", peer, "up"])
                _run([ip, "-n", host.ns, "link", "set", "eth0", "up"])
                # Host's upload: eth0 egress in the host. Host's download: the bridge port's
                # egress towards the host.
                self._shape(tc, host.ns, "eth0")
                self._shape(tc, br, peer)
            _disable_ipv6(br)
        except BaseException:
            self.down()
            raise
        return self

    def _shape(self, tc: str, ns: str, dev: str) -> None:
        p = self.tbf
        rate = f"{p['rate_bit']}bit"
        tbf = ["tbf", "rate", rate, "burst", str(p["burst"]), "limit", str(p["limit"])]
        _run([tc, "-n", ns, "qdisc", "replace", "dev", dev, "root", *tbf])

    def down(self) -> None:
        """Stop what runs in the hosts and delete every namespace of this prefix."""
        for host in self.hosts:
            host.stop_all()
        cleanup(self.prefix)
        self._up = False

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # -- looking at it ------------------------------------------------------------------------

    def status(self) -> str:
        return status_text(self.prefix)

    def measure(self, pairs: Sequence[tuple[int, int]], seconds: float = 4.0) -> dict[str, Any]:
        """Send TCP bulk data along each (src, dst) host pair at once for `seconds`.

        Returns, per receiver, the goodput it saw (Mbit/s of payload) and the sum. Every
        sender sends as fast as TCP lets it; one receiver listens per destination host.
        """
        receivers = sorted({dst for _src, dst in pairs})
        expected = {dst: sum(1 for _s, d in pairs if d == dst) for dst in receivers}
        script = str(Path(__file__).resolve())
        sinks = {
            dst: self.hosts[dst].popen(
                [sys.executable, script, "_sink", "--connections", str(expected[dst])],
                stdout=subprocess.PIPE,
                text=True,
            )
            for dst in receivers
        }
        try:
            for dst in receivers:
                _wait_listening(self.hosts[dst], MEASURE_PORT)
            sources = [
                self.hosts[src].popen(
                    [
                        sys.executable,
                        script,
                        "_source",
                        self.hosts[dst].ip,
                        "--seconds",
                        str(seconds),
                    ],
                    stdout=subprocess.DEVNULL,
                )
                for src, dst in pairs
            ]
            for proc in sources:
                proc.wait(seconds + 30)
            results: dict[str, Any] = {}
            for dst, sink in sinks.items():
                out, _err = sink.communicate(timeout=30)
                results[f"h{dst}"] = json.loads(out)
        finally:
            for proc in sinks.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        total = sum(r["mbit_s"] for r in results.values())
        return {"pairs": [f"h{s}->h{d}" for s, d in pairs], "receivers": results, "total": total}

    def verify(self, seconds: float = 4.0) -> list[dict[str, Any]]:
        """Check the shaping: one flow (both ends limit), two senders into one host (its
        download limits), one host sending to two (its upload limits). Needs 3 hosts."""
        cases: list[tuple[str, list[tuple[int, int]]]] = [("1 flow h1->h2", [(1, 2)])]
        if self.n >= 2:
            cases.append(("h1+h2 -> h0 (h0 download)", [(1, 0), (2, 0)]))
            cases.append(("h0 -> h1+h2 (h0 upload)", [(0, 1), (0, 2)]))
        else:
            cases = [("1 flow h0->h1", [(0, 1)])]
        out = []
        for label, pairs in cases:
            result = self.measure(pairs, seconds)
            result["case"] = label
            result["configured"] = self.rate_mbit
            out.append(result)
        return out


def _disable_ipv6(ns: str) -> None:
    # No router solicitations or DAD chatter on the shaped links: IPv4 only.
    for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
        _run([_ip(), "netns", "exec", ns, "sysctl", "-qw", f"{key}=1"], check=False)


def _wait_listening(host: Host, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = host.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host.ip}:{port}")


def status_text(prefix: str) -> str:
    pattern = _prefix_pattern(prefix)
    names = sorted(
        (ns for ns in list_netns() if pattern.match(ns)),
        key=lambda s: (s.endswith("-br"), int(s.rsplit("-h", 1)[1]) if "-h" in s else 0),
    )
    if not names:
        return f"no cluster with prefix {prefix!r}"
    ip = _ip()
    lines = []
    for ns in names:
        pids = netns_pids(ns)
        lines.append(f"{ns}: {len(pids)} processes")
        addrs = _run([ip, "-n", ns, "-br", "addr"], check=False).stdout
        lines.extend("  " + line for line in addrs.splitlines())
        qdiscs = _run([_tc(), "-n", ns, "-s", "qdisc", "show"], check=False).stdout
        shown = False
        for line in qdiscs.splitlines():
            if line.startswith("qdisc"):
                shown = " tbf " in line
            if shown and (line.startswith("qdisc") or "Sent" in line):
                lines.append("  " + line.strip())
    return "\n".join(lines)


def format_verification(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| case | configured Mbit/s | achieved Mbit/s (payload) | achieved / configured |",
        "|---|---|---|---|",
    ]
    for r in results:
        per = ", ".join(f"{k} {v['mbit_s']:.1f}" for k, v in r["receivers"].items())
        lines.append(
            f"| {r['case']} | {r['configured']:g} | {r['total']:.1f} ({per}) | "
            f"{r['total'] / r['configured']:.3f} |"
        )
    lines.append(
        "(TCP payload over 1500-byte frames is at most 1448/1514 = 95.6% of the line rate "
        "tbf counts.)"
    )
    return "\n".join(lines)


# -- the measurement's two ends (run inside the namespaces) ---------------------------------


def _sink(connections: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", MEASURE_PORT))
    srv.listen(16)
    lock = threading.Lock()
    stats = {"bytes": 0, "first": 0.0, "last": 0.0}

    def drain(conn: socket.socket) -> None:
        buf = bytearray(1 << 20)
        with conn:
            while n := conn.recv_into(buf):
                now = time.monotonic()
                with lock:
                    if not stats["first"]:
                        stats["first"] = now
                    stats["bytes"] += n
                    stats["last"] = now

    threads = []
    for _ in range(connections):
        conn, _addr = srv.accept()
        thread = threading.Thread(target=drain, args=(conn,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    srv.close()
    took = max(stats["last"] - stats["first"], 1e-9)
    print(
        json.dumps(
            {"bytes": stats["bytes"], "seconds": took, "mbit_s": stats["bytes"] * 8 / took / 1e6}
        )
    )


def _source(address: str, seconds: float) -> None:
    chunk = os.urandom(1 << 20)
    with socket.create_connection((address, MEASURE_PORT), timeout=10) as conn:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(chunk)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A shaped test cluster in network namespaces.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("up", "make the cluster (removing leftovers first)"),
        ("down", "remove the cluster and leftovers of crashed runs"),
        ("status", "show the namespaces, addresses and qdiscs"),
        ("verify", "measure the shaping of the cluster that is up"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--prefix", default="dkt")
        if name in ("up", "verify"):
            cmd.add_argument("--hosts", type=int, default=4, help="agent hosts (plus h0)")
            cmd.add_argument("--rate", type=float, default=100.0, help="Mbit/s each way")
            cmd.add_argument("--seconds", type=float, default=4.0)
        if name == "up":
            cmd.add_argument("--verify", action="store_true", help="measure the shaping too")
    sink = sub.add_parser("_sink")
    sink.add_argument("--connections", type=int, default=1)
    source = sub.add_parser("_source")
    source.add_argument("address")
    source.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args(argv)

    if args.command == "_sink":
        _sink(args.connections)
        return 0
    if args.command == "_source":
        _source(args.address, args.seconds)
        return 0
    if args.command == "down":
        removed = cleanup(args.prefix)
        print(f"removed {len(removed)} namespaces" + (f": {' '.join(removed)}" if removed else ""))
        return 0
    if args.command == "status":
        print(status_text(args.prefix))
        return 0
    reason = unavailable_reason()
    if reason is not None:
        print(f"cluster: {reason}", file=sys.stderr)
        return 1
    cluster = Cluster(args.hosts, args.rate, args.prefix)
    if args.command == "up":
        cluster.up()
        p = cluster.tbf
        print(
            f"up: {len(cluster.hosts)} hosts {cluster.hosts[0].ip}..{cluster.hosts[-1].ip}, "
            f"tbf rate {args.rate:g}mbit burst {p['burst']}B limit {p['limit']}B each way"
        )
    if args.command == "verify" or getattr(args, "verify", False):
        print(format_verification(cluster.verify(args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
