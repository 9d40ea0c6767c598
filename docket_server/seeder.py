"""The server's libtorrent session: the origin seed of every stored blob.

Blobs are added in seed mode: libtorrent trusts that the file is complete and checks each
piece against its hash the first time it sends it, so a restart re-seeds thousands of blobs at
once without reading them all first. Alerts wake the event loop through set_alert_notify.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import libtorrent as lt
import structlog

from docket_common.bt import session_settings
from docket_server.domain.models import Blob

log = structlog.get_logger()


class SeederError(Exception):
    pass


class Seeder:
    def __init__(self, listen: str, blob_path: Callable[[str], Path]) -> None:
        """``blob_path`` tells where a blob's file is: the blob store's local_path."""
        self.listen = listen
        self._blob_path = blob_path
        self._session: lt.session | None = None
        self._handles: dict[str, lt.torrent_handle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening: asyncio.Future[int] | None = None

    @property
    def session(self) -> lt.session:
        if self._session is None:
            raise RuntimeError("seeder not started")
        return self._session

    async def start(self) -> int:
        """Opens the session; returns the port it listens on once it does."""
        self._loop = asyncio.get_running_loop()
        self._listening = self._loop.create_future()
        self._session = lt.session(session_settings(self.listen, user_agent="docket-server"))  # type: ignore[call-overload]  # the bindings take a plain settings dict
        self._session.set_alert_notify(self._notify)
        self._drain()  # alerts may have arrived before the notify hook was set
        try:
            async with asyncio.timeout(10):
                return await self._listening
        except TimeoutError as e:
            raise SeederError(f"BitTorrent listener on {self.listen} did not start") from e

    def _notify(self) -> None:
        # Called on a libtorrent thread: hand the work to the event loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        if self._session is None:
            return
        for alert in self._session.pop_alerts():
            if isinstance(alert, lt.listen_succeeded_alert):
                if alert.socket_type == lt.socket_type_t.tcp:
                    log.info("seeder listening", address=f"{alert.address}:{alert.port}")
                    if self._listening and not self._listening.done():
                        self._listening.set_result(alert.port)
            elif isinstance(alert, lt.listen_failed_alert):
                log.error("seeder cannot listen", listen=self.listen, error=alert.message())
                if self._listening and not self._listening.done():
                    self._listening.set_exception(
                        SeederError(f"cannot listen on {self.listen}: {alert.error.message()}")
                    )
            elif isinstance(alert, lt.torrent_error_alert | lt.file_error_alert):
                log.error("seeding failed", error=alert.message())
            elif isinstance(alert, lt.hash_failed_alert):
                log.error("stored blob fails its piece hash", error=alert.message())

    def seed(self, blob: Blob) -> None:
        if blob.torrent is None or blob.digest in self._handles:
            return
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(blob.torrent.metainfo)
        params.save_path = str(self._blob_path(blob.digest).parent)
        params.flags = (params.flags | lt.torrent_flags.seed_mode) & ~(
            lt.torrent_flags.auto_managed | lt.torrent_flags.paused
        )
        self._handles[blob.digest] = self.session.add_torrent(params)

    def unseed(self, digest: str) -> None:
        handle = self._handles.pop(digest, None)
        if handle is not None:
            self.session.remove_torrent(handle)

    def seeding(self) -> list[str]:
        return sorted(self._handles)

    def torrent_state(self, digest: str) -> str:
        handle = self._handles.get(digest)
        return "absent" if handle is None else str(handle.status().state)

    def close(self) -> None:
        if self._session is not None:
            self._session.set_alert_notify(lambda: None)
            self._session.pause()
            self._handles.clear()
            self._session = None
