"""Small real filesystems for tests of full disks: a tmpfs of a few MiB, mounted as root."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.netns import running_under_ci


def small_fs_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None and not Path("/bin/mount").exists():
        return "no mount(8)"
    return None


@contextmanager
def small_filesystem(path: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB mounted at ``path`` (made if need be), unmounted on the way
    out whatever happened. Without root the test is skipped, or fails under CI."""
    reason = small_fs_unavailable_reason()
    if reason is not None:
        if running_under_ci():
            pytest.fail(f"CI needs a small filesystem for this test: {reason}", pytrace=False)
        pytest.skip(reason)
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs at {path}: {mounted.stderr.strip()}"
        if running_under_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)  # busy: detach it


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
