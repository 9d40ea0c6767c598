"""The server's blob file writer (docket_server/store/blobs.py DirectFile): whatever the
sizes of the writes, the file holds exactly the bytes, with O_DIRECT and without it."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import tempfile
import threading
from pathlib import Path

import pytest

from docket_common.torrent import PieceHasher, piece_length_for
from docket_server.store import blobs
from docket_server.store.blobs import STAGE_BYTES, DirectFile, FilesystemBlobStore
from tests.support.archives import random_bytes

MiB = 1024 * 1024

SIZES = [0, 1, 4095, 4096, 4097, STAGE_BYTES, STAGE_BYTES + 1, 3 * STAGE_BYTES + 17]


def write_in_pieces(path: Path, data: bytes, piece: int) -> DirectFile:
    fd, name = tempfile.mkstemp(dir=path)
    out = DirectFile(fd)
    for i in range(0, len(data), piece):
        out.write(data[i : i + piece])
    out.finish()
    out.close()
    Path(name).replace(path / "blob")
    return out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("piece", [1000, 65536, STAGE_BYTES, 3 * STAGE_BYTES])
def test_the_file_holds_exactly_what_was_written(tmp_path: Path, size: int, piece: int) -> None:
    data = random_bytes(size, size % 97)
    out = write_in_pieces(tmp_path, data, piece)
    assert (tmp_path / "blob").read_bytes() == data
    assert out.size == size


def test_on_a_disk_that_takes_o_direct_it_is_used(tmp_path: Path) -> None:
    fd, _ = tempfile.mkstemp(dir=tmp_path)
    out = DirectFile(fd)
    out.close()
    # /tmp here is ext4 on a virtio disk; where it is not, this says so rather than passing.
    if not out.direct:
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    assert out.direct


def test_where_o_direct_is_refused_it_writes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs, "_set_direct", lambda fd, on: False)
    data = random_bytes(STAGE_BYTES + 123, 5)
    out = write_in_pieces(tmp_path, data, 70_000)
    assert not out.direct
    assert (tmp_path / "blob").read_bytes() == data


def test_a_filesystem_that_takes_the_flag_but_not_the_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some filesystems accept O_DIRECT at open and fail the writes with EINVAL."""
    real_write = os.write

    def picky_write(fd: int, data: bytes) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(blobs.os, "write", picky_write)
    data = random_bytes(2 * STAGE_BYTES + 5, 6)
    out = write_in_pieces(tmp_path, data, 300_000)
    assert not out.direct
    assert (tmp_path / "blob").read_bytes() == data


def test_closing_while_a_thread_writes_waits_for_it_to_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aborted upload closes its file while the writer thread may be mid-write: the
    descriptor must stay open until that write is done, or the number could be reused by
    another file, which the late write would then corrupt."""
    real_write = os.write
    in_write, release = threading.Event(), threading.Event()

    def slow_write(fd: int, data: bytes) -> int:
        in_write.set()
        assert release.wait(10)
        return real_write(fd, data)

    monkeypatch.setattr(blobs.os, "write", slow_write)
    fd, _ = tempfile.mkstemp(dir=tmp_path)
    out = DirectFile(fd)
    writer = threading.Thread(target=out.write, args=(random_bytes(STAGE_BYTES, 9),))
    writer.start()
    assert in_write.wait(10)
    out.close()  # returns at once: the write is still going
    os.fstat(fd)  # still open
    release.set()
    writer.join(10)
    with pytest.raises(OSError, match="Bad file descriptor") as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
    with pytest.raises(ValueError, match="closed"):
        out.write(b"more")


# Sizes around the piece lengths' limits: 64 MiB is the last with 64 KiB pieces, 256 MiB the
# first that a follower started at 64 MiB (for four times that) covers exactly.
UNKNOWN_SIZES = [0, 1, 64 * MiB, 64 * MiB + 1, 100 * MiB, 256 * MiB + 1]


@pytest.mark.parametrize("size", UNKNOWN_SIZES)
def test_pieces_of_a_blob_of_unknown_size_are_those_of_its_final_size(
    tmp_path: Path, size: int
) -> None:
    """A chunked registry upload: the writer learns the size only at the commit, and its
    torrent's pieces must still be the SHA-1s at the piece length for that size."""
    store = FilesystemBlobStore(tmp_path)
    writer = store.writer("", -1)
    block = random_bytes(3 * MiB + 5, 11)
    digest = hashlib.sha256()
    expected = PieceHasher(piece_length_for(size))

    async def write() -> tuple[int, bytes]:
        left = size
        while left > 0:
            chunk = block[: min(len(block), left)]
            left -= len(chunk)
            digest.update(chunk)
            expected.update(chunk)
            await writer.write(chunk)
        return await writer.commit("sha256:" + digest.hexdigest())

    length, pieces = asyncio.run(write())
    assert length == piece_length_for(size)
    assert pieces == expected.pieces()
    assert store.local_path("sha256:" + digest.hexdigest()).stat().st_size == size
    assert list(store.tmp_dir.iterdir()) == []


def test_an_aborted_upload_of_unknown_size_stops_its_follower(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    writer = store.writer("", -1)
    chunk = random_bytes(4 * MiB, 12)

    async def write() -> None:
        for _ in range(20):  # 80 MiB: past 64 MiB, so a follower hashes behind the writes
            await writer.write(chunk)

    before = {t.name for t in threading.enumerate()}
    asyncio.run(write())
    assert any(t.name == "piece-follower" for t in threading.enumerate())
    writer.abort()
    assert list(store.tmp_dir.iterdir()) == []
    assert {t.name for t in threading.enumerate()} <= before
