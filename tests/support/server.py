"""Real docket-server processes for tests, and docketctl run as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """docket-server on 127.0.0.1 ports of its own, logging to data_dir/../server.log."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    bt_port: int = field(default_factory=free_port)
    registry_port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def registry(self) -> str:
        """The registry HTTP face, HOST:PORT (what `docker push` names)."""
        return f"127.0.0.1:{self.registry_port}"

    @property
    def registry_url(self) -> str:
        return f"http://{self.registry}"

    def blob_path(self, digest: str) -> Path:
        """Where the server keeps a blob's bytes."""
        hexd = digest.split(":", 1)[1]
        return self.data_dir / "blobs" / "sha256" / hexd[:2] / hexd

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-server.log"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                str(BIN / "docket-server"),
                "--listen",
                self.address,
                "--bt-listen",
                f"127.0.0.1:{self.bt_port}",
                "--registry-listen",
                self.registry,
                "--data-dir",
                str(self.data_dir),
                "--log-level",
                "debug",
                "--log-json",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"docket-server exited early:\n{self.log_tail()}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"docket-server not serving after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def docketctl(
    *args: str,
    server: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
    input_bytes: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs docketctl as a user would; never raises for a non-zero exit."""
    full_env = dict(os.environ if env is None else env)
    if server is not None:
        full_env["DOCKET_SERVER"] = server
    return subprocess.run(
        [str(BIN / "docketctl"), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        input=None if input_bytes is None else input_bytes.decode(),
        check=False,
    )


def rollout(
    server: ServerProcess, ref: str, *args: str, timeout: float = 180
) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    """Runs `docketctl rollout -o json`; returns the exit code, the events and the summary's
    hosts by name."""
    result = docketctl("rollout", ref, *args, "-o", "json", server=server.address, timeout=timeout)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert lines, result.stderr
    summary = lines[-1]["summary"]
    return result.returncode, lines[:-1], {h["host"]: h for h in summary["hosts"]}


@contextmanager
def background_rollout(
    server: ServerProcess, ref: str, selector: str, *args: str
) -> Iterator[subprocess.Popen[str]]:
    """`docketctl rollout --prefetch-only -o json` running while the test does other things;
    killed on the way out if it is still running (so a failing test cannot hang)."""
    proc = subprocess.Popen(
        [
            str(BIN / "docketctl"),
            "--server",
            server.address,
            "rollout",
            ref,
            "--hosts",
            selector,
            "--prefetch-only",
            "-o",
            "json",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
