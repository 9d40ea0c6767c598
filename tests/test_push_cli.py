"""docketctl push / images / inspect / rm, run as a user runs them, against a real server."""

from __future__ import annotations

import gzip
import io
import json
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from docket_common.digest import hex_part
from tests.support.archives import layer_tar, random_bytes, sha256, write_legacy_archive
from tests.support.server import BIN, ServerProcess, docketctl
from tests.support.terminal import plain, run_in_pty


def blob_names(server: ServerProcess) -> set[str]:
    return {p.name for p in (server.data_dir / "blobs").rglob("*") if p.is_file()}


def images_json(server: ServerProcess) -> list[dict[str, object]]:
    result = docketctl("images", "-o", "json", server=server)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The push's one error line, last; before it at most the lines of blobs that went up
    (uploads run side by side: a small one can finish before a bad one fails)."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines, result.stderr
    assert lines[-1].startswith("docketctl: error: "), result.stderr
    for line in lines[:-1]:
        assert re.fullmatch(r"[0-9a-f]{12}: (uploaded|already on the server) \(.+\)", line), (
            result.stderr
        )
    return lines[-1]


BASE = layer_tar({"base.bin": random_bytes(3_000_000, 1)})
TOP1 = layer_tar({"one.bin": random_bytes(1_000_000, 2)})
TOP2 = layer_tar({"two.bin": random_bytes(500_000, 3)})


def test_push_archive_then_a_second_image_uploads_only_new_layers(
    server: ServerProcess, tmp_path: Path
) -> None:
    a1 = write_legacy_archive(tmp_path / "a1.tar", "a1:1", [BASE, TOP1])
    a2 = write_legacy_archive(tmp_path / "a2.tar", "a2:1", [BASE, TOP2])
    first = docketctl("push", "a1:1", "--archive", str(a1.path), "-o", "json", server=server)
    assert first.returncode == 0, first.stderr
    pushed = json.loads(first.stdout)
    assert set(pushed["uploaded_digests"]) == {a1.config_digest, *a1.layer_digests}
    assert pushed["reused_digests"] == []

    second = docketctl("push", "a2:1", "--archive", str(a2.path), server=server)
    assert second.returncode == 0, second.stderr
    assert "1 of 3 blobs already on the server" in second.stderr
    assert "2 blobs uploaded" in second.stdout
    assert "1 already on the server" in second.stdout

    listed = {i["name"]: i for i in images_json(server)}
    assert set(listed) == {"a1:1", "a2:1"}
    for item in listed.values():
        assert {"name", "digest", "size_bytes", "layers", "create_time"} <= set(item)
    assert [layer["digest"] for layer in listed["a2:1"]["layers"]] == a2.layer_digests  # type: ignore[index]
    assert (
        listed["a1:1"]["size_bytes"]
        == len(BASE) + len(TOP1) + pushed["image"]["config"]["size_bytes"]
    )

    inspected = docketctl("inspect", "a1", "-o", "json", server=server)
    assert inspected.returncode == 1  # "a1" means a1:latest, which was never pushed
    inspected = docketctl("inspect", "a1:1", "-o", "json", server=server)
    assert json.loads(inspected.stdout)["digest"] == listed["a1:1"]["digest"]
    table = docketctl("inspect", "a1:1", server=server)
    assert a1.layer_digests[1] in table.stdout

    removed = docketctl("rm", "a1:1", server=server)
    assert removed.returncode == 0, removed.stderr
    assert "Untagged: a1:1" in removed.stdout
    assert f"Deleted: {a1.layer_digests[1]}" in removed.stdout
    assert a1.layer_digests[0] not in removed.stdout  # still used by a2
    assert hex_part(a1.layer_digests[0]) in blob_names(server)
    assert hex_part(a1.layer_digests[1]) not in blob_names(server)
    assert [i["name"] for i in images_json(server)] == ["a2:1"]


def test_server_from_flag_and_environment(server: ServerProcess, tmp_path: Path) -> None:
    env = {k: v for k, v in server.env().items() if k != "DOCKET_SERVER"}
    by_flag = docketctl("--server", server.address, "images", env=env)
    assert by_flag.returncode == 0, by_flag.stderr
    unreachable = docketctl("images", server="127.0.0.1:1")
    assert "cannot reach the Docket server at 127.0.0.1:1" in one_error_line(unreachable)


