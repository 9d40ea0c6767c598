"""Memory and CPU of docket-server and docket-agent moving a big image; push vs docker save.

Part 1 (no shaping, loopback): a docket-server and one docket-agent (``--no-docker``); an
image of --size-mib random bytes is pushed from an archive, then rolled out to the agent with
``--prefetch-only``. Both run secure, as a user gets them (TLS on the server's ports and
docketctl calling with the admin token; the agent enrolled with a join token and calling the
agent port with mutual TLS; BitTorrent over libtorrent SSL torrents), so the costs include it.
For each process and phase it reports the peak RSS (VmHWM in /proc/<pid>/status, reset before
each phase by writing 5 to /proc/<pid>/clear_refs), the peaks of RssAnon and RssFile (sampled
every 50 ms) and CPU seconds (utime + stime in /proc/<pid>/stat).

RSS counts file-backed mapped pages (RssFile) as well as the process's own memory
(RssAnon). libtorrent 2.0 did its disk I/O through memory maps, so every blob page it touched
counted as RssFile: page cache the kernel can drop, not private memory. libtorrent 2.1's
default backend uses pread/pwrite instead; the table shows which it is (the RSS of mappings
under the data dirs, from /proc/<pid>/smaps). The target is agent RssAnon < 200 MB.

Part 2: a private Docker engine (tests/support/dockerd.py) with an image of --size-mib MiB of
data (tests/support/images.py make_base_image); then, --runs times, ``docker save`` of it to a
file (the Docker SDK's image.save(), streamed) and ``docketctl push`` of it from the engine to
a docket-server (removed with ``docketctl rm`` between runs, so every push uploads it all).
Medians; the target is push <= 1.3 x save.

With --bittorrent-only, part 1's agent takes no first pieces from the server (it runs with a
download limit too high to matter), so the whole image comes over BitTorrent: that is how most
of an image reaches an agent among several, and what libtorrent's buffers cost.

    .venv/bin/python bench/resources_bench.py                  # 1 GiB, 3 runs
    .venv/bin/python bench/resources_bench.py --size-mib 256 --runs 1 --skip-push
    .venv/bin/python bench/resources_bench.py --skip-push --bittorrent-only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (BENCH, ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchimage import MiB, write_random_image  # noqa: E402
from procstat import cpu_seconds  # noqa: E402

from tests.support.server import ServerProcess, docketctl, free_port  # noqa: E402

VENV_BIN = Path(sys.executable).parent
MB = 1e6
AGENT_RSS_TARGET_MB = 200
PUSH_SAVE_TARGET = 1.3


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith(("Vm", "Rss")):
            out[key] = int(value.split()[0])
    return out


def mapped_rss_kb(pid: int, under: str) -> int:
    """RSS of the file mappings of `pid` whose path is under `under` (from smaps)."""
    total = 0
    inside = False
    with Path(f"/proc/{pid}/smaps").open() as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                fields = line.split(maxsplit=5)
                inside = len(fields) == 6 and fields[5].strip().startswith(under)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Usage:
    process: str
    phase: str
    seconds: float = 0.0
    cpu: float = 0.0
    hwm_kb: int = 0
    peak_anon_kb: int = 0
    peak_file_kb: int = 0
    peak_shmem_kb: int = 0
    peak_blob_maps_kb: int = 0
    end_rss_kb: int = 0
    end_anon_kb: int = 0


@dataclass
class _Watch:
    pids: dict[str, int]
    phase: str
    data_dirs: dict[str, str]
    usages: dict[str, Usage] = field(default_factory=dict)
    _cpu0: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        for name, pid in self.pids.items():
            reset_peak(pid)
            self._cpu0[name] = cpu_seconds(pid)
            self.usages[name] = Usage(name, self.phase)
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        count = 0
        while not self._stop.is_set():
            # smaps is costly to read: every 4th sample (200 ms).
            self._once(smaps=count % 4 == 0)
            count += 1
            self._stop.wait(0.05)

    def _once(self, smaps: bool = True) -> None:
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                s = status_kb(pid)
                u = self.usages[name]
                u.peak_anon_kb = max(u.peak_anon_kb, s.get("RssAnon", 0))
                u.peak_file_kb = max(u.peak_file_kb, s.get("RssFile", 0))
                u.peak_shmem_kb = max(u.peak_shmem_kb, s.get("RssShmem", 0))
                if smaps and name in self.data_dirs:
                    maps = mapped_rss_kb(pid, self.data_dirs[name])
                    u.peak_blob_maps_kb = max(u.peak_blob_maps_kb, maps)

    def stop(self) -> list[Usage]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._once()
        took = time.monotonic() - self._t0
        for name, pid in self.pids.items():
            s = status_kb(pid)
            u = self.usages[name]
            u.seconds = took
            u.cpu = cpu_seconds(pid) - self._cpu0[name]
            u.hwm_kb = s.get("VmHWM", 0)
            u.end_rss_kb = s.get("VmRSS", 0)
            u.end_anon_kb = s.get("RssAnon", 0)
        return list(self.usages.values())


@contextlib.contextmanager
def watching(
    pids: dict[str, int], phase: str, out: list[Usage], data_dirs: dict[str, str]
) -> Iterator[None]:
    watch = _Watch(pids, phase, data_dirs)
    watch.start()
    try:
        yield
    finally:
        out.extend(watch.stop())


def checked(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        raise RuntimeError(f"{what} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result.stdout


# -- part 1 ---------------------------------------------------------------------------------------


# An agent under a download limit takes no first pieces from the server: all of the image
# comes over BitTorrent, which is how most of it reaches an agent among several.
BITTORRENT_ONLY = ["--max-download-rate", str(100 * 1000**3)]


def download_part(
    size_mib: float, tmp: Path, logs: Path, *, bittorrent_only: bool = False
) -> tuple[list[Usage], dict[str, Any]]:
    server = ServerProcess(data_dir=tmp / "server", extra_args=["--log-level", "info"])
    server.start()
    agent: subprocess.Popen[bytes] | None = None
    usages: list[Usage] = []
    try:
        assert server.proc is not None
        agent_log = (logs / "resources-agent.log").open("ab")
        agent = subprocess.Popen(
            [
                str(VENV_BIN / "docket-agent"),
                "--server",
                server.address,
                "--bt-listen",
                f"127.0.0.1:{free_port()}",
                "--data-dir",
                str(tmp / "agent"),
                "--name",
                "res1",
                "--group",
                "res",
                "--no-docker",
                "--log-level",
                "info",
                # It enrolls with a join token, then calls the agent port with mutual TLS.
                "--join-token",
                server.join_token(),
                "--ca",
                str(server.ca_path),
                *(BITTORRENT_ONLY if bittorrent_only else []),
            ],
            stdout=agent_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        agent_log.close()
        deadline = time.monotonic() + 60
        while True:
            if agent.poll() is not None:
                raise RuntimeError(f"docket-agent exited {agent.returncode}; see {logs}")
            out = docketctl("agents", "--hosts", "res", "-o", "json", server=server)
            if out.returncode == 0 and any(a["state"] == "online" for a in json.loads(out.stdout)):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the agent did not come online")
            time.sleep(0.3)
        pids = {"docket-server": server.proc.pid, "docket-agent": agent.pid}
        data_dirs = {"docket-server": str(tmp / "server"), "docket-agent": str(tmp / "agent")}
        idle = {name: status_kb(pid) for name, pid in pids.items()}

        tag = f"bench/res:{secrets.token_hex(4)}"
        log(f"writing a {size_mib:g} MiB image")
        image = write_random_image(tmp / "image.tar", tag, int(size_mib * MiB))
        log("push (archive, loopback)")
        with watching({"docket-server": server.proc.pid}, "push", usages, data_dirs):
            checked(
                docketctl(
                    "push", tag, "--archive", str(image.path), "-q", server=server, timeout=1800
                ),
                "docketctl push",
            )
        image.path.unlink()
        log("rollout --prefetch-only to the agent")
        with watching(pids, "download", usages, data_dirs):
            events = checked(
                docketctl(
                    "rollout",
                    tag,
                    "--hosts",
                    "res",
                    "--prefetch-only",
                    "-o",
                    "json",
                    server=server,
                    timeout=1800,
                ),
                "docketctl rollout",
            )
        summary = next(
            json.loads(line)["summary"] for line in events.splitlines() if '"summary"' in line
        )
        # A few seconds after: what the agent keeps while it only seeds.
        time.sleep(3)
        after = {name: status_kb(pid) for name, pid in pids.items()}
        facts = {
            "image_bytes": image.size_bytes,
            "idle": idle,
            "after": after,
            "host": summary["hosts"][0],
        }
        return usages, facts
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        server.stop()


def libtorrent_version() -> str:
    try:
        import libtorrent
    except ImportError:
        return "?"
    return str(libtorrent.__version__)


def rss_line(snapshot: dict[str, dict[str, int]]) -> str:
    parts = []
    for name, s in snapshot.items():
        mb = {k: s.get(k, 0) * 1024 / MB for k in ("VmRSS", "RssAnon", "RssFile")}
        parts.append(
            f"{name} RSS {mb['VmRSS']:.0f} MB (RssAnon {mb['RssAnon']:.0f}, "
            f"RssFile {mb['RssFile']:.0f})"
        )
    return ", ".join(parts)


def usage_table(usages: Sequence[Usage]) -> str:
    head = (
        "process",
        "phase",
        "wall s",
        "CPU s",
        "peak RSS (VmHWM) MB",
        "peak RssAnon MB",
        "peak RssFile MB",
        "peak RssShmem MB",
        "peak blob mappings MB",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for u in usages:
        lines.append(
            f"| {u.process} | {u.phase} | {u.seconds:.1f} | {u.cpu:.1f} | "
            f"{u.hwm_kb * 1024 / MB:.0f} | {u.peak_anon_kb * 1024 / MB:.0f} | "
            f"{u.peak_file_kb * 1024 / MB:.0f} | {u.peak_shmem_kb * 1024 / MB:.0f} | "
            f"{u.peak_blob_maps_kb * 1024 / MB:.0f} |"
        )
    return "\n".join(lines)


# -- part 2 ---------------------------------------------------------------------------------------


@dataclass
class PushSave:
    save_s: list[float] = field(default_factory=list)
    push_s: list[float] = field(default_factory=list)
    push_cpu_s: list[float] = field(default_factory=list)
    server_cpu_s: list[float] = field(default_factory=list)
    image_bytes: int = 0
    archive_bytes: int = 0


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def push_vs_save_part(size_mib: float, runs: int, tmp: Path) -> PushSave:
    from tests.support.dockerd import DockerEngine
    from tests.support.images import make_base_image, save_image

    result = PushSave()
    with DockerEngine() as engine:
        tag = "bench/big:1"
        log(f"docker import of a {size_mib:g} MiB image ({engine.storage_driver})")
        make_base_image(engine.client, tag, extra_bytes=int(size_mib * MiB), seed=7)
        result.image_bytes = int(engine.client.images.get(tag).attrs["Size"])
        server = ServerProcess(data_dir=tmp / "push-server", extra_args=["--log-level", "info"])
        server.start()
        try:
            assert server.proc is not None
            # The engine's DOCKER_HOST, and the server's address, admin token and CA.
            env = engine.env(server.env())
            for run in range(runs):
                out = tmp / "save.tar"
                started = time.monotonic()
                save_image(engine.client, tag, out)
                result.save_s.append(time.monotonic() - started)
                result.archive_bytes = out.stat().st_size
                out.unlink()
                log(f"run {run + 1}/{runs}: docker save {result.save_s[-1]:.2f}s")

                cpu0, server_cpu0 = children_cpu(), cpu_seconds(server.proc.pid)
                started = time.monotonic()
                pushed = checked(
                    docketctl("push", tag, "-o", "json", server=server, env=env, timeout=1800),
                    "docketctl push",
                )
                result.push_s.append(time.monotonic() - started)
                result.push_cpu_s.append(children_cpu() - cpu0)
                result.server_cpu_s.append(cpu_seconds(server.proc.pid) - server_cpu0)
                info = json.loads(pushed)
                if not info.get("uploaded_bytes"):
                    raise RuntimeError(f"push uploaded nothing: {pushed[:500]}")
                log(f"run {run + 1}/{runs}: docketctl push {result.push_s[-1]:.2f}s")
                checked(docketctl("rm", tag, server=server, env=env), "docketctl rm")
        finally:
            server.stop()
    return result


def push_save_table(r: PushSave) -> str:
    save, push = statistics.median(r.save_s), statistics.median(r.push_s)
    ratio = push / save
    lines = [
        "| image MB | runs | docker save s | docketctl push s | push / save | target | "
        "docketctl CPU s | server CPU s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r.archive_bytes / MB:.0f} | {len(r.save_s)} | {save:.2f} "
        f"({', '.join(f'{x:.2f}' for x in r.save_s)}) | {push:.2f} "
        f"({', '.join(f'{x:.2f}' for x in r.push_s)}) | {ratio:.2f} | "
        f"<= {PUSH_SAVE_TARGET} {'met' if ratio <= PUSH_SAVE_TARGET else 'NOT met'} | "
        f"{statistics.median(r.push_cpu_s):.1f} | {statistics.median(r.server_cpu_s):.1f} |",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=1024.0, help="image size, MiB")
    parser.add_argument("--runs", type=int, default=3, help="push vs save runs (medians)")
    parser.add_argument("--skip-download", action="store_true", help="skip part 1")
    parser.add_argument("--skip-push", action="store_true", help="skip part 2 (needs dockerd)")
    parser.add_argument(
        "--bittorrent-only",
        action="store_true",
        help="part 1's agent takes no first pieces from the server: all over BitTorrent",
    )
    args = parser.parse_args(argv)

    logs = Path(tempfile.mkdtemp(prefix="docket-resources-bench-logs-"))
    log(f"logs: {logs}")
    with tempfile.TemporaryDirectory(prefix="docket-resources-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_download:
            usages, facts = download_part(
                args.size_mib, tmp, logs, bittorrent_only=args.bittorrent_only
            )
            agent = next(u for u in usages if u.process == "docket-agent")
            anon_mb = agent.peak_anon_kb * 1024 / MB
            print(
                f"\n## Memory and CPU: a {facts['image_bytes'] / MB:.0f} MB image "
                f"(one layer) pushed over loopback, then fetched by one agent (--prefetch-only"
                f"{'; over BitTorrent only' if args.bittorrent_only else ''})\n"
            )
            print(usage_table(usages))
            host = facts["host"]
            print(
                f"\nThe agent took {host['seconds']:.1f}s by its own clock "
                f"({facts['image_bytes'] / MB / max(host['seconds'] or 1, 1e-9):.0f} MB/s). "
                f"Idle before the push: {rss_line(facts['idle'])}. "
                f"Seeding, 3 s after: {rss_line(facts['after'])}."
            )
            agent_maps_mb = agent.peak_blob_maps_kb * 1024 / MB
            print(
                "\nVmHWM is the peak of RssAnon + RssFile + RssShmem. RssFile counts the "
                "file pages a process has mapped: its shared libraries and, when libtorrent "
                "does its disk I/O through memory maps (libtorrent 2.0's backend), the pages "
                "of the blobs it touched. Those are page cache, which the kernel drops under "
                "pressure, not the process's own memory. The 'blob mappings' column is the RSS "
                "of mappings under the data dir (/proc/<pid>/smaps, sampled every 200 ms). "
                f"Here (libtorrent {libtorrent_version()}) it peaked at {agent_maps_mb:.0f} MB "
                "in the agent: libtorrent 2.1's default disk backend uses pread/pwrite, not "
                "mmap, so what the agent holds, including libtorrent's buffer of blocks "
                "waiting to be written (max_queued_disk_bytes), is RssAnon. "
                f"The agent peaked at RssAnon {anon_mb:.0f} MB: target < "
                f"{AGENT_RSS_TARGET_MB} MB {'met' if anon_mb < AGENT_RSS_TARGET_MB else 'NOT met'}."
            )
        if not args.skip_push:
            from tests.support.dockerd import docker_unavailable_reason

            reason = docker_unavailable_reason()
            if reason is not None:
                print(f"\npush vs save skipped: {reason}")
            else:
                r = push_vs_save_part(args.size_mib, args.runs, tmp)
                print(
                    f"\n## docketctl push from a Docker engine vs docker save "
                    f"(image of {r.image_bytes / MB:.0f} MB, medians of {args.runs})\n"
                )
                print(push_save_table(r))
                print(
                    "\ndocker save: the SDK's image.save() streamed to a file. docketctl push: "
                    "the same engine, to a docket-server on loopback over TLS (which hashes and "
                    "stores every byte); `docketctl rm` between runs so each push uploads the "
                    "image."
                )
    print(f"\nlogs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
