"""The push's export spool (docket_cli/engine_export.py): blobs are found and readable while
the archive is still being written, and a broken export fails every reader. The push from a
real engine, streamed, is in test_push_engine.py."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from docket_cli.engine_export import (
    PIPE_MIN_BYTES,
    ExportError,
    GrowingSpool,
    MemberPipe,
    SpooledMember,
    export_to_spool,
)
from tests.support.archives import random_bytes


def oci_tar(blobs: list[bytes]) -> bytes:
    """An archive laid out like `docker save` since Docker 25: blobs first, then index.json."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [
            *((f"blobs/sha256/{hashlib.sha256(b).hexdigest()}", b) for b in blobs),
            ("blobs/sha256/not-a-digest", b"x"),
            ("index.json", b"{}"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def ignore(nbytes: int) -> None:
    pass


def chunked(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    position, i = 0, 0
    while position < len(data):
        size = sizes[i % len(sizes)]
        yield data[position : position + size]
        position += size
        i += 1


def test_members_are_reported_as_their_headers_pass_and_read_back_exactly(tmp_path: Path) -> None:
    blobs = [random_bytes(3 * 1024 * 1024 + 17, 1), random_bytes(5000, 2), b""]
    archive = oci_tar(blobs)
    spool = GrowingSpool(tmp_path / "image.tar")
    found: list[tuple[SpooledMember, int]] = []
    exported: list[int] = []

    def on_member(member: SpooledMember) -> None:
        found.append((member, spool.written))

    size = export_to_spool(chunked(archive, [700_000, 1, 4096]), spool, on_member, exported.append)
    assert size == len(archive) == sum(exported)
    assert (tmp_path / "image.tar").read_bytes() == archive
    assert [m.digest for m, _ in found] == [
        f"sha256:{hashlib.sha256(b).hexdigest()}" for b in blobs
    ]
    # The big blob was reported when its header had gone by, well before its last byte.
    big, written_then = found[0]
    assert written_then < big.offset + big.size - 1024 * 1024
    for (member, _), data in zip(found, blobs, strict=True):
        assert member.size == len(data)
        assert b"".join(spool.read(member.offset, member.size, chunk=1000)) == data


def test_a_reader_follows_the_writer(tmp_path: Path) -> None:
    data = random_bytes(4 * 1024 * 1024, 3)
    archive = oci_tar([data])
    spool = GrowingSpool(tmp_path / "image.tar")
    members: list[SpooledMember] = []
    member_seen = threading.Event()
    release = threading.Event()

    def slow_chunks() -> Iterator[bytes]:
        for i, chunk in enumerate(chunked(archive, [64 * 1024])):
            if i == 40:  # 2.5 MiB in: the reader must have had the first MiB by now
                assert release.wait(10)
            yield chunk

    def on_member(member: SpooledMember) -> None:
        members.append(member)
        member_seen.set()

    writer = threading.Thread(
        target=export_to_spool, args=(slow_chunks(), spool, on_member, ignore)
    )
    writer.start()
    assert member_seen.wait(10)
    got = bytearray()
    for chunk in spool.read(members[0].offset, members[0].size, chunk=32 * 1024):
        got += chunk
        if len(got) >= 1024 * 1024:
            release.set()
    writer.join(10)
    assert bytes(got) == data


def test_a_truncated_export_fails_the_readers(tmp_path: Path) -> None:
    data = random_bytes(1024 * 1024, 4)
    archive = oci_tar([data])
    spool = GrowingSpool(tmp_path / "image.tar")
    members: list[SpooledMember] = []
    with pytest.raises(ExportError, match="not a readable tar archive"):
        export_to_spool(iter([archive[:600_000]]), spool, members.append, ignore)
    assert len(members) == 1
    with pytest.raises(ExportError):
        b"".join(spool.read(members[0].offset, members[0].size))


def test_bytes_that_are_not_a_tar_fail_clearly(tmp_path: Path) -> None:
    spool = GrowingSpool(tmp_path / "image.tar")
    with pytest.raises(ExportError, match="not a readable tar archive"):
        export_to_spool(iter([b'{"message": "no such image"}' * 40]), spool, print, ignore)
    assert spool.finished


def test_big_members_can_go_through_a_pipe_and_leave_a_hole(tmp_path: Path) -> None:
    big, small = random_bytes(5 * 1024 * 1024 + 3, 5), random_bytes(2000, 6)
    archive = oci_tar([big, small])
    spool = GrowingSpool(tmp_path / "image.tar")
    received: dict[str, bytes] = {}
    readers: list[threading.Thread] = []

    def on_member(member: SpooledMember) -> MemberPipe | None:
        if member.size < PIPE_MIN_BYTES:
            return None
        pipe = MemberPipe(depth=2)  # small: the export waits for the reader

        def read() -> None:
            head = b"".join(spool.read(member.offset, member.in_file))
            received[member.digest] = head + b"".join(iter(pipe.get, None))

        readers.append(threading.Thread(target=read))
        readers[-1].start()
        return pipe

    size = export_to_spool(chunked(archive, [30_000]), spool, on_member, ignore)
    for reader in readers:
        reader.join(10)
    assert received == {f"sha256:{hashlib.sha256(big).hexdigest()}": big}
    on_disk = (tmp_path / "image.tar").read_bytes()
    assert size == len(on_disk) == len(archive)
    assert big not in on_disk  # a hole where the piped member was (the part not yet written)
    assert small in on_disk
    assert on_disk.endswith(archive[-1024:])


def test_a_failed_export_ends_the_pipes_with_the_error(tmp_path: Path) -> None:
    archive = oci_tar([random_bytes(3 * 1024 * 1024, 7)])
    spool = GrowingSpool(tmp_path / "image.tar")
    pipes: list[MemberPipe] = []

    def on_member(member: SpooledMember) -> MemberPipe:
        pipes.append(MemberPipe(depth=64))
        return pipes[-1]

    with pytest.raises(ExportError):
        export_to_spool(iter([archive[: 2 * 1024 * 1024]]), spool, on_member, ignore)
    assert len(pipes) == 1

    def drain() -> None:
        while pipes[0].get() is not None:
            pass

    with pytest.raises(ExportError, match="export failed"):
        drain()


def test_an_abandoned_pipe_does_not_hold_up_the_export(tmp_path: Path) -> None:
    archive = oci_tar([random_bytes(8 * 1024 * 1024, 8)])
    spool = GrowingSpool(tmp_path / "image.tar")

    def on_member(member: SpooledMember) -> MemberPipe:
        pipe = MemberPipe(depth=1)
        pipe.abandon()  # the upload failed at once: nobody reads
        return pipe

    assert export_to_spool(iter([archive]), spool, on_member, ignore) == len(archive)


def test_abandoning_a_pipe_wakes_its_reader() -> None:
    pipe = MemberPipe(depth=1)
    got: list[bytes | None] = []
    reader = threading.Thread(target=lambda: got.append(pipe.get()))
    reader.start()
    pipe.abandon()
    reader.join(5)
    assert got == [None]
    pipe.put(b"dropped")  # the export goes on without waiting
