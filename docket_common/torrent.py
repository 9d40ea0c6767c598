"""Torrents of blobs: the piece-size rule, incremental piece hashing and metainfo.

Every blob is one private, single-file, v1 torrent whose file is named by the digest's hex
part, so a blob store laid out as ``…/sha256/<2 hex>/<hex>`` is a ready save path.

Piece size: the smallest power of two from 64 KiB to 16 MiB that keeps a blob at no more than
1024 pieces. Enough pieces for many hosts to fetch disjoint ones at once (a 64 MiB layer has
1024 pieces of 64 KiB, a 1 GiB layer 1024 of 1 MiB), while the metainfo stays small (20 bytes
a piece) and per-piece progress stays at most ~1000 events a blob. 64 KiB is four libtorrent
blocks; 16 MiB caps what a corrupt piece costs to fetch again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import libtorrent as lt

from docket_common.digest import hex_part

MIN_PIECE_LENGTH = 64 * 1024
MAX_PIECE_LENGTH = 16 * 1024 * 1024
TARGET_MAX_PIECES = 1024

BencodeValue = int | bytes | str | list["BencodeValue"] | dict[str, "BencodeValue"]


def piece_length_for(size: int) -> int:
    """The piece size for a blob of ``size`` bytes (see the module docstring)."""
    length = MIN_PIECE_LENGTH
    while length < MAX_PIECE_LENGTH and length * TARGET_MAX_PIECES < size:
        length *= 2
    return length


def piece_count(size: int, piece_length: int) -> int:
    return max(1, -(-size // piece_length))


def bencode(value: BencodeValue) -> bytes:
    """Bencodes ints, byte strings, str (as UTF-8), lists and dicts (keys sorted, as required)."""
    out: list[bytes] = []

    def enc(v: BencodeValue) -> None:
        if isinstance(v, bool):
            raise TypeError("bencode has no booleans")
        if isinstance(v, int):
            out.append(b"i%de" % v)
        elif isinstance(v, bytes):
            out.append(b"%d:%s" % (len(v), v))
        elif isinstance(v, str):
            enc(v.encode())
        elif isinstance(v, list):
            out.append(b"l")
            for item in v:
                enc(item)
            out.append(b"e")
        else:
            out.append(b"d")
            for key in sorted(v, key=lambda k: k.encode()):
                enc(key)
                enc(v[key])
            out.append(b"e")

    enc(value)
    return b"".join(out)


class PieceHasher:
    """SHA-1s of consecutive pieces of a stream of bytes, fed in chunks of any size."""

    def __init__(self, piece_length: int) -> None:
        self.piece_length = piece_length
        self._hashes: list[bytes] = []
        self._current = hashlib.sha1()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.piece_length - self._filled)
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.piece_length:
                self._hashes.append(self._current.digest())
                self._current = hashlib.sha1()
                self._filled = 0

    def pieces(self) -> bytes:
        """The concatenated piece hashes, the last (short) piece included."""
        if self._filled:
            return b"".join([*self._hashes, self._current.digest()])
        return b"".join(self._hashes)


@dataclass(frozen=True)
class TorrentInfo:
    """A blob's torrent, as the server stores and hands it out."""

    digest: str
    metainfo: bytes
    info_hash: str
    piece_length: int
    piece_count: int


def make_torrent(
    digest: str,
    size: int,
    piece_length: int,
    pieces: bytes,
    announce: str | None = None,
    ssl_cert: bytes | None = None,
) -> TorrentInfo:
    """Builds the metainfo of a blob's torrent from its piece hashes. With ``ssl_cert`` (the
    fleet CA, PEM) it is an SSL torrent: peers take part only with a certificate that CA
    signed, and the CA is covered by the info-hash."""
    count = len(pieces) // 20
    if count != piece_count(size, piece_length) or len(pieces) % 20:
        raise ValueError(
            f"{count} piece hashes do not fit {size} bytes in {piece_length}-byte pieces"
        )
    info: dict[str, BencodeValue] = {
        "length": size,
        "name": hex_part(digest),
        "piece length": piece_length,
        "pieces": pieces,
        "private": 1,
    }
    if ssl_cert:
        info["ssl-cert"] = ssl_cert
    meta: dict[str, BencodeValue] = {"info": info, "created by": "docket"}
    if announce:
        meta["announce"] = announce
    info_hash = hashlib.sha1(bencode(info)).hexdigest()
    return TorrentInfo(
        digest=digest,
        metainfo=bencode(meta),
        info_hash=info_hash,
        piece_length=piece_length,
        piece_count=count,
    )


def _info(metainfo: bytes) -> dict[bytes, Any]:
    decoded: Any = lt.bdecode(metainfo)
    info: dict[bytes, Any] = decoded[b"info"]
    return info


def torrent_ssl_cert(metainfo: bytes) -> bytes | None:
    """The root certificate an SSL torrent names; None for a plain torrent."""
    cert = _info(metainfo).get(b"ssl-cert")
    return bytes(cert) if cert else None


def remake_torrent(
    torrent: TorrentInfo, announce: str | None, ssl_cert: bytes | None
) -> TorrentInfo:
    """The same blob's torrent (same pieces), for another root certificate or none."""
    info = _info(torrent.metainfo)
    return make_torrent(
        torrent.digest,
        int(info[b"length"]),
        int(info[b"piece length"]),
        bytes(info[b"pieces"]),
        announce,
        ssl_cert,
    )
