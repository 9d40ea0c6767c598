"""Run a command on a real pseudo-terminal and collect what a person would see."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time


def run_in_pty(
    argv: list[str], env: dict[str, str], timeout: float = 120.0, columns: int = 120
) -> tuple[int, str]:
    """Runs ``argv`` with stdin, stdout and stderr on one pty; returns (exit code, output)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        argv,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env | {"COLUMNS": str(columns), "LINES": "40", "TERM": "xterm-256color"},
        close_fds=True,
    )
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.1)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the other side closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise TimeoutError(f"{argv[0]} still running after {timeout}s")
        return proc.wait(10), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(leader)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def plain(screen: str) -> str:
    """The text without colours and cursor movements."""
    return _ANSI.sub("", screen)
