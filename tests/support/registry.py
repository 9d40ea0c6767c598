"""Debian's docker-registry (the CNCF distribution registry, the protocol's reference) as a
real process, and skopeo run as a user runs it: for interop tests and the benchmarks."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.processes import stop_process
from tests.support.server import free_port

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: {addr}
"""

Popen = Callable[..., "subprocess.Popen[Any]"]


def registry_env() -> dict[str, str]:
    """This environment without REGISTRY_* variables, which docker-registry reads as
    settings (REGISTRY_AUTH_FILE, say, which skopeo and podman read as a credentials file)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


def tool(name: str) -> str:
    """The path of a Debian tool, looking in the sbin directories too."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (scripts/setup.sh installs it)")
    return found


@dataclass
class ReferenceRegistry:
    """docker-registry serving ``root`` on ``host:port``; ``popen`` starts it (in a network
    namespace, for the benchmark cluster)."""

    root: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    popen: Popen = subprocess.Popen
    log: Path | None = None  # default: beside root
    proc: subprocess.Popen[Any] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log or self.root.parent / f"{self.root.name}-registry.log"

    def start(self, timeout: float = 30.0, listening: Callable[[], bool] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root.parent / f"{self.root.name}-registry.yml"
        config.write_text(CONFIG.format(root=self.root, addr=self.address))
        with self.log_path.open("ab") as log:
            self.proc = self.popen(
                [tool("docker-registry"), "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=registry_env(),
            )
        up = listening or self._listening
        deadline = time.monotonic() + timeout
        while not up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"docker-registry not listening after {timeout}s")
            time.sleep(0.05)

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        self.proc = None


def skopeo(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """skopeo with no signature policy and plain HTTP to 127.0.0.1; never raises."""
    return subprocess.run(
        [tool("skopeo"), "--insecure-policy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def skopeo_ok(*args: str, timeout: float = 300.0) -> str:
    result = skopeo(*args, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout
