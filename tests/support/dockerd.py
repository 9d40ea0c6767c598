"""A private, throw-away Docker engine for tests.

`DockerEngine` starts its own ``dockerd`` (which starts its own ``containerd``) with every
piece of state under one short temporary directory, so it never touches a system engine
and two test sessions can each run one at the same time::

    with DockerEngine() as engine:
        engine.client.containers.run("some/image", ["echo", "hi"], remove=True)
        subprocess.run(["docker", "ps"], env=engine.env())

Layout of the directory (``/tmp/dkt-XXXXXXXX``; kept short because a unix socket path must
fit in 108 bytes, and containerd puts its sockets under the exec root)::

    data/          --data-root  (images, containers; overlay2 mounts live here)
    exec/          --exec-root  (containerd's state and sockets, netns, runc state)
    docker.sock    the API socket (``engine.host`` = ``unix://…/docker.sock``)
    docker.pid     --pidfile
    daemon.json    an empty config, so /etc/docker/daemon.json of the machine is not read
    dockerd.log    dockerd's (and its containerd's) output

Requires root (dockerd mounts filesystems and makes cgroups).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import docker

from tests.support.processes import stop_process

#: Storage drivers tried in order. overlay2 is much faster; vfs works everywhere (full copies).
DEFAULT_STORAGE_DRIVERS: tuple[str, ...] = ("overlay2", "vfs")
#: Set to force one storage driver (e.g. ``vfs``) for the test engine.
STORAGE_DRIVER_ENV = "DOCKET_TEST_STORAGE_DRIVER"

_EXTRA_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class DockerEngineError(RuntimeError):
    """The private engine could not be started (the message carries the tail of its log)."""


class _StartFailed(Exception):
    """One start attempt failed; ``exited`` tells whether dockerd quit on its own."""

    def __init__(self, message: str, *, exited: bool) -> None:
        super().__init__(message)
        self.exited = exited


def find_dockerd() -> str | None:
    """Path of the dockerd binary, looking in the sbin directories too (not always on PATH)."""
    found = shutil.which("dockerd")
    if found:
        return found
    for directory in _EXTRA_PATH:
        candidate = Path(directory) / "dockerd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def docker_unavailable_reason() -> str | None:
    """Why a private engine cannot run on this machine, or None if it should."""
    if find_dockerd() is None:
        return "dockerd is not installed (apt-get install docker.io)"
    if os.geteuid() != 0:
        return "starting a private dockerd needs root"
    return None


@functools.cache
def _dockerd_help(dockerd: str) -> str:
    result = subprocess.run(
        [dockerd, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    return result.stdout + result.stderr


def _supports_flag(dockerd: str, flag: str) -> bool:
    return flag in _dockerd_help(dockerd).split()


def _mount_points_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(root).rstrip("/")
    points: list[str] = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return points
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        # Octal escapes for space, tab, newline and backslash.
        point = (
            fields[4]
            .replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
        )
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: (p.count("/"), len(p)), reverse=True)


def unmount_all_under(root: Path) -> None:
    """Best effort: unmount everything mounted at or below `root` (overlay, shm, netns...)."""
    for _attempt in range(3):
        points = _mount_points_under(root)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", "-R", point], capture_output=True, check=False)
        for point in _mount_points_under(root):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _pids_referring_to(root: Path) -> list[int]:
    """Processes whose command line names `root` (our containerd and shims), never ourselves."""
    needle = (str(root).rstrip("/") + "/").encode()
    me = os.getpid()
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry.name))
    return pids


def _container_ids(data_root: Path) -> list[str]:
    """Ids of the containers an engine knows (the directories under data-root/containers)."""
    try:
        return [entry.name for entry in (data_root / "containers").iterdir() if entry.is_dir()]
    except OSError:
        return []


def _pids_in_containers(ids: Sequence[str]) -> list[int]:
    """Processes whose cgroup names one of the container `ids` (any cgroup layout)."""
    if not ids:
        return []
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroups = (entry / "cgroup").read_text()
        except OSError:
            continue
        if any(container_id in cgroups for container_id in ids):
            pids.append(int(entry.name))
    return pids


def _remove_container_cgroups(ids: Sequence[str]) -> None:
    """Best effort: rmdir the (empty) cgroups left by containers of a killed engine."""
    root = Path("/sys/fs/cgroup")
    for container_id in ids:
        for pattern in (f"*/docker/{container_id}", f"docker/{container_id}"):
            for directory in root.glob(pattern):
                with contextlib.suppress(OSError):
                    directory.rmdir()


def _raw_ping(socket_path: Path, timeout: float = 2.0) -> bool:
    """GET /_ping on the socket by hand (the SDK leaks a socket when connecting fails)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]
    except OSError:
        return False
    finally:
        sock.close()


