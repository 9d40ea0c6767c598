"""Which pieces the server hands out first (docket_server/domain/first_pieces.py): the logic,
with a fake clock and a fake fleet. Rollouts through real agents are in test_pull.py and
test_rollouts.py; an agent that claims pieces and dies is in test_rollouts.py too."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from docket_server.domain.first_pieces import CLAIM_SECONDS, FirstPieces
from docket_server.domain.fleet import Session
from docket_server.domain.orders import OrderBook, TaskState

DIGEST = "sha256:" + "ab" * 32
PIECES = 10
PIECE = 1 << 16


@dataclass
class FakeTask:
    agent: str
    state: TaskState = TaskState.DOWNLOADING
    blobs: dict[str, Any] = field(default_factory=lambda: {DIGEST: None})
    pieces: dict[str, bytearray] = field(default_factory=dict)

    def hold(self, *indexes: int) -> None:
        bits = self.pieces.setdefault(DIGEST, bytearray((PIECES + 7) // 8))
        for i in indexes:
            bits[i >> 3] |= 1 << (i & 7)


class World:
    def __init__(self, *agents: str) -> None:
        self.now = 100.0
        self.tasks = {f"order-{a}": FakeTask(a) for a in agents}
        self.sessions = {a: self._session() for a in agents}
        book = SimpleNamespace(tasks=self.tasks, fleet=SimpleNamespace(sessions=self.sessions))
        self.first = FirstPieces(cast(OrderBook, book), clock=lambda: self.now)

    @staticmethod
    def _session(*cached: str) -> Any:
        info = SimpleNamespace(cached_digests=cached)
        session = SimpleNamespace(record=SimpleNamespace(info=info), holds=set())
        session.holds_any = lambda digests: Session.holds_any(cast(Session, session), digests)
        return session

    def claim(self, agent: str, max_bytes: int = PIECE) -> list[int]:
        return self.first.claim(DIGEST, PIECES, PIECE, agent, max_bytes)


def test_each_piece_goes_out_once_in_order_to_whoever_asks() -> None:
    w = World("a", "b")
    got = [w.claim("a"), w.claim("b"), w.claim("a", 3 * PIECE), w.claim("b", 100 * PIECE)]
    assert got == [[0], [1], [2, 3, 4], [5, 6, 7, 8, 9]]
    assert w.claim("a") == []  # all out: the agents trade the rest
    assert w.claim("b") == []


def test_a_claim_brings_at_least_one_piece_and_at_most_4_mib() -> None:
    w = World("a")
    assert w.claim("a", 0) == [0]
    big = w.first.claim(DIGEST, 1000, PIECE, "a", 1 << 30)
    assert len(big) == (2 << 20) // PIECE


def test_pieces_a_host_reported_are_not_handed_out() -> None:
    w = World("a", "b")
    w.tasks["order-b"].hold(0, 1, 2)  # b already has them (a resumed download, say)
    assert w.claim("a", 2 * PIECE) == [3, 4]


def test_nothing_is_handed_out_while_a_host_online_holds_the_blob() -> None:
    w = World("a", "b")
    w.sessions["b"] = World._session(DIGEST)  # b cached it: peers can serve everything
    assert w.claim("a") == []
    w1 = World("a", "b")
    w1.sessions["b"].holds.add(DIGEST)  # b fetched it in an order since it connected
    assert w1.claim("a") == []
    w2 = World("a", "b")
    w2.tasks["order-b"].state = TaskState.SUCCEEDED
    assert w2.claim("a") == []
    del w2.sessions["b"]  # the holder went offline: the server hands pieces out again
    assert w2.claim("a") == [0]


def test_pieces_of_a_host_that_went_away_or_never_reported_them_go_out_again() -> None:
    w = World("a", "b", "c")
    assert w.claim("a", 2 * PIECE) == [0, 1]
    del w.sessions["a"]  # a went offline with pieces 0 and 1
    assert w.claim("b", 2 * PIECE) == [0, 1]
    w.tasks["order-b"].hold(0)  # b reported piece 0, not piece 1
    w.now += CLAIM_SECONDS + 1
    assert w.claim("c") == [1]  # handed out long ago and nobody reported it


def test_a_piece_in_flight_is_not_sent_twice_even_to_the_same_host() -> None:
    w = World("a", "b")
    assert w.claim("a") == [0]
    assert w.claim("a") == [1]
    w.now += CLAIM_SECONDS - 1
    assert w.claim("b") == [2]


def test_released_pieces_go_out_again() -> None:
    w = World("a", "b")
    assert w.claim("a", 2 * PIECE) == [0, 1]
    w.first.release(DIGEST, [0, 1])  # reading them failed
    assert w.claim("b", 2 * PIECE) == [0, 1]


def test_failed_and_cancelled_tasks_hold_nothing() -> None:
    w = World("a", "b")
    w.tasks["order-b"].hold(*range(PIECES))
    w.tasks["order-b"].state = TaskState.FAILED
    assert w.claim("a") == [0]


def test_a_one_piece_blob_goes_to_every_host_that_asks_once_each() -> None:
    w = World("a", "b", "c")
    w.tasks["order-b"].hold(0)  # even one that holds it: a config costs a few KiB a host
    claim = w.first.claim
    assert [claim(DIGEST, 1, 4096, x, PIECE) for x in ("a", "b", "c")] == [[0], [0], [0]]
    assert claim(DIGEST, 1, 4096, "a", PIECE) == []  # once each, not once per call
    w.now += CLAIM_SECONDS + 1
    assert claim(DIGEST, 1, 4096, "a", PIECE) == [0]  # it never said it got it: again


def test_a_claim_takes_at_most_a_fair_share_of_the_blob() -> None:
    """A small blob fits in one claim: the first host to ask must not take it all, or the
    others wait on that host's uplink instead of getting a share each from the server."""
    w = World("a", "b", "c", "d")
    assert w.claim("a", 100 * PIECE) == [0, 1, 2]  # 10 pieces over 4 hosts: 3 each at most
    assert w.claim("b", 100 * PIECE) == [3, 4, 5]
    w.tasks["order-c"].state = TaskState.FAILED  # c and d no longer fetch: 2 hosts, 5 each
    w.tasks["order-d"].state = TaskState.CANCELLED
    assert w.claim("a", 100 * PIECE) == [6, 7, 8]  # 6 in all: 115 % of 5
    assert w.claim("b", 100 * PIECE) == [9]


def test_no_host_is_handed_much_more_than_its_share_however_fast_it_claims() -> None:
    """Each host sends its first pieces to all the others: the one handed the most sets the
    rollout's time, so a host that claims faster than the rest stops at 115 % of its share
    and the others get theirs."""
    w = World("a", "b", "c", "d")
    pieces = 100
    got = []
    while claimed := w.first.claim(DIGEST, pieces, PIECE, "a", 10 * PIECE):
        got += claimed
    assert len(got) == 29  # 25 a host, and 15 % over
    assert w.first.claim(DIGEST, pieces, PIECE, "a", PIECE) == []
    rest = [w.first.claim(DIGEST, pieces, PIECE, x, 100 * PIECE) for x in ("b", "c", "d")]
    assert [len(r) for r in rest] == [25, 25, 21]  # each at most a share per claim
    assert sorted(got + [i for r in rest for i in r]) == list(range(pieces))  # each piece once
    del w.sessions["d"]  # d went away with its 21: 3 hosts now, 39 each at most
    assert w.first.claim(DIGEST, pieces, PIECE, "a", 100 * PIECE) == list(range(79, 89))
    assert w.first.claim(DIGEST, pieces, PIECE, "b", 100 * PIECE) == list(range(89, 100))
