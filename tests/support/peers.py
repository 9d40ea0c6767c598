"""Plain libtorrent clients for tests: what a user (or an attacker) who holds a torrent's
metainfo can do with it, with a certificate or without."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import libtorrent as lt

from docket_common.bt import session_settings
from docket_common.pki import DH_PARAMS
from tests.support.agents import enroll
from tests.support.server import ServerProcess, free_port


def peer_session(identity: tuple[bytes, bytes] | None, user_agent: str) -> lt.session:
    """A session on a free 127.0.0.1 port; with ``identity`` (certificate, key) its listener
    is TLS, as an agent's is on SSL torrents."""
    listen = f"127.0.0.1:{free_port()}" + ("s" if identity is not None else "")
    return lt.session(session_settings(listen, user_agent=user_agent))  # type: ignore[call-overload]


def present(handle: Any, identity: tuple[bytes, bytes] | None) -> None:
    if identity is not None:
        cert, key = identity
        handle.set_ssl_certificate_buffer(cert.decode(), key.decode(), DH_PARAMS)


def download_with_libtorrent(
    metainfo: bytes,
    seed_port: int,
    dest: Path,
    timeout: float = 60,
    identity: tuple[bytes, bytes] | None = None,
) -> int:
    """Downloads a torrent from the peer at 127.0.0.1:``seed_port``; TimeoutError, saying how
    far it got, when it is not done in ``timeout`` seconds. Returns the payload received."""
    session = peer_session(identity, "docket-test")
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(lt.bdecode(metainfo))
    params.save_path = str(dest)
    handle = session.add_torrent(params)
    present(handle, identity)
    handle.connect_peer(("127.0.0.1", seed_port))
    deadline = time.monotonic() + timeout
    try:
        while not handle.status().is_seeding:
            if time.monotonic() > deadline:
                status = handle.status()
                raise TimeoutError(
                    f"download stuck at {status.progress:.0%} "
                    f"({status.total_payload_download} bytes received)"
                )
            time.sleep(0.1)
        return int(handle.status().total_payload_download)
    finally:
        session.remove_torrent(handle)
        del session


def fleet_identity(server: ServerProcess, name: str) -> tuple[bytes, bytes]:
    """(certificate, key) of a new agent ``name`` enrolled with the server: a fleet peer."""
    identity = asyncio.run(enroll(server, name))
    return identity.cert_pem, identity.key_pem