def _gzip(path: Path) -> Path:
    out = path.with_suffix(".tar.gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    return out


def _escaping(path: Path) -> Path:
    archive = write_legacy_archive(path, "x:1", [TOP2]).path
    with tarfile.open(archive, "a") as tar:
        info = tarfile.TarInfo("../../etc/evil")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    return archive


def _truncated(path: Path) -> Path:
    archive = write_legacy_archive(path, "x:1", [BASE, TOP1]).path
    with archive.open("r+b") as fh:
        fh.truncate(len(BASE) // 2)
    return archive


def _lying(path: Path) -> Path:
    """The manifest's diff_id says one thing, the layer's bytes another."""
    archive = write_legacy_archive(path, "x:1", [TOP1]).path
    data = bytearray(archive.read_bytes())
    at = data.find(b"one.bin")
    data[at + 600] ^= 0xFF  # a byte of the layer's file data
    archive.write_bytes(bytes(data))
    return archive


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: (p.write_bytes(b"hello, not a tar" * 100), p)[1], "not a tar archive"),
        (lambda p: _gzip(write_legacy_archive(p, "x:1", [TOP2]).path), "gzip"),
        (lambda p: (tarfile.open(p, "w").close(), p)[1], "no manifest.json or index.json"),
        (
            lambda p: write_legacy_archive(p, "x:1", [BASE, TOP2], omit_layer=1).path,
            "does not contain",
        ),
        (_escaping, "escapes"),
        (_truncated, "truncated"),
        (lambda p: p.with_name("absent.tar"), "absent.tar"),
        (_lying, "hash to"),
    ],
    ids=[
        "not-tar",
        "gzipped",
        "no-manifest",
        "missing-layer",
        "escaping-path",
        "truncated",
        "no-file",
        "wrong-digest",
    ],
)
def test_bad_archives_fail_cleanly(
    server: ServerProcess, tmp_path: Path, make: object, message: str
) -> None:
    path = make(tmp_path / "bad.tar")  # type: ignore[operator]
    result = docketctl("push", "x:1", "--archive", str(path), server=server)
    assert message in one_error_line(result)
    assert images_json(server) == []
    # Uploads cut short by the failure are dropped as the server sees them cancelled.
    deadline = time.monotonic() + 10
    while list((server.data_dir / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list((server.data_dir / "tmp").iterdir())
    # Only whole, verified blobs can be on disk (a config uploaded before a bad layer, say).
    for name in blob_names(server):
        data = next((server.data_dir / "blobs").rglob(name)).read_bytes()
        assert sha256(data) == "sha256:" + name
    assert server.alive()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["push", "Not/Valid"], "invalid reference"),
        (["push", "ok@sha256:" + "a" * 64, "--archive", "/dev/null"], "needs a tag"),
        (["inspect", "nope:1"], "image nope:1 not found [IMAGE_NOT_FOUND]"),
        (["rm", "nope"], "image nope:latest not found [IMAGE_NOT_FOUND]"),
        (["inspect", "a:-bad"], "invalid reference"),
    ],
)
def test_bad_references_and_missing_images(
    server: ServerProcess, args: list[str], message: str
) -> None:
    assert message in one_error_line(docketctl(*args, server=server))


def test_archive_with_several_images_needs_the_tag(server: ServerProcess, tmp_path: Path) -> None:
    one = write_legacy_archive(tmp_path / "one.tar", "one:1", [TOP1])
    two = write_legacy_archive(tmp_path / "two.tar", "two:1", [TOP2])
    # Merge the two archives: both images, both manifests' entries.
    merged = tmp_path / "both.tar"
    manifests: list[object] = []
    with tarfile.open(merged, "w") as out:
        for src in (one.path, two.path):
            with tarfile.open(src) as tar:
                for member in tar.getmembers():
                    data = tar.extractfile(member)
                    assert data is not None
                    if member.name == "manifest.json":
                        manifests += json.load(data)
                    else:
                        out.addfile(member, data)
        body = json.dumps(manifests).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(body)
        out.addfile(info, io.BytesIO(body))
    assert "one:1" in one_error_line(
        docketctl("push", "three:1", "--archive", str(merged), server=server)
    )
    ok = docketctl("push", "two:1", "--archive", str(merged), server=server)
    assert ok.returncode == 0, ok.stderr
    assert [i["layers"][0]["digest"] for i in images_json(server)] == [two.layer_digests[0]]  # type: ignore[index]


