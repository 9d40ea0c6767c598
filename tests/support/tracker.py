"""A real BitTorrent tracker for tests: Debian's ``opentracker`` on 127.0.0.1.

Debian builds opentracker with ``WANT_ACCESSLIST_WHITE``: it answers announces only for the
info hashes listed in its whitelist file (any other gets "Requested download is not
authorized for use with this tracker."), and that cannot be switched off without
recompiling. So a :class:`Tracker` keeps a whitelist of its own: pass the torrents' info
hashes as ``allowed=`` or to :meth:`Tracker.allow` (which rewrites the file, sends SIGHUP -
opentracker re-reads the list then - and waits until the tracker accepts them).

Run as root, opentracker chroots to its ``-d`` directory and drops to ``-u nobody``; as
another user it only chdirs there. Either way it needs nothing but a private directory that
``nobody`` can read, holding the whitelist (named relative to that directory). No config
file, no /etc or /var paths.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import libtorrent as lt
import pytest

from tests.support.processes import stop_process

START_TIMEOUT = 10.0
WHITELIST = "whitelist"
# A peer that announces only to check the tracker answers; removed again with event=stopped.
_PROBE_PEER_ID = b"-DKPROBE-" + b"0" * 11
_PROBE_PORT = 9


def running_under_ci() -> bool:
    """True when CI is set to anything but empty/0/false/no (as tests/conftest.py reads it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_opentracker() -> str | None:
    return shutil.which("opentracker") or next(
        (p for p in ("/usr/bin/opentracker", "/usr/sbin/opentracker") if Path(p).is_file()),
        None,
    )


def reserve_port() -> tuple[socket.socket, int]:
    """A 127.0.0.1 port free for TCP and UDP, and a TCP socket bound to it with SO_REUSEPORT.

    opentracker binds its ports with SO_REUSEPORT: a second instance on a port already in
    use starts without complaint and the two share the connections. Keeping this socket
    bound (not listening: it takes no connections) while our opentracker runs keeps bind(0)
    from ever handing the port to anyone else, and opentracker can still bind it."""
    for _ in range(50):
        tcp = socket.socket()
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind(("127.0.0.1", port))
        except OSError:
            tcp.close()
            continue
        return tcp, port
    raise RuntimeError("no port free for both TCP and UDP on 127.0.0.1")


def _hash_bytes(info_hash: str) -> bytes:
    raw = bytes.fromhex(info_hash)
    if len(raw) != 20:
        raise ValueError(f"{info_hash!r} is not a 40-hex-digit v1 info hash")
    return raw


class Tracker:
    """opentracker on 127.0.0.1:``port`` (TCP and UDP) while the context is entered.

    ``announce_url`` is "http://127.0.0.1:PORT/announce". Only whitelisted info hashes
    (``allowed``, :meth:`allow`) are tracked.
    """

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.port = 0
        self._allowed: list[str] = []
        for info_hash in allowed:
            _hash_bytes(info_hash)
            self._allowed.append(info_hash.lower())
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._reservation: socket.socket | None = None

    @property
    def announce_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/announce"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Tracker:
        binary = find_opentracker()
        if binary is None:
            if running_under_ci():
                raise RuntimeError("CI needs opentracker (Debian package 'opentracker')")
            pytest.skip("opentracker is not installed")
        try:
            self._start(binary)
            self._wait_taken(self._allowed, START_TIMEOUT)
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

    def _start(self, binary: str) -> None:
        # Not pytest's tmp_path: that is 0700, and a root opentracker reads as nobody.
        self._dir = Path(tempfile.mkdtemp(prefix="docket-tracker-"))
        self._dir.chmod(0o755)
        self._write_whitelist()
        # Retry if opentracker cannot start on the port (its UDP side is not reserved).
        for attempt in range(3):
            self._reservation, self.port = reserve_port()
            self._launch(binary)
            try:
                self._wait_ready()
                return
            except _ExitedEarlyError:
                if attempt == 2:
                    raise
                self._proc = None
                self._reservation.close()

    def _launch(self, binary: str) -> None:
        log = self._log_path.open("wb")
        self._proc = subprocess.Popen(
            [binary, *self._args()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
        )
        log.close()

    def _args(self) -> list[str]:
        """Bind 127.0.0.1 only, TCP and UDP on our port (UDP would take 6969 otherwise);
        chroot/chdir to our directory; read the whitelist there."""
        port = str(self.port)
        listen = ["-i", "127.0.0.1", "-p", port, "-P", port]
        return [*listen, "-d", str(self._dir), "-u", "nobody", "-w", WHITELIST]

    @property
    def _log_path(self) -> Path:
        assert self._dir is not None
        return self._dir / "opentracker.log"

    def output(self) -> str:
        """What opentracker printed (stdout and stderr)."""
        try:
            return self._log_path.read_text(errors="replace")
        except (AssertionError, FileNotFoundError):
            return "(no output)"

    def _wait_ready(self) -> None:
        """Until the TCP port accepts connections and then answers HTTP: opentracker binds
        while parsing its arguments, before it is ready (and before it blocks SIGHUP)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise _ExitedEarlyError(
                    f"opentracker exited with {self._proc.returncode}:\n{self.output()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                # event=stopped is answered even for hashes off the whitelist and adds no peer.
                self.announce("00" * 20, port=_PROBE_PORT, peer_id=_PROBE_PEER_ID, event="stopped")
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"opentracker not answering on 127.0.0.1:{self.port} after "
                    f"{START_TIMEOUT}s:\n{self.output()}"
                )
            time.sleep(0.05)

    def _write_whitelist(self) -> None:
        assert self._dir is not None
        path = self._dir / WHITELIST
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{h}\n" for h in self._allowed))
        tmp.chmod(0o644)
        tmp.replace(path)

    def allow(self, *info_hashes: str, timeout: float = START_TIMEOUT) -> None:
        """Whitelists these v1 info hashes (hex) and waits until the tracker takes them."""
        new = [h.lower() for h in info_hashes if h.lower() not in self._allowed]
        for info_hash in new:
            _hash_bytes(info_hash)
        if not new:
            return
        self._allowed += new
        if not self.running:
            return  # written when it starts
        self._write_whitelist()
        self._wait_taken(new, timeout)

    def _wait_taken(self, info_hashes: list[str], timeout: float) -> None:
        """Until the tracker accepts these hashes. It reads the list in a thread of its own,
        at start and on each SIGHUP: it can answer announces before the first read is done."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        pending = list(info_hashes)
        while pending:
            self._proc.send_signal(signal.SIGHUP)  # the list is re-read on each SIGHUP
            time.sleep(0.05)
            while pending:
                reply = self.announce(pending[0], port=_PROBE_PORT, peer_id=_PROBE_PEER_ID)
                if b"failure reason" in reply:
                    break
                self.announce(pending[0], port=_PROBE_PORT, peer_id=_PROBE_PEER_ID, event="stopped")
                pending.pop(0)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(
                    f"opentracker still refuses {pending[0]} after {timeout}s:\n{self.output()}"
                )

    def announce(
        self,
        info_hash: str,
        *,
        port: int,
        peer_id: bytes = b"-DKTEST0-" + b"0" * 11,
        event: str | None = None,
        left: int = 0,
        timeout: float = 5.0,
    ) -> bytes:
        """One HTTP announce (compact); returns the bencoded reply as sent."""
        query: dict[str, Any] = {
            "info_hash": _hash_bytes(info_hash),
            "peer_id": peer_id,
            "port": port,
            "uploaded": 0,
            "downloaded": 0,
            "left": left,
            "compact": 1,
        }
        if event is not None:
            query["event"] = event
        # %XX for every byte, as BitTorrent clients send it: opentracker does not read "+"
        # (urlencode's default for a 0x20 byte) as a space, so it refused every info hash
        # holding one, whitelisted or not (1 in 13 random hashes; 5 of 40 in a try).
        encoded = urllib.parse.urlencode(query, safe="", quote_via=urllib.parse.quote)
        url = f"{self.announce_url}?{encoded}"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bytes(response.read())

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, timeout=5)
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class _ExitedEarlyError(RuntimeError):
    pass


def decode_reply(reply: bytes) -> dict[bytes, Any]:
    """A tracker reply, bdecoded (keys stay bytes)."""
    decoded = lt.bdecode(reply)
    if not isinstance(decoded, dict):
        raise TypeError(f"not a bencoded dictionary: {reply[:100]!r}")
    return decoded
