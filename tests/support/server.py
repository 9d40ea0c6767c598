"""Real docket-server processes for tests, and docketctl run as a user runs it."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.oci import RegistryClient
from tests.support.processes import stop_process

BIN = Path(sys.executable).parent
# A docker config.json that docker and skopeo read (DOCKER_CONFIG, REGISTRY_AUTH_FILE, set
# for the session by tests/conftest.py): every secure server started logs its admin in there,
# as a CI job runs `docker login` before it pushes. Tests of `docker login` use their own.
REGISTRY_AUTH_ENV = "REGISTRY_AUTH_FILE"


_handed_out: set[int] = set()
_random = random.SystemRandom()  # not the seeded module-level one: no repeats across runs


def free_port() -> int:
    """A port nothing listens on now, never one handed out before in this process, and below
    the kernel's ephemeral range: a process told port 0 (libtorrent's --bt-listen
    127.0.0.1:0) takes its port from that range, and once took the one handed out here for
    the same agent's registry face, before the face bound it (a CI run). The kernel may also
    give the same free port to two binds in a row, and a server's ports are all picked
    before it binds any (seen: the registry face and BitTorrent on one port)."""
    low = max(_ephemeral_low(), 11000)
    while True:
        port = _random.randrange(10000, low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass
class ServerProcess:
    """docket-server on 127.0.0.1 ports of its own, logging to data_dir/../server.log.

    Secure, as a user gets it: TLS on every port and tokens. ``env()`` is what docketctl
    needs to call it as its first admin (the token the server wrote to admin.token, and its
    CA); ``channel()``/``aio_channel()`` are gRPC channels that do the same. With
    ``insecure=True`` (tests about --insecure only) it runs plaintext, with no tokens."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    agent_port: int = field(default_factory=free_port)
    bt_port: int = field(default_factory=free_port)
    registry_port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    insecure: bool = False
    proc: subprocess.Popen[bytes] | None = None
    _join_tokens: dict[tuple[str, ...], str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def agent_address(self) -> str:
        return f"127.0.0.1:{self.agent_port}"

    @property
    def registry(self) -> str:
        """The registry HTTP face, HOST:PORT (what `docker push` names)."""
        return f"127.0.0.1:{self.registry_port}"

    @property
    def registry_url(self) -> str:
        return f"{'http' if self.insecure else 'https'}://{self.registry}"

    @property
    def ca_path(self) -> Path:
        return self.data_dir / "ca.pem"

    @property
    def ca_pem(self) -> bytes:
        return self.ca_path.read_bytes()

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def env(self, token: str | None = None) -> dict[str, str]:
        """The environment docketctl calls this server with: as its admin, or ``token``."""
        env = dict(os.environ, DOCKET_SERVER=self.address)
        for key in ("DOCKET_TOKEN", "DOCKET_CA"):
            env.pop(key, None)
        if not self.insecure:
            env["DOCKET_TOKEN"] = token if token is not None else self.admin_token
            env["DOCKET_CA"] = str(self.ca_path)
        return env

    def credentials(self, token: str | None = None) -> grpc.ChannelCredentials:
        return grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(self.ca_pem),
            grpc.access_token_call_credentials(token if token is not None else self.admin_token),
        )

    def channel(self, token: str | None = None, **options: Any) -> grpc.Channel:
        """A blocking channel to the API port, calling as the admin (or with ``token``)."""
        opts = list(options.items())
        if self.insecure:
            return grpc.insecure_channel(self.address, options=opts)
        return grpc.secure_channel(self.address, self.credentials(token), options=opts)

    def aio_channel(self, token: str | None = None, **options: Any) -> grpc.aio.Channel:
        opts = list(options.items())
        if self.insecure:
            return grpc.aio.insecure_channel(self.address, options=opts)
        return grpc.aio.secure_channel(self.address, self.credentials(token), options=opts)

    def join_token(self, *args: str) -> str:
        """A join token (role agent) made with `docketctl tokens create` and these options;
        one per set of options, made once."""
        key = tuple(args)
        if key not in self._join_tokens:
            result = docketctl("tokens", "create", "--role", "agent", *args, server=self)
            assert result.returncode == 0, result.stderr
            self._join_tokens[key] = result.stdout.strip()
        return self._join_tokens[key]

    def token(self, role: str, *args: str) -> str:
        """A new token of ``role``."""
        result = docketctl("tokens", "create", "--role", role, *args, server=self)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def registry_client(self, token: str | None = None) -> RegistryClient:
        """A registry HTTP client that trusts the server's CA and logs in as the admin (or
        with ``token``; "" for none)."""
        auth = None
        if not self.insecure:
            secret = self.admin_token if token is None else token
            auth = ("docket", secret) if secret else None
        return RegistryClient(
            self.registry_url, auth=auth, verify=False if self.insecure else str(self.ca_path)
        )

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
                "--agent-listen",
                self.agent_address,
                *(["--insecure"] if self.insecure else []),
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
        if not self.insecure:
            self.log_in_registry_clients()
        return self

    def log_in_registry_clients(self) -> None:
        """Adds this server's registry face and admin token to the session's docker config."""
        path = os.environ.get(REGISTRY_AUTH_ENV)
        if not path:
            return
        auth_file = Path(path)
        config = json.loads(auth_file.read_text()) if auth_file.exists() else {}
        secret = base64.b64encode(f"docket:{self.admin_token}".encode()).decode()
        config.setdefault("auths", {})[self.registry] = {"auth": secret}
        auth_file.parent.mkdir(parents=True, exist_ok=True)
        auth_file.write_text(json.dumps(config))

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.insecure and not self.ca_path.exists() and time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"docket-server exited early:\n{self.log_tail()}")
            time.sleep(0.05)
        channel = (
            grpc.insecure_channel(self.address)
            if self.insecure
            else grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.ca_pem))
        )
        with channel:
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
        code = stop_process(self.proc, sig, timeout)
        self.proc = None
        return code or 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def docketctl(
    *args: str,
    server: ServerProcess | str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
    input_bytes: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs docketctl as a user would; never raises for a non-zero exit. Given a
    ServerProcess, it calls that server as its admin (``env`` overrides that environment);
    given an address, with no token or CA."""
    prefix: list[str] = []
    if isinstance(server, ServerProcess):
        full_env = server.env() | (env or {})
        if server.insecure:
            prefix = ["--insecure"]
    else:
        full_env = dict(os.environ if env is None else env)
        if server is not None:
            full_env["DOCKET_SERVER"] = server
    # Never the user's own contexts.
    full_env.setdefault("XDG_CONFIG_HOME", str(Path(tempfile.gettempdir(), "docket-tests-config")))
    return subprocess.run(
        [str(BIN / "docketctl"), *prefix, *args],
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
    result = docketctl("rollout", ref, *args, "-o", "json", server=server, timeout=timeout)
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
        env=server.env(),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
