"""libtorrent settings shared by the server's seeder and the agents.

What was measured on these machines (DESIGN.md): uTP is slow here, so TCP only; no DHT, LSD,
UPnP or NAT-PMP (peers come from the server or a tracker); every torrent is private.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any

import libtorrent as lt
import structlog

from docket_common.hostport import split_host_port as split_host_port
from docket_common.pki import DH_PARAMS

log = structlog.get_logger()

ALERT_MASK = (
    lt.alert.category_t.error_notification
    | lt.alert.category_t.status_notification
    | lt.alert.category_t.storage_notification
    | lt.alert.category_t.piece_progress_notification
)


def session_settings(
    listen: str, *, user_agent: str, alert_mask: int = ALERT_MASK
) -> dict[str, Any]:
    """Settings for a Docket libtorrent session listening on ``listen`` ("host:port")."""
    return {
        "listen_interfaces": listen,
        "user_agent": user_agent,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "enable_outgoing_tcp": True,
        "enable_incoming_tcp": True,
        # Every blob is its own torrent and all of them must stay active: no queueing.
        "active_downloads": -1,
        "active_seeds": -1,
        "active_limit": -1,
        "active_checking": 4,
        "connections_limit": 2000,
        # Hosts of one fleet share addresses (NAT, one machine in tests): let them all in.
        "allow_multiple_connections_per_ip": True,
        # Ask each peer for 1 s of data ahead, not 3: fewer pieces promised to the seed early,
        # so fewer of its copies go to a host another host could have served. In the shaped
        # cluster (8 hosts, 100 Mbit/s, 64 MiB) the seed sent 1.43-1.58 times the image
        # instead of 1.70-2.03, and rollouts took 9.6-10.4 s instead of 11.2-12.9 s.
        "request_queue_time": 1,
        # Dial a peer that went away (the server's seed during a restart) again after a few
        # seconds, not a minute: a fleet has few peers and they come back.
        "min_reconnect_time": 2,
        "alert_mask": alert_mask,
    } | _overrides()


def _overrides() -> dict[str, Any]:
    """Settings from $DOCKET_LIBTORRENT_SETTINGS (a JSON object), for tuning experiments."""
    raw = os.environ.get("DOCKET_LIBTORRENT_SETTINGS", "")
    if not raw:
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise TypeError("DOCKET_LIBTORRENT_SETTINGS must be a JSON object")
    return value


class TorrentSessionError(Exception):
    """The BitTorrent session cannot start (its port is taken, say)."""


class TorrentSession:
    """A libtorrent session whose alerts are handled on the asyncio event loop.

    A thread blocks in ``wait_for_alert`` (which releases the GIL) and, when alerts are
    waiting, schedules ``_drain`` on the loop and waits until it has run. libtorrent's own
    threads never call into Python: with ``set_alert_notify`` they do, and destroying the
    session while one of them waits for the GIL deadlocks (seen here at shutdown under load;
    see also libtorrent #4638). Subclasses handle alerts in ``on_alert``.
    """

    POLL_SECONDS = 0.1  # how long shutdown may wait for the alert thread
    ALERTS = ALERT_MASK  # the alert categories the session posts

    def __init__(
        self,
        listen: str,
        user_agent: str,
        *,
        download_rate_limit: int = 0,
        upload_rate_limit: int = 0,
    ) -> None:
        self.listen = listen
        self.user_agent = user_agent
        # SSL torrents (set_peer_certificate before start): every torrent whose info dict
        # names a root certificate takes only peers with a certificate it signed.
        self._peer_cert: tuple[str, str] | None = None
        self.download_rate_limit = download_rate_limit
        self.upload_rate_limit = upload_rate_limit
        self.port = 0
        self._session: lt.session | None = None
        self._closing = threading.Event()
        self._drained = threading.Event()
        self._pump: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening: asyncio.Future[int] | None = None

    @property
    def session(self) -> lt.session:
        if self._session is None:
            raise RuntimeError("the BitTorrent session is not started")
        return self._session

    async def start(self) -> int:
        """Opens the session; returns the TCP port it listens on once it does."""
        self._loop = asyncio.get_running_loop()
        self._listening = self._loop.create_future()
        listen = self.listen
        if self._peer_cert is not None:
            # The one listener is TLS: SSL torrents are dialled, and accepted, there only.
            listen = ",".join(f"{part.strip()}s" for part in listen.split(","))
        settings = session_settings(listen, user_agent=self.user_agent, alert_mask=self.ALERTS)
        settings["download_rate_limit"] = self.download_rate_limit
        settings["upload_rate_limit"] = self.upload_rate_limit
        self._session = lt.session(settings)  # type: ignore[call-overload]  # a dict works
        self._limit_everyone()
        self._pump = threading.Thread(
            target=self._wait_for_alerts,
            args=(self._session, self._loop),
            daemon=True,
            name="libtorrent-alerts",
        )
        self._pump.start()
        try:
            async with asyncio.timeout(10):
                self.port = await self._listening
        except TimeoutError as e:
            raise TorrentSessionError(f"BitTorrent listener on {self.listen} did not start") from e
        return self.port

    def _limit_everyone(self) -> None:
        if self._session is not None and (self.download_rate_limit or self.upload_rate_limit):
            # libtorrent exempts local-network peers from limits; a limit here means all peers.
            everyone = lt.ip_filter()
            everyone.add_rule("0.0.0.0", "255.255.255.255", 1 << lt.session.global_peer_class_id)
            self._session.set_peer_class_filter(everyone)

    def set_rate_limits(self, *, download: int | None = None, upload: int | None = None) -> None:
        """Changes the session's limits (bytes a second, 0 for none) while it runs."""
        if download is not None:
            self.download_rate_limit = download
        if upload is not None:
            self.upload_rate_limit = upload
        if self._session is not None:
            self._session.apply_settings(
                {
                    "download_rate_limit": self.download_rate_limit,
                    "upload_rate_limit": self.upload_rate_limit,
                }
            )
            self._limit_everyone()

    def problem(self) -> str | None:
        """Why the session cannot serve (for health checks), or None."""
        if self._session is None:
            return "the BitTorrent session is not started"
        if self._pump is None or not self._pump.is_alive():
            return "the BitTorrent alert thread has stopped"
        if not self._session.is_listening():
            return f"BitTorrent is not listening on {self.listen}"
        return None

    @property
    def ssl(self) -> bool:
        return self._peer_cert is not None

    def set_peer_certificate(self, cert_pem: bytes, key_pem: bytes) -> None:
        """The certificate (and key) this session shows peers on SSL torrents; set before
        start, and again to replace it (a renewed certificate) on every torrent."""
        self._peer_cert = (cert_pem.decode(), key_pem.decode())
        if self._session is None:
            return
        for handle in self._session.get_torrents():
            info = handle.torrent_file()
            if handle.is_valid() and info is not None and info.ssl_cert():
                self._present_certificate(handle)

    def add_torrent(self, params: Any) -> Any:
        """Adds a torrent to the session; an SSL torrent gets this session's certificate."""
        handle = self.session.add_torrent(params)
        if params.ti is not None and params.ti.ssl_cert():
            self._present_certificate(handle)
        return handle

    def _present_certificate(self, handle: Any) -> None:
        if self._peer_cert is None:
            log.warning("an SSL torrent, but no peer certificate: no peer will be let in")
            return
        cert, key = self._peer_cert
        handle.set_ssl_certificate_buffer(cert, key, DH_PARAMS)

    def close(self) -> None:
        if self._session is None:
            return
        self._closing.set()
        if self._pump is not None:
            self._pump.join(self.POLL_SECONDS * 5)
        self._session.pause()
        self._session = None

    def _wait_for_alerts(self, session: Any, loop: asyncio.AbstractEventLoop) -> None:
        """On the alert thread: wake the loop whenever alerts wait, one drain at a time."""
        while not self._closing.is_set():
            if session.wait_for_alert(int(self.POLL_SECONDS * 1000)) is None:
                continue
            self._drained.clear()
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed
                return
            # Until the loop has drained them (the alerts stay queued until then), unless the
            # session closes: close() runs on the loop, which then cannot drain.
            while not self._drained.wait(0.05):
                if self._closing.is_set():
                    return

    def _drain(self) -> None:
        try:
            self._drain_alerts()
        finally:
            self._drained.set()

    def _drain_alerts(self) -> None:
        if self._session is None:
            return
        for alert in self._session.pop_alerts():
            if isinstance(alert, lt.listen_succeeded_alert):
                wanted = lt.socket_type_t.tcp_ssl if self._peer_cert else lt.socket_type_t.tcp
                if alert.socket_type == wanted:
                    log.info("bittorrent listening", address=f"{alert.address}:{alert.port}")
                    if self._listening and not self._listening.done():
                        self._listening.set_result(alert.port)
            elif isinstance(alert, lt.listen_failed_alert):
                log.error("bittorrent cannot listen", listen=self.listen, error=alert.message())
                if self._listening and not self._listening.done():
                    self._listening.set_exception(
                        TorrentSessionError(
                            f"cannot listen on {self.listen}: {alert.error.message()}"
                        )
                    )
            else:
                self.on_alert(alert)

    def on_alert(self, alert: Any) -> None:
        """Handles one alert other than the listen ones; errors are logged by default."""
        if isinstance(alert, lt.torrent_error_alert | lt.file_error_alert):
            log.error("torrent failed", error=alert.message())
