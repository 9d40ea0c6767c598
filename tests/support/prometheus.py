"""A real Prometheus for tests: Debian's ``prometheus`` on a 127.0.0.1 port, scraping the
targets it is given every second, asked through its HTTP API as Grafana asks it.

Missing, the tests that need it are skipped, except under CI, where that is an error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.support.processes import stop_process
from tests.support.server import free_port
from tests.support.tracker import running_under_ci

START_TIMEOUT = 30.0


def find_binary(name: str) -> str | None:
    """``prometheus`` or ``promtool``: on PATH, or where Debian puts them."""
    return shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None
    )


def require_binary(name: str) -> str:
    """The binary's path; skips the test without it (fails it under CI)."""
    binary = find_binary(name)
    if binary is None:
        if running_under_ci():
            pytest.fail(f"CI needs {name} (Debian package 'prometheus')", pytrace=False)
        pytest.skip(f"{name} is not installed (Debian package 'prometheus')")
    return binary


class Prometheus:
    """Prometheus scraping ``targets`` (job name -> {instance label -> HOST:PORT}) every
    second while the context is entered; its data in a temporary directory."""

    def __init__(self, targets: dict[str, dict[str, str]]) -> None:
        self.targets = targets
        self.port = free_port()
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self._dir is not None
        return self._dir / "prometheus.log"

    def __enter__(self) -> Prometheus:
        binary = require_binary("prometheus")
        self._dir = Path(tempfile.mkdtemp(prefix="docket-prometheus-"))
        config = self._dir / "prometheus.yml"
        config.write_text(json.dumps(self.config()))  # JSON is YAML
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [
                        {"targets": [address], "labels": {"name": name}}
                        for name, address in sorted(targets.items())
                    ],
                }
                for job, targets in sorted(self.targets.items())
            ],
        }

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {START_TIMEOUT}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except (FileNotFoundError, AssertionError):
            return "(no log)"

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # The HTTP API

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query (/api/v1/query): the result vector's samples."""
        params = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return body["data"]["result"]  # type: ignore[no-any-return]

    def values(self, promql: str, by: str) -> dict[str, float]:
        """An instant query's samples as {the value of label ``by``: the sample's value}."""
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(promql)}

    def value(self, promql: str) -> float | None:
        """The one sample of an instant query; None when there is none."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_scraped_after(
        self, when: float, skip: Iterable[str] = (), timeout: float = 60.0
    ) -> None:
        """Waits until every target (but those named in ``skip``: stopped) was scraped,
        successfully, at or after ``when`` (Unix seconds): its samples then show what was
        true at that moment or later."""
        skipped = set(skip)
        expected = sum(1 for t in self.targets.values() for name in t if name not in skipped)
        deadline = time.monotonic() + timeout
        seen: dict[str, float] = {}
        while time.monotonic() < deadline:
            # timestamp() of a selector is its sample's time (of anything else, the query's).
            up = self.values("up", by="name")
            seen = {
                name: t
                for name, t in self.values("timestamp(up)", by="name").items()
                if name not in skipped and up.get(name) == 1
            }
            if len(seen) == expected and min(seen.values()) >= when:
                return
            time.sleep(0.2)
        raise AssertionError(f"targets not all scraped after {when}: {seen}\n{self.log_tail()}")