class DockerEngine:
    """A dockerd started as a subprocess with all its state under a temporary directory.

    Use as a context manager, or call `start()` / `stop()` yourself. `stop()` is also run
    at interpreter exit if it was forgotten.
    """

    def __init__(
        self,
        *,
        dockerd: str | None = None,
        storage_drivers: Sequence[str] | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 20.0,
        log_level: str = "warn",
        daemon_config: dict[str, Any] | None = None,
        netns: str | None = None,
    ) -> None:
        self.dockerd = dockerd or find_dockerd() or "dockerd"
        if storage_drivers is None:
            forced = os.environ.get(STORAGE_DRIVER_ENV, "").strip()
            storage_drivers = (forced,) if forced else DEFAULT_STORAGE_DRIVERS
        self.storage_drivers: tuple[str, ...] = tuple(storage_drivers)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_level = log_level
        #: What goes into daemon.json (registry-mirrors, insecure-registries...).
        self.daemon_config = daemon_config or {}
        #: A network namespace to run dockerd in (a benchmark cluster's host), so that its
        #: pulls go over that host's link; its socket is reachable from anywhere.
        self.netns = netns
        #: The storage driver in use once started.
        self.storage_driver: str | None = None
        #: Seconds the last successful start took.
        self.start_seconds: float | None = None
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._client: docker.DockerClient | None = None

    # -- public surface -------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise RuntimeError("DockerEngine is not started")
        return self._dir

    @property
    def socket_path(self) -> Path:
        return self.dir / "docker.sock"

    @property
    def host(self) -> str:
        """The ``unix://`` URL of the engine, as DOCKER_HOST wants it."""
        return f"unix://{self.socket_path}"

    @property
    def log_path(self) -> Path:
        return self.dir / "dockerd.log"

    @property
    def client(self) -> docker.DockerClient:
        """A docker SDK client for this engine (closed by `stop()`)."""
        if self._client is None:
            raise RuntimeError("DockerEngine is not started")
        return self._client

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """A copy of os.environ (or `base`) that points docker clients at this engine."""
        env = dict(os.environ if base is None else base)
        env["DOCKER_HOST"] = self.host
        for name in ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"):
            env.pop(name, None)
        return env

    def new_client(self, **kwargs: Any) -> docker.DockerClient:
        """Another client of this engine; the caller closes it."""
        kwargs.setdefault("version", "auto")
        kwargs.setdefault("timeout", 300)
        return docker.DockerClient(base_url=self.host, **kwargs)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return "(no dockerd log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> DockerEngine:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- start ----------------------------------------------------------------------------

    def start(self) -> DockerEngine:
        if self._dir is not None:
            raise RuntimeError("DockerEngine is already started")
        started = time.monotonic()
        self._dir = Path(tempfile.mkdtemp(prefix="dkt-", dir="/tmp"))
        atexit.register(self.stop)
        failures: list[str] = []
        try:
            for index, driver in enumerate(self.storage_drivers):
                try:
                    self._start_with(driver)
                except _StartFailed as failure:
                    failures.append(f"--- storage driver {driver}: {failure}")
                    self._stop_process()
                    self._reset_state_dirs()
                    last = index == len(self.storage_drivers) - 1
                    if last or not failure.exited:
                        # A hang is not a storage-driver problem: don't wait for it twice.
                        raise DockerEngineError(
                            "could not start a private dockerd:\n" + "\n".join(failures)
                        ) from None
                else:
                    self.storage_driver = driver
                    break
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def command(self, storage_driver: str) -> list[str]:
        """The dockerd command line for this engine's directory."""
        d = self.dir
        cmd = [
            self.dockerd,
            f"--config-file={d / 'daemon.json'}",
            f"--data-root={d / 'data'}",
            f"--exec-root={d / 'exec'}",
            f"--pidfile={d / 'docker.pid'}",
            f"--host=unix://{d / 'docker.sock'}",
            "--bridge=none",
            "--iptables=false",
            f"--storage-driver={storage_driver}",
            f"--log-level={self.log_level}",
        ]
        if _supports_flag(self.dockerd, "--ip6tables"):
            cmd.append("--ip6tables=false")
        if _supports_flag(self.dockerd, "--userland-proxy"):
            cmd.append("--userland-proxy=false")
        if _supports_flag(self.dockerd, "--shutdown-timeout"):
            cmd.append("--shutdown-timeout=5")
        return cmd

    def _start_with(self, storage_driver: str) -> None:
        d = self.dir
        (d / "daemon.json").write_text(json.dumps(self.daemon_config) + "\n")
        env = dict(os.environ)
        for name in ("DOCKER_HOST", "DOCKER_CONTEXT", "NOTIFY_SOCKET"):
            env.pop(name, None)
        path = env.get("PATH", "").split(":")
        env["PATH"] = ":".join([p for p in path if p] + [p for p in _EXTRA_PATH if p not in path])
        self._log = self.log_path.open("ab")
        self._log.write(f"=== {' '.join(self.command(storage_driver))}\n".encode())
        self._log.flush()
        # nsenter, not `ip netns exec`: that one also mounts a sysfs of its own, without the
        # cgroup mounts dockerd needs.
        prefix = ["nsenter", f"--net=/run/netns/{self.netns}", "--"] if self.netns else []
        self._proc = subprocess.Popen(
            [*prefix, *self.command(storage_driver)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=d,
            # Its own session: a Ctrl-C in the terminal reaches pytest, which stops us cleanly.
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise _StartFailed(
                    f"dockerd exited with status {code}; tail of {self.log_path}:\n"
                    + self.log_tail(),
                    exited=True,
                )
            if self.socket_path.exists() and _raw_ping(self.socket_path):
                break
            if time.monotonic() > deadline:
                raise _StartFailed(
                    f"dockerd did not answer /_ping within {self.start_timeout:.0f}s; "
                    f"tail of {self.log_path}:\n" + self.log_tail(),
                    exited=False,
                )
            time.sleep(0.1)
        client = self.new_client()
        try:
            answered = client.ping()
        except BaseException:
            client.close()
            raise
        if not answered:
            client.close()
            raise _StartFailed("dockerd answered ping with an error", exited=False)
        self._client = client

    # -- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop dockerd (SIGTERM, SIGKILL after `stop_timeout`) and delete its directory.

        Safe to call more than once.
        """
        atexit.unregister(self.stop)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        self._stop_process()
        if self._dir is not None:
            unmount_all_under(self._dir)
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, timeout=self.stop_timeout)
        if self._dir is not None:
            # A killed dockerd leaves its containers, containerd and shims behind. Container
            # processes are found by their cgroup (named after the container id); containerd
            # and the shims name our directory on their command lines.
            ids = _container_ids(self._dir / "data")
            for pid in _pids_in_containers(ids) + _pids_referring_to(self._dir):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            self._wait_gone(self._dir, ids)
            _remove_container_cgroups(ids)
        if self._log is not None:
            self._log.close()
            self._log = None

    @staticmethod
    def _wait_gone(root: Path, ids: Sequence[str], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pids_referring_to(root) and not _pids_in_containers(ids):
                return
            time.sleep(0.05)

    def _reset_state_dirs(self) -> None:
        d = self.dir
        unmount_all_under(d)
        for name in ("data", "exec"):
            shutil.rmtree(d / name, ignore_errors=True)
        for name in ("docker.sock", "docker.pid"):
            with contextlib.suppress(FileNotFoundError):
                (d / name).unlink()
