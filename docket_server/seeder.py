"""The server's libtorrent session: the origin seed of every stored blob.

Blobs are added in seed mode: libtorrent trusts that the file is complete and checks each
piece against its hash the first time it sends it, so a restart re-seeds thousands of blobs at
once without reading them all first. Alerts are handled on the event loop (see TorrentSession).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import libtorrent as lt
import structlog

from docket_common.bt import TorrentSession
from docket_server.domain.models import Blob

log = structlog.get_logger()


class Seeder(TorrentSession):
    def __init__(
        self, listen: str, blob_path: Callable[[str], Path], upload_rate_limit: int = 0
    ) -> None:
        """``blob_path`` tells where a blob's file is: the blob store's local_path."""
        super().__init__(listen, user_agent="docket-server", upload_rate_limit=upload_rate_limit)
        self._blob_path = blob_path
        self._handles: dict[str, lt.torrent_handle] = {}
        self._sizes: dict[str, int] = {}  # of the blobs seeded: what the store holds

    def on_alert(self, alert: Any) -> None:
        if isinstance(alert, lt.hash_failed_alert):
            log.error("stored blob fails its piece hash", error=alert.message())
        else:
            super().on_alert(alert)

    def seed(self, blob: Blob) -> None:
        if blob.torrent is None or blob.digest in self._handles:
            return
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(blob.torrent.metainfo)
        params.save_path = str(self._blob_path(blob.digest).parent)
        params.flags = (params.flags | lt.torrent_flags.seed_mode) & ~(
            lt.torrent_flags.auto_managed | lt.torrent_flags.paused
        )
        self._handles[blob.digest] = self.add_torrent(params)
        self._sizes[blob.digest] = blob.size

    def unseed(self, digest: str) -> None:
        handle = self._handles.pop(digest, None)
        self._sizes.pop(digest, None)
        if handle is not None:
            self.session.remove_torrent(handle)

    @property
    def stored_bytes(self) -> int:
        """The bytes of every blob seeded (every stored blob with bytes)."""
        return sum(self._sizes.values())

    @property
    def stored_blobs(self) -> int:
        """How many blobs are seeded: every stored blob but the empty one."""
        return len(self._handles)

    def close(self) -> None:
        self._handles.clear()
        self._sizes.clear()
        super().close()