def test_push_killed_half_way_leaves_nothing_behind(server: ServerProcess, tmp_path: Path) -> None:
    big = layer_tar({"big.bin": random_bytes(1024 * 1024, 8) * 300})
    archive = write_legacy_archive(tmp_path / "big.tar", "big:1", [big])
    del big
    proc = subprocess.Popen(
        [
            str(BIN / "docketctl"),
            "push",
            "big:1",
            "--archive",
            str(archive.path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=server.env(),
    )
    tmp_dir = server.data_dir / "tmp"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        parts = list(tmp_dir.iterdir())
        if parts and parts[0].stat().st_size > 10 * 1024 * 1024:
            break
        time.sleep(0.005)
    else:
        pytest.fail("the upload never got going")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while list(tmp_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_dir.iterdir()) == []
    assert hex_part(archive.layer_digests[0]) not in blob_names(server)
    assert images_json(server) == []
    # Pushing again works and uploads what is missing.
    again = docketctl("push", "big:1", "--archive", str(archive.path), server=server)
    assert again.returncode == 0, again.stderr
    assert hex_part(archive.layer_digests[0]) in blob_names(server)


def test_push_on_a_terminal_shows_progress_bars(server: ServerProcess, tmp_path: Path) -> None:
    archive = write_legacy_archive(tmp_path / "a.tar", "a:1", [BASE, TOP1])
    code, raw = run_in_pty(
        [
            str(BIN / "docketctl"),
            "push",
            "a:1",
            "--archive",
            str(archive.path),
        ],
        env=server.env(),
    )
    screen = plain(raw)
    assert code == 0, screen
    assert "━━━━" in screen  # the bars
    assert "total" in screen  # the overall bar over several blobs
    assert re.search(r"3\.01?/3\.01? MB", screen)  # the base layer's bar, finished
    assert "Pushed a:1 sha256:" in screen
    # Off a terminal the same push draws no bars.
    piped = docketctl("push", "a:1", "--archive", str(archive.path), server=server)
    assert "━" not in piped.stderr + piped.stdout


def test_a_command_imports_only_what_it_uses(server: ServerProcess) -> None:
    """docketctl starts on every command: the certificate code (cryptography), the error
    details and the other services' stubs are imported only when a call needs them."""
    ran = docketctl("images", server=server, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert ran.returncode == 0, ran.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in ran.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "docket_common.pb.image_service_pb2_grpc" in imported  # the one it called
    assert "docket_cli.main" in imported
    for unused in (
        "cryptography",
        "docket_common.tls_client",
        "google.rpc.error_details_pb2",
        "docket_common.pb.rollout_service_pb2_grpc",
        "docket_common.pb.token_service_pb2_grpc",
    ):
        assert unused not in imported, unused
    # A failed call still names its reason: the error details load when needed.
    missing = docketctl("inspect", "no/such:1", server=server)
    assert missing.returncode == 1
    assert "[IMAGE_NOT_FOUND]" in missing.stderr


def test_a_rollout_is_sent_before_its_views_are_imported(server: ServerProcess) -> None:
    """`docketctl rollout` sends CreateRollout before it imports the live view and the tables
    (rich): the hosts start on their orders while it does. A rollout the server refuses ends
    before they are needed, so they are never imported."""
    ran = docketctl(
        "rollout", "no/such:1", "--hosts", "g", server=server, env={"PYTHONPROFILEIMPORTTIME": "1"}
    )
    assert ran.returncode == 1
    assert "[IMAGE_NOT_FOUND]" in ran.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in ran.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "docket_common.pb.rollout_service_pb2_grpc" in imported  # the call was made
    for later in ("rich", "docket_cli.render", "docket_cli.rollout_view"):
        assert later not in imported, later
