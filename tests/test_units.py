"""Unit tests of the shared pieces: references, digests, piece sizes, torrents."""

from __future__ import annotations

import hashlib

import libtorrent as lt
import pytest

from docket_common.digest import InvalidDigestError, check_digest, hex_part
from docket_common.reference import InvalidReferenceError, parse_reference, parse_tagged
from docket_common.torrent import (
    MAX_PIECE_LENGTH,
    MIN_PIECE_LENGTH,
    PieceHasher,
    bencode,
    make_torrent,
    piece_count,
    piece_length_for,
)
from tests.support.archives import random_bytes, sha256

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "repository", "tag", "digest"),
    [
        ("perl", "perl", "latest", None),
        ("perl:5.40", "perl", "5.40", None),
        ("team/app:1.4", "team/app", "1.4", None),
        ("localhost:5000/app", "localhost:5000/app", "latest", None),
        ("localhost:5000/app:v2", "localhost:5000/app", "v2", None),
        ("my-reg.example.com/a/b_c.d:x", "my-reg.example.com/a/b_c.d", "x", None),
        (f"perl@{DIGEST}", "perl", None, DIGEST),
    ],
)
def test_reference_parses(text: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.repository, ref.tag, ref.digest) == (repository, tag, digest)


def test_reference_without_tag_means_latest() -> None:
    assert parse_reference("perl").name == "perl:latest"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " perl",
        "Perl",
        "perl:",
        "perl:-x",
        "perl::1",
        "/perl",
        "perl/",
        "a//b",
        "perl@sha256:1",
        f"perl:1@{DIGEST}",
        "pe rl",
        "perl:" + "x" * 129,
        "a" * 256,
    ],
)
def test_reference_rejects(text: str) -> None:
    with pytest.raises(InvalidReferenceError, match="invalid reference"):
        parse_reference(text)


def test_push_needs_a_tag() -> None:
    with pytest.raises(InvalidReferenceError, match="needs a tag"):
        parse_tagged(f"perl@{DIGEST}")


def test_digest_checks() -> None:
    assert hex_part(DIGEST) == "ab" * 32
    for bad in ["sha256:" + "AB" * 32, "sha512:" + "ab" * 32, "sha256:abc", "ab" * 32]:
        with pytest.raises(InvalidDigestError):
            check_digest(bad)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, MIN_PIECE_LENGTH),
        (1, MIN_PIECE_LENGTH),
        (64 * 1024 * 1024, 64 * 1024),
        (64 * 1024 * 1024 + 1, 128 * 1024),
        (1024**3, 1024 * 1024),
        (100 * 1024**3, MAX_PIECE_LENGTH),
    ],
)
def test_piece_length_rule(size: int, expected: int) -> None:
    assert piece_length_for(size) == expected
    if size <= MAX_PIECE_LENGTH * 1024:
        assert piece_count(size, expected) <= 1024


def test_bencode() -> None:
    assert bencode({"b": 1, "a": [b"x", "y"]}) == b"d1:al1:x1:ye1:bi1ee"
    with pytest.raises(TypeError):
        bencode(True)


@pytest.mark.parametrize("size", [1, 65536, 65537, 300_001])
def test_piece_hasher_matches_whole_pieces_in_any_chunking(size: int) -> None:
    data = random_bytes(size, seed=size)
    piece = 65536
    expected = b"".join(hashlib.sha1(data[i : i + piece]).digest() for i in range(0, size, piece))
    hasher = PieceHasher(piece)
    for i in range(0, size, 7777):
        hasher.update(data[i : i + 7777])
    assert hasher.pieces() == expected


def test_torrent_is_what_libtorrent_reads() -> None:
    data = random_bytes(200_000, seed=1)
    digest = sha256(data)
    hasher = PieceHasher(piece_length_for(len(data)))
    hasher.update(data)
    torrent = make_torrent(digest, len(data), hasher.piece_length, hasher.pieces(), "http://t/an")
    info = lt.torrent_info(lt.bdecode(torrent.metainfo))
    assert str(info.info_hashes().v1) == torrent.info_hash
    assert info.priv()
    assert info.num_pieces() == torrent.piece_count == 4
    assert info.piece_length() == 65536
    assert info.name() == hex_part(digest)
    assert info.total_size() == len(data)
    assert lt.bdecode(torrent.metainfo)[b"announce"] == b"http://t/an"


def test_torrent_refuses_wrong_piece_count() -> None:
    with pytest.raises(ValueError, match="piece hashes"):
        make_torrent(DIGEST, 200_000, 65536, b"\0" * 20)


def test_a_saved_sha256_goes_on_where_it_stopped() -> None:
    import hashlib

    from docket_common.resumable_sha256 import STATE_SIZE, ResumableSha256, available

    assert available()  # libcrypto is on every machine we run on: a missing one is a bug here
    data = bytes(range(256)) * 4099
    for cut in (0, 1, 63, 64, 65, 4096, len(data) - 1, len(data)):
        first = ResumableSha256()
        first.update(data[:cut])
        state = first.state()
        assert len(state) == STATE_SIZE
        second = ResumableSha256(state)
        second.update(data[cut:])
        assert second.hexdigest() == hashlib.sha256(data).hexdigest()
        assert first.hexdigest() == hashlib.sha256(data[:cut]).hexdigest()  # and it goes on
    with pytest.raises(ValueError, match="256 bytes"):
        ResumableSha256(b"short")
