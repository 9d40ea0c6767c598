"""Stopping the real processes the tests start (servers, agents, dockerd, PostgreSQL, …)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from typing import Any


def stop_process(
    proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 15.0
) -> int | None:
    """Sends ``sig`` to ``proc`` if it still runs, waits up to ``timeout`` seconds for it to
    exit, and kills it if it has not; returns its exit code (None without a process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode
