"""The BitTorrent test infrastructure against real libtorrent sessions: the opentracker
wrapper (tests/support/tracker.py) and the corrupt peer (tests/support/corrupt_peer.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from docket_common.bt import ALERT_MASK, session_settings
from docket_common.torrent import PieceHasher, TorrentInfo, make_torrent
from tests.support.archives import random_bytes, sha256
from tests.support.corrupt_peer import BLOCK, CorruptPeer, corrupt_copy
from tests.support.tracker import Tracker, decode_reply

PIECE = 64 * 1024
TEST_MASK = (
    ALERT_MASK
    | lt.alert.category_t.tracker_notification
    | lt.alert.category_t.peer_notification
    | lt.alert.category_t.connect_notification
)

pytestmark = pytest.mark.timeout(60)


def torrent_of(data: bytes, announce: str | None = None) -> TorrentInfo:
    hasher = PieceHasher(PIECE)
    hasher.update(data)
    return make_torrent(sha256(data), len(data), PIECE, hasher.pieces(), announce=announce)


def endpoint_of(ep: Any) -> str:
    host, port = ep
    return f"{host}:{port}"


@dataclass(frozen=True)
class Seen:
    """What an alert said. libtorrent frees alerts at the next pop_alerts (reading one after
    that raises or crashes), so a Client keeps these copies instead."""

    kind: type
    message: str
    error: bool
    endpoint: str | None = None  # the peer's, for peer alerts
    tracker_url: str | None = None  # for tracker alerts
    num_peers: int | None = None  # for tracker replies

    @classmethod
    def of(cls, alert: Any) -> Seen:
        fields: dict[str, Any] = {}
        if isinstance(alert, lt.peer_alert):
            fields["endpoint"] = endpoint_of(alert.ip)
        if isinstance(alert, lt.tracker_alert):
            fields["tracker_url"] = alert.tracker_url()
        if isinstance(alert, lt.tracker_reply_alert):
            fields["num_peers"] = alert.num_peers
        return cls(
            kind=type(alert),
            message=alert.message(),
            error=bool(alert.category() & lt.alert.category_t.error_notification),
            **fields,
        )


class Client:
    """A libtorrent session with our settings on 127.0.0.1, keeping what its alerts said."""

    def __init__(self, name: str) -> None:
        settings = {**session_settings("127.0.0.1:0", user_agent=name), "alert_mask": TEST_MASK}
        self.session = lt.session(settings)  # type: ignore[call-overload]  # a dict works
        self.alerts: list[Seen] = []
        self.port = 0
        deadline = time.monotonic() + 10
        while not self.port:
            assert time.monotonic() < deadline, f"{name}: not listening after 10s"
            self.session.wait_for_alert(100)
            for alert in self.session.pop_alerts():
                self.alerts.append(Seen.of(alert))
                if (
                    isinstance(alert, lt.listen_succeeded_alert)
                    and alert.socket_type == lt.socket_type_t.tcp
                ):
                    self.port = alert.port
                assert not isinstance(alert, lt.listen_failed_alert), alert.message()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, metainfo: bytes, save_path: Path, *, seed_mode: bool = False) -> Any:
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(lt.bdecode(metainfo))
        params.save_path = str(save_path)
        params.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        if seed_mode:
            params.flags |= lt.torrent_flags.seed_mode
        return self.session.add_torrent(params)

    def pump(self, wait_ms: int = 100) -> None:
        """Waits up to ``wait_ms`` for alerts and keeps what they said."""
        self.session.wait_for_alert(wait_ms)
        self.alerts += [Seen.of(alert) for alert in self.session.pop_alerts()]

    def of_type(self, kind: type) -> list[Seen]:
        return [a for a in self.alerts if issubclass(a.kind, kind)]

    def wait_for(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                errors = [a.message for a in self.alerts if a.error]
                raise TimeoutError(f"{what} not after {timeout}s; errors: {errors}")
            self.pump()

    def flush(self, handle: Any, timeout: float = 10) -> None:
        """Until what the torrent downloaded is in its file: libtorrent 2 hashes blocks from
        memory and may write them after the torrent already counts as seeding."""
        before = len(self.of_type(lt.cache_flushed_alert))
        handle.flush_cache()
        self.wait_for(
            "the cache flush", lambda: len(self.of_type(lt.cache_flushed_alert)) > before, timeout
        )

    def close(self) -> None:
        for handle in self.session.get_torrents():
            self.session.remove_torrent(handle)
        self.session.pause()


@pytest.fixture
def clients() -> Iterator[Callable[[str], Client]]:
    made: list[Client] = []

    def make(name: str) -> Client:
        made.append(Client(name))
        return made[-1]

    yield make
    for client in made:
        client.close()


def seed_files(tmp_path: Path, data: bytes, torrent: TorrentInfo, name: str) -> Path:
    """A save path holding the true file, as a seed needs it."""
    save = tmp_path / name
    save.mkdir()
    (save / lt.torrent_info(lt.bdecode(torrent.metainfo)).name()).write_bytes(data)
    return save


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# -- the tracker ----------------------------------------------------------------------------


def test_tracker_answers_announces_and_stops(
    clients: Callable[[str], Client], tmp_path: Path
) -> None:
    data = random_bytes(300_000, 1)
    with Tracker() as tracker:
        assert tracker.running
        assert tracker.announce_url == f"http://127.0.0.1:{tracker.port}/announce"
        torrent = torrent_of(data, announce=tracker.announce_url)

        # Debian's opentracker tracks whitelisted torrents only.
        refused = decode_reply(tracker.announce(torrent.info_hash, port=6881, left=1))
        assert b"not authorized" in refused[b"failure reason"]
        tracker.allow(torrent.info_hash)

        client = clients("docket-test-announcer")
        handle = client.add(torrent.metainfo, seed_files(tmp_path, data, torrent, "seed"))
        client.wait_for("a tracker reply", lambda: bool(client.of_type(lt.tracker_reply_alert)), 15)
        assert client.of_type(lt.tracker_reply_alert)[0].tracker_url == tracker.announce_url
        assert not client.of_type(lt.tracker_error_alert)
        assert handle.status().is_seeding

        # A plain HTTP announce now gets the libtorrent seed in its (compact) peer list.
        reply = decode_reply(tracker.announce(torrent.info_hash, port=6881, left=len(data)))
        assert b"failure reason" not in reply
        peers = reply[b"peers"]
        listed = {
            (socket.inet_ntoa(peers[i : i + 4]), int.from_bytes(peers[i + 4 : i + 6]))
            for i in range(0, len(peers), 6)
        }
        assert ("127.0.0.1", client.port) in listed
        assert reply[b"complete"] == 1
        port = tracker.port

    assert not tracker.running
    assert not accepts_connections(port)


def test_the_trackers_whitelist_takes_hashes_whose_bytes_need_escaping() -> None:
    """A space, a slash and an ampersand in an info hash: sent as %20, %2F and %26, as
    clients send them (a "+" for the space is not read as one). Hashes passed at start are
    taken before the tracker is handed out: it reads its list in a thread of its own."""
    awkward = "20" + "2f" + "26" + "2b" + "ab" * 16
    with Tracker(allowed=[awkward]) as tracker:
        assert b"failure reason" not in decode_reply(tracker.announce(awkward, port=6881))
        later = "ab" * 16 + "20262f20"
        refused = decode_reply(tracker.announce(later, port=6881))
        assert b"not authorized" in refused[b"failure reason"]
        tracker.allow(later)
        assert b"failure reason" not in decode_reply(tracker.announce(later, port=6881))


def test_peers_find_each_other_through_the_tracker(
    clients: Callable[[str], Client], tmp_path: Path
) -> None:
    data = random_bytes(2 * 1024 * 1024 + 4321, 2)
    with Tracker() as tracker:
        torrent = torrent_of(data, announce=tracker.announce_url)
        tracker.allow(torrent.info_hash)

        seed = clients("docket-test-seed")
        seed.add(torrent.metainfo, seed_files(tmp_path, data, torrent, "seed"), seed_mode=True)
        # The seed announces first, so the leecher's first announce returns it.
        seed.wait_for("the seed's announce", lambda: bool(seed.of_type(lt.tracker_reply_alert)), 15)

        leecher = clients("docket-test-leecher")
        handle = leecher.add(torrent.metainfo, tmp_path / "leech")
        sources: dict[str, int] = {}

        def done() -> bool:
            for peer in handle.get_peer_info():  # a connecting peer's source reads 0
                ep = endpoint_of(peer.ip)
                sources[ep] = sources.get(ep, 0) | peer.source
            return bool(handle.status().is_seeding)

        leecher.wait_for("the download", done, 45)
        leecher.flush(handle)

    assert (tmp_path / "leech" / torrent.digest.removeprefix("sha256:")).read_bytes() == data
    # No connect_peer anywhere: the seed came from the tracker.
    assert seed.endpoint in sources, sources
    assert sources[seed.endpoint] & lt.peer_info.tracker
    assert leecher.of_type(lt.tracker_reply_alert)[0].num_peers >= 1


# -- the corrupt peer ---------------------------------------------------------------------


def test_corrupt_copy_breaks_every_block() -> None:
    data = random_bytes(3 * BLOCK + 10, 3)
    bad = corrupt_copy(data)
    assert len(bad) == len(data)
    for offset in range(0, len(data), BLOCK):
        assert bad[offset : offset + BLOCK] != data[offset : offset + BLOCK]


def test_leecher_drops_the_corrupt_peer_and_completes_from_the_honest_seed(
    clients: Callable[[str], Client], tmp_path: Path
) -> None:
    data = random_bytes(4 * 1024 * 1024 + 777, 4)
    torrent = torrent_of(data)
    with CorruptPeer(torrent.metainfo, data, tmp_path / "corrupt") as corrupt:
        assert corrupt.endpoint == f"127.0.0.1:{corrupt.port}"
        assert corrupt.path.read_bytes() == corrupt_copy(data) != data
        honest = clients("docket-test-honest-seed")
        honest.add(torrent.metainfo, seed_files(tmp_path, data, torrent, "honest"), seed_mode=True)
        leecher = clients("docket-test-leecher")
        handle = leecher.add(torrent.metainfo, tmp_path / "leech")

        # The corrupt peer alone first, so that bad data surely arrives before good data.
        handle.connect_peer(("127.0.0.1", corrupt.port))
        leecher.wait_for("a hash failure", lambda: bool(leecher.of_type(lt.hash_failed_alert)), 20)
        assert corrupt.uploaded_bytes() > 0
        # Dialled again while the download lacks it, as a swarm would find the seed again: a
        # CI run under load once waited 30 s here with no error alert (a dial lost, most
        # likely; if it times out, the message says what the leecher saw).
        deadline = time.monotonic() + 30
        while not handle.status().is_seeding:
            if time.monotonic() > deadline:
                peers = sorted(endpoint_of(p.ip) for p in handle.get_peer_info())
                status = handle.status()
                raise TimeoutError(
                    f"the download not after 30s: {status.progress:.0%} done, "
                    f"state {status.state}, peers {peers}, honest seed {honest.endpoint}, "
                    f"alerts {[a.message for a in leecher.alerts][-20:]}"
                )
            if honest.endpoint not in {endpoint_of(p.ip) for p in handle.get_peer_info()}:
                handle.connect_peer(("127.0.0.1", honest.port))
            for _ in range(10):  # about a second between dials
                leecher.pump()
        leecher.flush(handle)

        connected = {endpoint_of(p.ip) for p in handle.get_peer_info()}
        assert corrupt.endpoint not in connected

    assert (tmp_path / "leech" / torrent.digest.removeprefix("sha256:")).read_bytes() == data
    assert leecher.of_type(lt.hash_failed_alert)
    banned = {a.endpoint for a in leecher.of_type(lt.peer_ban_alert)}
    assert banned == {corrupt.endpoint}
    # libtorrent bans the sole sender of a failed piece at once and hangs up on it.
    dropped = [
        a.message
        for a in leecher.of_type(lt.peer_disconnected_alert)
        if a.endpoint == corrupt.endpoint
    ]
    assert any("too many corrupt pieces" in message for message in dropped), dropped
