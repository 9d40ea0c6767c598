"""A BitTorrent peer that serves corrupt data, to test that downloaders drop it.

It claims to have every piece of a torrent and serves a copy of the content with one byte
flipped in every 16 KiB block (so every block, and so every piece, it sends is wrong).

How libtorrent 2.1 is made to serve unverified data: the torrent is added with
``add_torrent_params.have_pieces`` all True (what resume data of a complete seed says) and
``torrent_flags.no_verify_files``. libtorrent then trusts that it has every piece - it only
checks the file is there with the right size - and reads pieces from disk for peers without
hashing them. ``seed_mode`` would not do: it hashes each piece the first time a peer asks for
it and, finding it corrupt, stops serving it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import libtorrent as lt

from docket_common.bt import session_settings
from tests.support.peers import present

BLOCK = 16 * 1024  # libtorrent's request size
START_TIMEOUT = 10.0


def corrupt_copy(data: bytes) -> bytes:
    """``data`` with the first byte of every 16 KiB block inverted."""
    bad = bytearray(data)
    for offset in range(0, len(bad), BLOCK):
        bad[offset] ^= 0xFF
    return bytes(bad)


class CorruptPeer:
    """A libtorrent session on 127.0.0.1 seeding corrupt content for ``metainfo``.

    ``port``/``endpoint`` say where it listens once the context is entered;
    ``uploaded_bytes()`` is the payload it has sent so far.
    """

    def __init__(
        self,
        metainfo: bytes,
        data: bytes,
        workdir: Path,
        identity: tuple[bytes, bytes] | None = None,
    ) -> None:
        """``identity`` (certificate, key): a fleet peer's, to take part in SSL torrents."""
        self.info = lt.torrent_info(lt.bdecode(metainfo))
        if self.info.total_size() != len(data):
            raise ValueError(
                f"{len(data)} bytes of data for a {self.info.total_size()}-byte torrent"
            )
        self.data = data
        self.workdir = workdir
        self.identity = identity
        self.port = 0
        self._session: lt.session | None = None
        self._handle: lt.torrent_handle | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def path(self) -> Path:
        """The corrupt copy it serves."""
        return self.workdir / self.info.name()

    @property
    def handle(self) -> lt.torrent_handle:
        if self._handle is None:
            raise RuntimeError("the corrupt peer is not started")
        return self._handle

    def __enter__(self) -> CorruptPeer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        bad = corrupt_copy(self.data)
        self._check_every_piece_is_corrupt(bad)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(bad)

        settings: dict[str, Any] = {
            **session_settings(
                "127.0.0.1:0s" if self.identity else "127.0.0.1:0",
                user_agent="docket-test-corrupt-peer",
            ),
            "upload_rate_limit": 0,  # unlimited
            # Unchoke every interested peer at once: as many upload slots as peers.
            "choking_algorithm": int(lt.choking_algorithm_t.fixed_slots_choker),
            "unchoke_slots_limit": -1,
        }
        self._session = lt.session(settings)  # type: ignore[call-overload]  # a dict works
        self.port = self._wait_listening()

        params = lt.add_torrent_params()
        params.ti = self.info
        params.save_path = str(self.workdir)
        params.have_pieces = [True] * self.info.num_pieces()
        params.flags = (params.flags | lt.torrent_flags.no_verify_files) & ~(
            lt.torrent_flags.seed_mode | lt.torrent_flags.auto_managed | lt.torrent_flags.paused
        )
        self._handle = self._session.add_torrent(params)
        present(self._handle, self.identity)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._handle.status().is_seeding:
            if time.monotonic() > deadline:
                status = self._handle.status()
                raise TimeoutError(
                    f"corrupt peer not seeding after {START_TIMEOUT}s: state {status.state}, "
                    f"error {status.errc.message() if status.errc.value() else 'none'}"
                )
            time.sleep(0.02)

    def _check_every_piece_is_corrupt(self, bad: bytes) -> None:
        length = self.info.piece_length()
        for piece in range(self.info.num_pieces()):
            chunk = bad[piece * length : (piece + 1) * length]
            if hashlib.sha1(chunk).digest() == self.info.hash_for_piece(piece):
                raise AssertionError(f"piece {piece} of the corrupt copy is not corrupt")

    def _wait_listening(self) -> int:
        assert self._session is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self._session.wait_for_alert(100)
            for alert in self._session.pop_alerts():
                if isinstance(alert, lt.listen_succeeded_alert) and alert.socket_type == (
                    lt.socket_type_t.tcp_ssl if self.identity else lt.socket_type_t.tcp
                ):
                    return int(alert.port)
                if isinstance(alert, lt.listen_failed_alert):
                    raise OSError(f"corrupt peer cannot listen: {alert.message()}")
        raise TimeoutError(f"corrupt peer not listening after {START_TIMEOUT}s")

    def uploaded_bytes(self) -> int:
        """Payload bytes (piece data) sent to peers since it started."""
        return int(self.handle.status().total_payload_upload)

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            if self._handle is not None:
                session.remove_torrent(self._handle)
            session.pause()
        self._handle = None
