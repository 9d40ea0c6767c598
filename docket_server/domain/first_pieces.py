"""First copies: the server hands each piece of a blob to one agent, and the agents trade.

A rollout to N hosts is fastest when the server's uplink sends every piece once and each host
passes on what it got (the lower bound is F/r for equal links). A BitTorrent seed cannot do
that: every host asks it for whatever piece it lacks, and in the shaped cluster the seed sent
each piece about 1.5 times. The server knows what a plain seed does not: which pieces every
host holds (their progress) and which it has already handed out. So agents fetching for a
rollout claim pieces from the server (``AgentService.ClaimFirstPieces``) and get only pieces
that no online host holds or was handed moments ago; they take everything else from each
other over BitTorrent, and dial the server's seed only when that runs dry.

A blob of one piece (an image config: a few KiB) goes to every host that asks, once each:
passing it on would cost each host a round of BitTorrent connections and requests (about a
second at a rollout's start, measured), while a copy for each host costs the server a few KiB.

A host that took pieces and then died leaves them with nobody: after ``CLAIM_SECONDS`` without
a host reporting a piece, the piece is handed out again; until then the others get it from the
server's seed once their peers stop delivering.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from docket_server.domain.orders import OrderBook, TaskState

CLAIM_SECONDS = 15.0
SHARE_OVER_PERCENT = 115  # the most one host is handed, in percent of its fair share
MAX_CLAIM_BYTES = 2 << 20  # keeps answers under gRPC's default 4 MiB message limit
FORGET_SECONDS = 600.0  # a blob nobody claimed pieces of for this long is forgotten
_GONE = (TaskState.QUEUED, TaskState.FAILED, TaskState.CANCELLED)


@dataclass
class _Handed:
    """Who was handed each piece of a blob, and when (monotonic seconds; 0 = never)."""

    to: list[str]
    at: list[float]
    last_claim: float = 0.0
    # A one-piece blob: who was handed its piece, and when.
    each: dict[str, float] = field(default_factory=dict)


@dataclass
class FirstPieces:
    orders: OrderBook
    clock: Callable[[], float] = time.monotonic
    _blobs: dict[str, _Handed] = field(default_factory=dict)

    def claim(
        self, digest: str, piece_count: int, piece_length: int, agent: str, max_bytes: int
    ) -> list[int]:
        """Picks the next pieces of a blob for ``agent`` (whose order fetches it): at most
        ``max_bytes`` of them (capped at 2 MiB), at least one; none when every piece is held
        by an online host or was handed to one in the last CLAIM_SECONDS, or when ``agent``
        has had SHARE_OVER_PERCENT of its fair share (the blob over the hosts fetching it)."""
        now = self.clock()
        self._forget(now)
        handed = self._blobs.get(digest)
        if handed is None or len(handed.to) != piece_count:
            handed = self._blobs[digest] = _Handed([""] * piece_count, [0.0] * piece_count)
        handed.last_claim = now
        if piece_count == 1:
            if now - handed.each.get(agent, -CLAIM_SECONDS) < CLAIM_SECONDS:
                return []
            handed.each[agent] = now
            return [0]
        held, fetching = self._held(digest, piece_count)
        online = self.orders.fleet.sessions
        want = max(1, min(max_bytes, MAX_CLAIM_BYTES) // max(piece_length, 1))
        # At most a fair share of the blob per claim: a small blob (1 MiB to 8 hosts) fits in
        # one claim, and the first host to ask took it all; the others then waited for that
        # host's uplink instead of each getting an eighth from the server and trading.
        hosts = max(fetching, 1)
        want = min(want, -(-piece_count // hosts))
        # And a little over a fair share in all: each host passes its first pieces on to all
        # the others, so the host handed the most sets the time. Without a cap the hosts that
        # claimed fastest took up to 1.4 times their share (8 hosts, 64 MiB), and their
        # uplinks then had 7 copies of that to send. With 15 % over, 7 of 8 hosts still cover
        # a blob; a host that stops claiming leaves its share to the others' caps or the seed.
        most = -(-piece_count * SHARE_OVER_PERCENT // (100 * hosts))
        want = min(want, most - handed.to.count(agent))
        picked: list[int] = []
        for index in range(piece_count):
            if held is None or len(picked) >= want:
                break
            if held >> index & 1:
                continue
            to = handed.to[index]
            if to and now - handed.at[index] < CLAIM_SECONDS and (to == agent or to in online):
                continue
            handed.to[index], handed.at[index] = agent, now
            picked.append(index)
        return picked

    def release(self, digest: str, pieces: list[int]) -> None:
        """Takes back pieces that were picked but could not be sent."""
        handed = self._blobs.get(digest)
        if handed is None:
            return
        for index in pieces:
            if 0 <= index < len(handed.to):
                handed.to[index], handed.at[index] = "", 0.0
        if len(handed.to) == 1 and pieces == [0]:
            handed.each.clear()

    def _held(self, digest: str, piece_count: int) -> tuple[int | None, int]:
        """The pieces online hosts hold (from their progress), as an int whose bit i is piece
        i, None when one holds them all; and how many online hosts are fetching the blob.
        Each claim asks, so the hosts' bitmaps are ORed as big ints rather than byte by byte
        in Python."""
        online = self.orders.fleet.sessions
        for session in online.values():
            if session.holds_any((digest,)):
                return None, 0
        held, size, fetching = 0, (piece_count + 7) // 8, set()
        for task in self.orders.tasks.values():
            if task.agent not in online or task.state in _GONE or digest not in task.blobs:
                continue
            if task.state is TaskState.SUCCEEDED:
                return None, 0
            fetching.add(task.agent)
            bits = task.pieces.get(digest)
            if bits is not None and len(bits) == size:
                held |= int.from_bytes(bits, "little")
        return held, len(fetching)

    def _forget(self, now: float) -> None:
        for digest in [d for d, h in self._blobs.items() if now - h.last_claim > FORGET_SECONDS]:
            del self._blobs[digest]
