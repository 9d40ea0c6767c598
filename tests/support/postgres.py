"""A throwaway PostgreSQL server for tests: initdb into a temp dir, postgres on a free
127.0.0.1 port, a fresh database per test, everything removed at the end.

PostgreSQL refuses to run as root: as root, initdb and postgres run as the ``postgres`` user
(Debian's package makes it) or, without one, ``nobody``.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg

from tests.support.processes import stop_process
from tests.support.server import free_port

USER = "docket"
PASSWORD = "docket-test-password"


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and postgres."""
    found = [
        d
        for d in Path("/usr/lib/postgresql").glob("*/bin")
        if (d / "initdb").exists() and (d / "postgres").exists()
    ]
    found.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and Path(initdb).with_name("postgres").exists() else None


def postgres_unavailable_reason() -> str | None:
    """Why a throwaway PostgreSQL cannot run here, or None if it should."""
    if find_bin_dir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    return None


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run PostgreSQL as when we are root (None: as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and there is no postgres or nobody user to run as")


@dataclass
class PostgresServer:
    """``with PostgresServer() as pg: url = pg.create_database()``."""

    port: int = field(default_factory=free_port)
    root: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _names: count[int] = field(default_factory=lambda: count(1))

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    def url(self, database: str, password: str = PASSWORD) -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+asyncpg://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> PostgresServer:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed")
        user = _run_as()
        # Not under pytest's tmp dirs: those are 0700 root, and postgres may run as another.
        self.root = Path(tempfile.mkdtemp(prefix="docket-pg-"))
        data, sockets = self.root / "data", self.root / "sockets"
        sockets.mkdir()
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if user is not None:
            for path in (self.root, sockets, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        as_user: dict[str, Any] = {}
        if user is not None:
            as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            cwd=self.root,
            capture_output=True,
            check=True,
            timeout=120,
            **as_user,
        )
        log = self.log_path.open("ab")
        if user is not None:
            os.chown(self.log_path, user.pw_uid, user.pw_gid)
        self.proc = subprocess.Popen(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-k",
                str(sockets),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                # A test database loses nothing it needs to a crash: no waiting for disks.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            **as_user,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited early:\n{self.log_tail()}")
            try:
                self._admin("SELECT 1")
                return self
            except (OSError, asyncpg.PostgresError) as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"postgres not ready: {e}\n{self.log_tail()}") from e
                time.sleep(0.1)

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def _admin(self, statement: str) -> None:
        """Runs one statement as the superuser, on a loop of its own (callers may be inside
        a running one)."""
        errors: list[BaseException] = []

        async def run() -> None:
            conn = await asyncpg.connect(
                host="127.0.0.1",
                port=self.port,
                user=USER,
                password=PASSWORD,
                database="postgres",
                timeout=5,
            )
            try:
                await conn.execute(statement)
            finally:
                await conn.close()

        def target() -> None:
            try:
                asyncio.run(run())
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except (FileNotFoundError, AssertionError):
            return "(no log)"

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT, 30)  # SIGINT: a fast shutdown
        self.proc = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
