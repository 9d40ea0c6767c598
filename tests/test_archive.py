"""Tests for docket_common.archive: docker save tarballs built by hand with tarfile."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import re
import tarfile
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from docket_common import archive as archive_module
from docket_common.archive import ArchiveBlob, ArchiveError, ArchiveImage, ImageArchive

MIB = 1024 * 1024
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
CREATED = "2024-05-06T07:08:09.123456789Z"
CREATED_DT = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


# -- building archives ---------------------------------------------------------------------


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hexof(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Entry:
    """One tar member to write: a regular file, a directory, a symlink or a hard link."""

    name: str
    data: bytes = b""
    kind: str = "file"
    target: str = ""


def sym(name: str, target: str) -> Entry:
    return Entry(name, kind="symlink", target=target)


def hard(name: str, target: str) -> Entry:
    return Entry(name, kind="hardlink", target=target)


def directory(name: str) -> Entry:
    return Entry(name, kind="dir")


def write_tar(path: Path, entries: list[Entry]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mtime = 1_700_000_000
            if e.kind == "file":
                info.size = len(e.data)
                tf.addfile(info, io.BytesIO(e.data))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
            }[e.kind]
            info.mode = 0o755
            info.linkname = e.target
            tf.addfile(info)
    return path


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A real (tiny) layer tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


LAYER_1 = tar_bytes({"etc/hostname": b"docket\n", "bin/hello": b"#!/bin/sh\necho hello\n"})
LAYER_2 = tar_bytes({"app/main.py": b"print('hi')\n" * 50})
LAYER_3 = tar_bytes({"app/extra.txt": b"extra\n"})


def config_bytes(
    diff_ids: list[str],
    *,
    created: Any = CREATED,
    os_name: str | None = "linux",
    architecture: str | None = "amd64",
    variant: str | None = None,
) -> bytes:
    doc: dict[str, Any] = {
        "config": {"Cmd": ["/bin/hello"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "test"}],
    }
    if created is not None:
        doc["created"] = created
    if os_name is not None:
        doc["os"] = os_name
    if architecture is not None:
        doc["architecture"] = architecture
    if variant is not None:
        doc["variant"] = variant
    return json.dumps(doc).encode()


@dataclass
class Legacy:
    """A Docker < 25 archive: manifest.json, <id>.json config, <v1id>/layer.tar layers."""

    layers: list[bytes] = field(default_factory=lambda: [LAYER_1, LAYER_2])
    tags: list[str] | None = field(default_factory=lambda: ["perl:latest"])
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    manifest: Any = None  # replaces the generated manifest.json document when set
    extra: list[Entry] = field(default_factory=list)

    @property
    def config(self) -> bytes:
        return config_bytes([sha(x) for x in self.layers], **self.config_kwargs)

    @property
    def config_name(self) -> str:
        return f"{hexof(self.config)}.json"

    @property
    def layer_names(self) -> list[str]:
        return [f"{hexof(b'v1' + x)}/layer.tar" for x in self.layers]

    def manifest_doc(self) -> Any:
        if self.manifest is not None:
            return self.manifest
        return [{"Config": self.config_name, "RepoTags": self.tags, "Layers": self.layer_names}]

    def entries(self) -> list[Entry]:
        entries = [Entry(self.config_name, self.config)]
        for name, data in zip(self.layer_names, self.layers, strict=True):
            v1 = name.split("/")[0]
            entries += [directory(v1), Entry(f"{v1}/VERSION", b"1.0"), Entry(name, data)]
        entries.append(Entry("manifest.json", json.dumps(self.manifest_doc()).encode()))
        entries.append(Entry("repositories", b"{}"))
        return entries + self.extra

    def write(self, path: Path) -> Path:
        return write_tar(path, self.entries())


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha(data), "size": len(data), **extra}


@dataclass
class OciImage:
    """The blobs of one OCI image: a config, layers (one gzip'd by default) and a manifest."""

    layers: list[tuple[bytes, str]] = field(
        default_factory=lambda: [(LAYER_1, OCI_LAYER), (LAYER_2, OCI_LAYER_GZIP)]
    )
    config_kwargs: dict[str, Any] = field(default_factory=dict)
    manifest_media_type: str = OCI_MANIFEST
    config_media_type: str = OCI_CONFIG

    def blob(self, data: bytes, media_type: str) -> bytes:
        return gzip.compress(data, mtime=0) if media_type.endswith("gzip") else data

    @property
    def config(self) -> bytes:
        return config_bytes([sha(x) for x, _ in self.layers], **self.config_kwargs)

    @property
    def layer_blobs(self) -> list[tuple[bytes, str]]:
        return [(self.blob(x, mt), mt) for x, mt in self.layers]

    def manifest_doc(self) -> dict[str, Any]:
        return {
            "schemaVersion": 2,
            "mediaType": self.manifest_media_type,
            "config": descriptor(self.config_media_type, self.config),
            "layers": [descriptor(mt, data) for data, mt in self.layer_blobs],
        }

    @property
    def manifest(self) -> bytes:
        return json.dumps(self.manifest_doc()).encode()

    def blobs(self) -> list[bytes]:
        return [self.manifest, self.config] + [data for data, _ in self.layer_blobs]

    def index_entry(self, **extra: Any) -> dict[str, Any]:
        return descriptor(self.manifest_media_type, self.manifest, **extra)


def oci_entries(
    index: Any, blobs: list[bytes], *, manifest_json: Any = None, layout: bool = True
) -> list[Entry]:
    entries = [directory("blobs"), directory("blobs/sha256")]
    seen: set[str] = set()
    for data in blobs:
        if hexof(data) not in seen:
            seen.add(hexof(data))
            entries.append(Entry(f"blobs/sha256/{hexof(data)}", data))
    if layout:
        entries.append(Entry("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'))
    raw_index = index if isinstance(index, bytes) else json.dumps(index).encode()
    entries.append(Entry("index.json", raw_index))
    if manifest_json is not None:
        entries.append(Entry("manifest.json", json.dumps(manifest_json).encode()))
    return entries


def index_doc(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(entries)}


PERL_ANNOTATIONS = {
    "io.containerd.image.name": "docker.io/library/perl:latest",
    "org.opencontainers.image.ref.name": "latest",
}


def write_oci(path: Path, image: OciImage | None = None, **annotations: str) -> Path:
    image = image or OciImage()
    entry = image.index_entry(annotations=annotations or PERL_ANNOTATIONS)
    return write_tar(path, oci_entries(index_doc(entry), image.blobs()))


def read_all(archive: ImageArchive, blob: ArchiveBlob) -> bytes:
    with archive.open_blob(blob) as f:
        return f.read()


def expect_error(path: Path, pattern: str) -> str:
    """Opening ``path`` must fail with a one-line message naming the file and matching."""
    with pytest.raises(ArchiveError, match=pattern) as caught:
        ImageArchive(path).close()
    message = str(caught.value)
    assert message.startswith(f"{path.name}: "), message
    assert "\n" not in message
    return message


def member_info(path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tf:
        return tf.getmember(name)


@pytest.fixture
def amd64_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_module, "_host_platform", lambda: ("linux", "amd64", ""))


# -- legacy layout -------------------------------------------------------------------------


def test_legacy_archive_metadata(tmp_path: Path) -> None:
    legacy = Legacy()
    path = legacy.write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        assert len(archive.images) == 1
        image = archive.images[0]
    assert image.layout == "legacy"
    assert image.repo_tags == ("perl:latest",)
    assert image.created == CREATED_DT
    assert image.created is not None
    assert image.created.utcoffset() is not None
    assert image.platform == "linux/amd64"
    assert image.config == ArchiveBlob(
        digest=sha(legacy.config),
        size=len(legacy.config),
        media_type=OCI_CONFIG,
        member=legacy.config_name,
    )
    assert image.diff_ids == (sha(LAYER_1), sha(LAYER_2))
    assert image.layers == (
        ArchiveBlob(sha(LAYER_1), len(LAYER_1), OCI_LAYER, legacy.layer_names[0]),
        ArchiveBlob(sha(LAYER_2), len(LAYER_2), OCI_LAYER, legacy.layer_names[1]),
    )


def test_legacy_open_blob_bytes_match_digests(tmp_path: Path) -> None:
    path = Legacy().write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        image = archive.find(None)
        for blob in (image.config, *image.layers):
            data = read_all(archive, blob)
            assert len(data) == blob.size
            assert sha(data) == blob.digest
        # The layer really is the tar we built.
        with archive.open_blob(image.layers[0]) as f, tarfile.open(fileobj=f) as layer:
            assert sorted(layer.getnames()) == ["bin/hello", "etc/hostname"]


def test_legacy_untagged_image(tmp_path: Path) -> None:
    path = Legacy(tags=None).write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        assert archive.find(None).repo_tags == ()


def test_legacy_image_without_layers(tmp_path: Path) -> None:
    path = Legacy(layers=[]).write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        image = archive.find("perl")
    assert image.layers == ()
    assert image.diff_ids == ()


def test_legacy_member_names_with_dot_slash(tmp_path: Path) -> None:
    legacy = Legacy()
    entries = [Entry("./" + e.name, e.data, e.kind, e.target) for e in legacy.entries()]
    path = write_tar(tmp_path / "archive.tar", entries)
    with ImageArchive(path) as archive:
        image = archive.find(None)
        assert image.layers[1].member == legacy.layer_names[1]
        assert sha(read_all(archive, image.layers[1])) == sha(LAYER_2)


def test_legacy_symlinked_layer_is_resolved(tmp_path: Path) -> None:
    # Docker writes a repeated layer once and links the other directory's layer.tar to it.
    legacy = Legacy(layers=[LAYER_1, LAYER_2, LAYER_1])
    names = legacy.layer_names
    first_dir = names[0].split("/")[0]
    link_dir = hexof(b"another v1 id")
    doc = legacy.manifest_doc()
    doc[0]["Layers"] = [names[0], names[1], f"{link_dir}/layer.tar"]
    legacy.manifest = doc
    legacy.extra = [directory(link_dir), sym(f"{link_dir}/layer.tar", f"../{first_dir}/layer.tar")]
    path = legacy.write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        image = archive.find(None)
        assert image.layers[2].member == names[0]
        assert image.layers[2].digest == sha(LAYER_1)
        assert image.layers[2].size == len(LAYER_1)
        assert read_all(archive, image.layers[2]) == LAYER_1


def test_legacy_symlink_before_its_target(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1])
    real = legacy.layer_names[0]
    entries = legacy.entries()
    entries.insert(0, sym("aaa/layer.tar", f"../{real}"))
    legacy.manifest = [{"Config": legacy.config_name, "RepoTags": [], "Layers": ["aaa/layer.tar"]}]
    entries[-2] = Entry("manifest.json", json.dumps(legacy.manifest).encode())
    path = write_tar(tmp_path / "archive.tar", entries)
    with ImageArchive(path) as archive:
        image = archive.find(None)
        assert image.layers[0].member == real
        assert read_all(archive, image.layers[0]) == LAYER_1


def test_legacy_hardlinked_layer_and_config(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1])
    real_layer = legacy.layer_names[0]
    legacy.extra = [hard("linked/layer.tar", real_layer), hard("cfg.json", legacy.config_name)]
    legacy.manifest = [{"Config": "cfg.json", "RepoTags": ["a:b"], "Layers": ["linked/layer.tar"]}]
    path = legacy.write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        image = archive.find("a:b")
        assert image.config.member == legacy.config_name
        assert image.config.digest == sha(legacy.config)
        assert image.layers[0].member == real_layer
        assert read_all(archive, image.layers[0]) == LAYER_1


def test_legacy_symlinked_directory_component(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1])
    real_dir = legacy.layer_names[0].split("/")[0]
    legacy.extra = [sym("alias", real_dir)]
    legacy.manifest = [
        {"Config": legacy.config_name, "RepoTags": [], "Layers": ["alias/layer.tar"]}
    ]
    path = legacy.write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        assert archive.find(None).layers[0].member == legacy.layer_names[0]


def test_legacy_several_images(tmp_path: Path) -> None:
    perl = Legacy(layers=[LAYER_1, LAYER_2], tags=["perl:latest", "perl:5"])
    app = Legacy(layers=[LAYER_1, LAYER_3], tags=["team/app:1.0"], config_kwargs={"variant": "v8"})
    untagged = Legacy(layers=[LAYER_3], tags=None)
    entries: dict[str, Entry] = {}
    for legacy in (perl, app, untagged):
        for e in legacy.entries():
            entries[e.name] = e
    manifest = perl.manifest_doc() + app.manifest_doc() + untagged.manifest_doc()
    entries["manifest.json"] = Entry("manifest.json", json.dumps(manifest).encode())
    path = write_tar(tmp_path / "archive.tar", list(entries.values()))
    with ImageArchive(path) as archive:
        assert [i.repo_tags for i in archive.images] == [
            ("perl:latest", "perl:5"),
            ("team/app:1.0",),
            (),
        ]
        assert archive.find("perl:5") is archive.images[0]
        assert archive.find("perl") is archive.images[0]
        assert archive.find("docker.io/library/perl:latest") is archive.images[0]
        assert archive.find("docker.io/team/app:1.0") is archive.images[1]
        assert archive.find(sha(untagged.config)) is archive.images[2]
        assert archive.images[1].platform == "linux/amd64/v8"
        assert archive.images[1].layers[0].member == archive.images[0].layers[0].member
        with pytest.raises(ArchiveError, match=r"^archive\.tar: holds 3 images") as caught:
            archive.find(None)
        assert "perl:latest, perl:5" in str(caught.value)
        assert "team/app:1.0" in str(caught.value)
        assert f"untagged {sha(untagged.config)}" in str(caught.value)
        with pytest.raises(ArchiveError, match=r"no image tagged perl:6 .*perl:5") as caught:
            archive.find("perl:6")
        with pytest.raises(ArchiveError, match="no image tagged team/app "):
            archive.find("team/app")  # means team/app:latest


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        (CREATED, CREATED_DT),
        ("2024-05-06T07:08:09Z", datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
        ("2024-05-06T07:08:09.5Z", datetime(2024, 5, 6, 7, 8, 9, 500000, tzinfo=UTC)),
        ("2024-05-06T09:08:09.123+02:00", datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)),
        ("2024-05-06T02:08:09-05:00", datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)),
        ("1970-01-01T00:00:00Z", datetime(1970, 1, 1, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
        ("yesterday", None),
        ("2024-13-01T00:00:00Z", None),
        (1714979289, None),
        (None, None),
    ],
)
def test_created_is_parsed_robustly(
    tmp_path: Path, created: Any, expected: datetime | None
) -> None:
    path = Legacy(config_kwargs={"created": created}).write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        got = archive.find(None).created
    assert got == expected
    assert got is None or got.tzinfo == UTC


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "linux/amd64"),
        ({"architecture": "arm64", "variant": "v8"}, "linux/arm64/v8"),
        ({"os_name": "windows"}, "windows/amd64"),
        ({"os_name": None}, ""),
        ({"architecture": None}, ""),
    ],
)
def test_platform(tmp_path: Path, kwargs: dict[str, Any], expected: str) -> None:
    path = Legacy(config_kwargs=kwargs).write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        assert archive.find(None).platform == expected


def test_manifest_json_only_with_content_addressed_blobs(tmp_path: Path) -> None:
    """A Docker 25 archive with index.json removed still reads as the legacy layout."""
    image = OciImage(layers=[(LAYER_1, OCI_LAYER), (LAYER_2, OCI_LAYER)])
    manifest_json = [
        {
            "Config": f"blobs/sha256/{hexof(image.config)}",
            "RepoTags": ["perl:latest"],
            "Layers": [f"blobs/sha256/{hexof(LAYER_1)}", f"blobs/sha256/{hexof(LAYER_2)}"],
        }
    ]
    entries = [e for e in oci_entries(index_doc(), image.blobs()) if e.name != "index.json"]
    entries.append(Entry("manifest.json", json.dumps(manifest_json).encode()))
    path = write_tar(tmp_path / "archive.tar", entries)
    with ImageArchive(path) as archive:
        got = archive.find("perl")
    assert got.layout == "legacy"
    assert [b.digest for b in got.layers] == [sha(LAYER_1), sha(LAYER_2)]
    assert got.config.digest == sha(image.config)


def test_legacy_refuses_compressed_content_addressed_layer(tmp_path: Path) -> None:
    image = OciImage()  # second layer is gzip'd: its blob digest is not its diff_id
    gz = image.layer_blobs[1][0]
    manifest_json = [
        {
            "Config": f"blobs/sha256/{hexof(image.config)}",
            "RepoTags": ["perl:latest"],
            "Layers": [f"blobs/sha256/{hexof(LAYER_1)}", f"blobs/sha256/{hexof(gz)}"],
        }
    ]
    entries = [e for e in oci_entries(index_doc(), image.blobs()) if e.name != "index.json"]
    entries.append(Entry("manifest.json", json.dumps(manifest_json).encode()))
    path = write_tar(tmp_path / "archive.tar", entries)
    expect_error(path, rf"layer blobs/sha256/{hexof(gz)} is blob .* not the uncompressed layer")


# -- OCI layout ------------------------------------------------------------------------------


def test_oci_archive_metadata_and_blobs(tmp_path: Path) -> None:
    image = OciImage()
    path = write_oci(tmp_path / "archive.tar", image)
    gz = gzip.compress(LAYER_2, mtime=0)
    with ImageArchive(path) as archive:
        got = archive.find(None)
        assert got.layout == "oci"
        assert got.repo_tags == ("perl:latest",)
        assert got.created == CREATED_DT
        assert got.platform == "linux/amd64"
        assert got.config == ArchiveBlob(
            sha(image.config), len(image.config), OCI_CONFIG, f"blobs/sha256/{hexof(image.config)}"
        )
        assert got.layers == (
            ArchiveBlob(sha(LAYER_1), len(LAYER_1), OCI_LAYER, f"blobs/sha256/{hexof(LAYER_1)}"),
            ArchiveBlob(sha(gz), len(gz), OCI_LAYER_GZIP, f"blobs/sha256/{hexof(gz)}"),
        )
        # diff_ids come from the config: the uncompressed digests.
        assert got.diff_ids == (sha(LAYER_1), sha(LAYER_2))
        assert got.layers[1].digest != got.diff_ids[1]
        for blob in (got.config, *got.layers):
            data = read_all(archive, blob)
            assert sha(data) == blob.digest
            assert len(data) == blob.size
        assert gzip.decompress(read_all(archive, got.layers[1])) == LAYER_2


def test_oci_docker_v2_manifest_media_types(tmp_path: Path) -> None:
    image = OciImage(
        layers=[(LAYER_1, DOCKER_LAYER)],
        manifest_media_type=DOCKER_MANIFEST,
        config_media_type=DOCKER_CONFIG,
    )
    path = write_oci(tmp_path / "archive.tar", image)
    with ImageArchive(path) as archive:
        got = archive.find("perl:latest")
    assert got.config.media_type == DOCKER_CONFIG
    assert got.layers[0].media_type == DOCKER_LAYER


def test_oci_without_oci_layout_file(tmp_path: Path) -> None:
    image = OciImage()
    entries = oci_entries(
        index_doc(image.index_entry(annotations=PERL_ANNOTATIONS)), image.blobs(), layout=False
    )
    with ImageArchive(write_tar(tmp_path / "archive.tar", entries)) as archive:
        assert archive.find("perl").layout == "oci"


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        (PERL_ANNOTATIONS, ("perl:latest",)),
        ({"io.containerd.image.name": "docker.io/bitnami/redis:7.2"}, ("bitnami/redis:7.2",)),
        ({"io.containerd.image.name": "ghcr.io/org/app:v1"}, ("ghcr.io/org/app:v1",)),
        ({"io.containerd.image.name": "localhost:5000/app:2"}, ("localhost:5000/app:2",)),
        ({"io.containerd.image.name": "docker.io/library/perl"}, ("perl:latest",)),
        ({"org.opencontainers.image.ref.name": "perl:5.40"}, ("perl:5.40",)),
        ({"org.opencontainers.image.ref.name": "docker.io/library/perl:5"}, ("perl:5",)),
        ({"org.opencontainers.image.ref.name": "latest"}, ()),
        ({"org.opencontainers.image.ref.name": "localhost:5000/app"}, ()),
        ({"io.containerd.image.name": "docker.io/library/perl@sha256:" + "a" * 64}, ()),
        ({"unrelated": "x"}, ()),
    ],
)
def test_oci_repo_tags_from_annotations(
    tmp_path: Path, annotations: dict[str, str], expected: tuple[str, ...]
) -> None:
    path = write_oci(tmp_path / "archive.tar", OciImage(), **annotations)
    with ImageArchive(path) as archive:
        assert archive.find(None).repo_tags == expected


def test_oci_entries_for_the_same_manifest_merge_their_tags(tmp_path: Path) -> None:
    image = OciImage()
    other = OciImage(layers=[(LAYER_3, OCI_LAYER)])
    index = index_doc(
        image.index_entry(annotations=PERL_ANNOTATIONS),
        other.index_entry(annotations={"io.containerd.image.name": "docker.io/library/app:1"}),
        image.index_entry(annotations={"io.containerd.image.name": "docker.io/library/perl:5"}),
    )
    path = write_tar(tmp_path / "archive.tar", oci_entries(index, image.blobs() + other.blobs()))
    with ImageArchive(path) as archive:
        assert [i.repo_tags for i in archive.images] == [("perl:latest", "perl:5"), ("app:1",)]
        assert archive.find("perl:5") is archive.find("perl")
        assert archive.find("app:1").layers[0].digest == sha(LAYER_3)


def test_oci_nested_index_picks_host_platform(tmp_path: Path, amd64_host: None) -> None:
    arm = OciImage(config_kwargs={"architecture": "arm64", "variant": "v8"})
    amd = OciImage(layers=[(LAYER_3, OCI_LAYER)])
    nested = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                arm.index_entry(platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
                amd.index_entry(platform={"os": "linux", "architecture": "amd64"}),
            ],
        }
    ).encode()
    top = index_doc(descriptor(OCI_INDEX, nested, annotations=PERL_ANNOTATIONS))
    path = write_tar(
        tmp_path / "archive.tar", oci_entries(top, [nested, *arm.blobs(), *amd.blobs()])
    )
    with ImageArchive(path) as archive:
        got = archive.find("perl")
        assert got.platform == "linux/amd64"
        assert got.config.digest == sha(amd.config)
        assert [b.digest for b in got.layers] == [sha(LAYER_3)]
        assert got.repo_tags == ("perl:latest",)


def test_oci_nested_index_without_platforms_takes_first(tmp_path: Path, amd64_host: None) -> None:
    first = OciImage(config_kwargs={"architecture": "arm64"})
    second = OciImage(layers=[(LAYER_3, OCI_LAYER)])
    nested = json.dumps(index_doc(first.index_entry(), second.index_entry())).encode()
    top = index_doc(descriptor(OCI_INDEX, nested))
    path = write_tar(
        tmp_path / "archive.tar", oci_entries(top, [nested, *first.blobs(), *second.blobs()])
    )
    with ImageArchive(path) as archive:
        assert archive.find(None).config.digest == sha(first.config)


def test_oci_nested_index_skips_absent_platforms_and_attestations(
    tmp_path: Path, amd64_host: None
) -> None:
    """docker save of one platform of a multi-platform image: only that platform's blobs."""
    amd = OciImage()
    arm = OciImage(layers=[(LAYER_3, OCI_LAYER)], config_kwargs={"architecture": "arm64"})
    attestation = OciImage(layers=[(LAYER_3, OCI_LAYER)], config_kwargs={"architecture": "x"})
    nested = json.dumps(
        index_doc(
            amd.index_entry(platform={"os": "linux", "architecture": "amd64"}),  # not saved
            attestation.index_entry(
                platform={"os": "unknown", "architecture": "unknown"},
                annotations={"vnd.docker.reference.type": "attestation-manifest"},
            ),
            arm.index_entry(platform={"os": "linux", "architecture": "arm64"}),
        )
    ).encode()
    top = index_doc(descriptor(OCI_INDEX, nested))
    path = write_tar(
        tmp_path / "archive.tar", oci_entries(top, [nested, *arm.blobs(), *attestation.blobs()])
    )
    with ImageArchive(path) as archive:
        assert archive.find(None).platform == "linux/arm64"


def test_docker25_archive_prefers_index_json(tmp_path: Path) -> None:
    image = OciImage()  # one gzip'd layer: only index.json can describe it
    gz = image.layer_blobs[1][0]
    manifest_json = [
        {
            "Config": f"blobs/sha256/{hexof(image.config)}",
            "RepoTags": ["from-manifest-json:1"],
            "Layers": [f"blobs/sha256/{hexof(LAYER_1)}", f"blobs/sha256/{hexof(gz)}"],
        }
    ]
    entries = oci_entries(
        index_doc(image.index_entry(annotations=PERL_ANNOTATIONS)),
        image.blobs(),
        manifest_json=manifest_json,
    )
    path = write_tar(tmp_path / "archive.tar", entries)
    with ImageArchive(path) as archive:
        got = archive.find(None)
    assert got.layout == "oci"
    assert got.repo_tags == ("perl:latest",)
    assert [b.media_type for b in got.layers] == [OCI_LAYER, OCI_LAYER_GZIP]
    assert got.layers[1].digest == sha(gz)


# -- open_blob -------------------------------------------------------------------------------


def test_open_blob_seek_tell_and_partial_reads(tmp_path: Path) -> None:
    path = Legacy().write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        blob = archive.find(None).layers[1]
        with archive.open_blob(blob) as f:
            assert f.read(10) == LAYER_2[:10]
            assert f.tell() == 10
            f.seek(100)
            assert f.read(5) == LAYER_2[100:105]
            f.seek(-7, io.SEEK_END)
            assert f.read() == LAYER_2[-7:]
            assert f.read(10) == b""  # stops at the member's end, not the archive's


def test_open_blob_readers_are_independent(tmp_path: Path) -> None:
    path = Legacy().write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        image = archive.find(None)
        results: dict[int, str] = {}

        def stream(i: int, blob: ArchiveBlob) -> None:
            h = hashlib.sha256()
            with archive.open_blob(blob) as f:
                while chunk := f.read(7):
                    h.update(chunk)
            results[i] = "sha256:" + h.hexdigest()

        threads = [
            threading.Thread(target=stream, args=(i, blob))
            for i, blob in enumerate([*image.layers, *image.layers, image.config])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    expected = [b.digest for b in (*image.layers, *image.layers, image.config)]
    assert [results[i] for i in range(len(expected))] == expected


def test_open_blob_works_after_close_only_if_already_open(tmp_path: Path) -> None:
    path = Legacy().write(tmp_path / "archive.tar")
    archive = ImageArchive(path)
    blob = archive.find(None).layers[0]
    reader = archive.open_blob(blob)
    archive.close()
    archive.close()  # idempotent
    with reader:
        assert reader.read() == LAYER_1
    with pytest.raises(ValueError, match="closed"):
        archive.open_blob(blob)


def test_open_blob_refuses_a_foreign_blob(tmp_path: Path) -> None:
    path = Legacy().write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        layer = archive.find(None).layers[0]
        with pytest.raises(ArchiveError, match="not a 1-byte blob"):
            archive.open_blob(ArchiveBlob(layer.digest, 1, layer.media_type, layer.member))
        with pytest.raises(ArchiveError, match=r"nope/layer\.tar is not a \d+-byte blob"):
            archive.open_blob(ArchiveBlob(layer.digest, layer.size, OCI_LAYER, "nope/layer.tar"))


def test_open_blob_on_file_truncated_after_open(tmp_path: Path) -> None:
    big = random.Random(1).randbytes(300_000)
    path = Legacy(layers=[big]).write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        blob = archive.find(None).layers[0]
        cut = member_info(path, blob.member).offset_data + 100_000
        with path.open("r+b") as f:
            f.truncate(cut)
        with archive.open_blob(blob) as reader:
            assert reader.read(50_000) == big[:50_000]
            with pytest.raises(ArchiveError, match=r"^archive\.tar: truncated \(member .*layer"):
                reader.read()


def test_large_layer_is_streamed_not_loaded(tmp_path: Path) -> None:
    size = 50 * MIB
    pattern = random.Random(7).randbytes(MIB)

    class Pattern(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            n = min(len(buffer), size - self.pos, MIB - self.pos % MIB)
            buffer[:n] = pattern[self.pos % MIB : self.pos % MIB + n]
            self.pos += n
            return n

    layer_path = tmp_path / "layer.tar"
    with tarfile.open(layer_path, "w") as tf:
        info = tarfile.TarInfo("data/blob.bin")
        info.size = size
        with io.BufferedReader(Pattern()) as src:
            tf.addfile(info, src)
    h = hashlib.sha256()
    with layer_path.open("rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    diff_id = "sha256:" + h.hexdigest()
    config = config_bytes([diff_id])
    manifest = [{"Config": "c.json", "RepoTags": ["big:1"], "Layers": ["v1/layer.tar"]}]
    path = tmp_path / "archive.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in (("c.json", config), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        tf.add(layer_path, arcname="v1/layer.tar")

    tracemalloc.start()
    try:
        with ImageArchive(path) as archive:
            _, open_peak = tracemalloc.get_traced_memory()
            blob = archive.find("big:1").layers[0]
            streamed = hashlib.sha256()
            total = 0
            with archive.open_blob(blob) as reader:
                while chunk := reader.read(MIB):
                    streamed.update(chunk)
                    total += len(chunk)
            _, stream_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert blob.size > size
    assert total == blob.size
    assert "sha256:" + streamed.hexdigest() == blob.digest == diff_id
    assert open_peak < 2 * MIB, open_peak
    assert stream_peak < 8 * MIB, stream_peak


# -- refusing bad archives -------------------------------------------------------------------


def test_not_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "archive.tar"
    path.write_bytes(random.Random(3).randbytes(4096))
    expect_error(path, r"^archive\.tar: not a tar archive$")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "archive.tar"
    path.write_bytes(b"")
    expect_error(path, r"^archive\.tar: empty file, not a tar archive$")


def test_short_garbage(tmp_path: Path) -> None:
    path = tmp_path / "archive.tar"
    path.write_bytes(b"hello")
    expect_error(path, "not a tar archive")


def test_gzipped_tar_gets_a_hint(tmp_path: Path) -> None:
    plain = Legacy().write(tmp_path / "plain.tar")
    path = tmp_path / "archive.tar.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    expect_error(
        path, r"^archive\.tar\.gz: gzip-compressed, not a plain tar archive; .*`gunzip -k archive"
    )


@pytest.mark.parametrize(
    ("compress", "kind", "command"),
    [
        (bz2.compress, "bzip2", "bunzip2"),
        (lzma.compress, "xz", "unxz"),
        (lambda data: b"\x28\xb5\x2f\xfd" + data, "zstd", "unzstd"),
    ],
)
def test_other_compressions_get_a_hint(
    tmp_path: Path, compress: Callable[[bytes], bytes], kind: str, command: str
) -> None:
    plain = Legacy().write(tmp_path / "plain.tar")
    path = tmp_path / "archive.tar.x"
    path.write_bytes(compress(plain.read_bytes()))
    expect_error(path, rf"^archive\.tar\.x: {kind}-compressed, .*`{command} -k")


def test_member_named_like_bzip2_magic_is_not_mistaken(tmp_path: Path) -> None:
    legacy = Legacy()
    path = write_tar(tmp_path / "archive.tar", [Entry("BZh9-notes.txt", b"x"), *legacy.entries()])
    with ImageArchive(path) as archive:
        assert archive.find(None).repo_tags == ("perl:latest",)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    expect_error(tmp_path / "absent.tar", r"^absent\.tar: cannot open")
    (tmp_path / "dir.tar").mkdir()
    expect_error(tmp_path / "dir.tar", r"^dir\.tar: not a regular file$")


def test_truncated_in_the_middle_of_a_layer(tmp_path: Path) -> None:
    big = random.Random(2).randbytes(MIB)
    legacy = Legacy(layers=[LAYER_1, big])
    path = legacy.write(tmp_path / "archive.tar")
    layer = member_info(path, legacy.layer_names[1])
    with path.open("r+b") as f:
        f.truncate(layer.offset_data + 5000)
    expect_error(
        path,
        rf"^archive\.tar: truncated \(member {legacy.layer_names[1]} is 1048576 bytes "
        r"but only 5000 remain\)$",
    )


def test_truncated_between_members(tmp_path: Path) -> None:
    legacy = Legacy()
    path = legacy.write(tmp_path / "archive.tar")
    # Cut right after the first layer's data (inside its padding).
    layer = member_info(path, legacy.layer_names[0])
    with path.open("r+b") as f:
        f.truncate(layer.offset_data + layer.size + 1)
    expect_error(path, r"^archive\.tar: truncated")


def test_truncated_at_a_block_boundary(tmp_path: Path) -> None:
    legacy = Legacy()
    path = legacy.write(tmp_path / "archive.tar")
    # Cut after a whole member: tarfile alone would just see a shorter archive.
    layer = member_info(path, legacy.layer_names[0])
    end = layer.offset_data + -(-layer.size // 512) * 512
    with path.open("r+b") as f:
        f.truncate(end)
    expect_error(path, r"^archive\.tar: truncated \(the file ends after member .*layer\.tar")


def test_corrupt_header_in_the_middle(tmp_path: Path) -> None:
    legacy = Legacy()
    path = legacy.write(tmp_path / "archive.tar")
    info = member_info(path, "manifest.json")
    with path.open("r+b") as f:
        f.seek(info.offset)
        f.write(b"\xff" * 512)
    expect_error(path, r"^archive\.tar: corrupt tar header at offset \d+")


def test_no_manifest(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "archive.tar", [Entry("hello.txt", b"hi")])
    expect_error(path, r"^archive\.tar: no manifest\.json or index\.json")


def test_empty_tar(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "archive.tar", [])
    expect_error(path, "no manifest.json or index.json")


@pytest.mark.parametrize(
    ("manifest", "pattern"),
    [
        (b"[{", r"manifest\.json is not valid JSON"),
        (b"\xff\xfe\x00garbage", r"manifest\.json is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, r"manifest\.json is not valid JSON"),
        (b'{"Config": "x"}', r"manifest\.json is a JSON object, not a list"),
        (b"[42]", r"manifest\.json entry 0 is a JSON number, not an object"),
        (b'[{"Layers": []}]', r'manifest\.json entry 0 has no "Config" string'),
        (b'[{"Config": 7, "Layers": []}]', r'manifest\.json entry 0 has no "Config" string'),
        (b'[{"Config": "c.json"}]', r'manifest\.json entry 0 has no "Layers" list'),
        (
            b'[{"Config": "c.json", "Layers": "a/layer.tar"}]',
            r'manifest\.json entry 0 has no "Layers" list',
        ),
        (b'[{"Config": "c.json", "Layers": [1]}]', r'manifest\.json entry 0 has no "Layers" list'),
        (
            b'[{"Config": "c.json", "Layers": [], "RepoTags": "a:b"}]',
            r'manifest\.json entry 0 has a "RepoTags" that is not',
        ),
        (
            b'[{"Config": "c.json", "Layers": [], "RepoTags": [1]}]',
            r'manifest\.json entry 0 has a "RepoTags" that is not',
        ),
    ],
)
def test_malformed_manifest_json(tmp_path: Path, manifest: bytes, pattern: str) -> None:
    entries = [Entry("c.json", config_bytes([])), Entry("manifest.json", manifest)]
    path = write_tar(tmp_path / "archive.tar", entries)
    expect_error(path, rf"^archive\.tar: {pattern}")


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        (b"{not json", r"config c\.json is not valid JSON"),
        (b"[]", r"config c\.json is not a JSON object"),
        (b'{"os": "linux"}', r"config c\.json has no rootfs\.diff_ids list"),
        (b'{"rootfs": {"type": "layers"}}', r"config c\.json has no rootfs\.diff_ids list"),
        (
            b'{"rootfs": {"diff_ids": ["md5:abc"]}}',
            r"config c\.json: rootfs\.diff_ids\[0\] is 'md5:abc', not sha256:<64 hex digits>",
        ),
        (
            b'{"rootfs": {"diff_ids": ["sha256:' + b"A" * 64 + b'"]}}',
            r"config c\.json: rootfs\.diff_ids\[0\] is 'sha256:A{64}', not sha256",
        ),
    ],
)
def test_malformed_config(tmp_path: Path, config: bytes, pattern: str) -> None:
    manifest = [{"Config": "c.json", "RepoTags": ["a:b"], "Layers": []}]
    entries = [Entry("c.json", config), Entry("manifest.json", json.dumps(manifest).encode())]
    path = write_tar(tmp_path / "archive.tar", entries)
    expect_error(path, rf"^archive\.tar: {pattern}")


def test_manifest_names_a_missing_layer(tmp_path: Path) -> None:
    legacy = Legacy()
    doc = legacy.manifest_doc()
    doc[0]["Layers"][1] = "abc/layer.tar"
    legacy.manifest = doc
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(
        path,
        r"^archive\.tar: manifest names layer abc/layer\.tar, which the archive does not contain$",
    )


def test_manifest_names_a_missing_config(tmp_path: Path) -> None:
    legacy = Legacy()
    legacy.manifest = [{"Config": "gone.json", "RepoTags": [], "Layers": legacy.layer_names}]
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(path, r"manifest names config gone\.json, which the archive does not contain$")


def test_layer_count_differs_from_diff_ids(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1, LAYER_2])
    doc = legacy.manifest_doc()
    doc[0]["Layers"] = doc[0]["Layers"][:1]
    legacy.manifest = doc
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(path, r"image perl:latest lists 1 layers but its config has 2 rootfs\.diff_ids")


@pytest.mark.parametrize(
    ("entry", "pattern"),
    [
        (Entry("../etc/passwd", b"x"), r"member \.\./etc/passwd escapes the archive root"),
        (Entry("a/../../b", b"x"), r"member a/\.\./\.\./b escapes the archive root"),
        (Entry("/etc/passwd", b"x"), r"member /etc/passwd is an absolute path"),
        (sym("evil", "../outside"), r"link evil -> \.\./outside escapes the archive root"),
        (
            sym("a/b/evil", "../../../x"),
            r"link a/b/evil -> \.\./\.\./\.\./x escapes the archive root",
        ),
        (sym("evil", "/etc/passwd"), r"link evil -> /etc/passwd points at an absolute path"),
        (hard("evil", "../x"), r"link evil -> \.\./x escapes the archive root"),
        (hard("evil", "/etc/shadow"), r"link evil -> /etc/shadow points at an absolute path"),
    ],
)
def test_unsafe_member_names_are_refused(tmp_path: Path, entry: Entry, pattern: str) -> None:
    legacy = Legacy(extra=[entry])  # an otherwise valid archive: the member is not even used
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(path, rf"^archive\.tar: {pattern}$")


def test_link_through_symlinked_directory_escaping(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1])
    # "up" is harmless by itself ("." is the root) but "up/../x" climbs above it.
    legacy.extra = [sym("d/up", ".."), sym("layer", "d/up/../../x")]
    legacy.manifest = [{"Config": legacy.config_name, "RepoTags": [], "Layers": ["layer"]}]
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(path, "escapes the archive root")


def test_link_to_a_missing_member(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1])
    legacy.extra = [directory("abc"), sym("abc/layer.tar", "../def/layer.tar")]
    legacy.manifest = [{"Config": legacy.config_name, "RepoTags": [], "Layers": ["abc/layer.tar"]}]
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(
        path,
        r"manifest names layer abc/layer\.tar, a link \(abc/layer\.tar\) to def/layer\.tar, "
        r"which the archive does not contain$",
    )


def test_hardlink_to_a_missing_member(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1])
    legacy.extra = [hard("abc/layer.tar", "def/layer.tar")]
    legacy.manifest = [{"Config": legacy.config_name, "RepoTags": [], "Layers": ["abc/layer.tar"]}]
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(path, r"to def/layer\.tar, which the archive does not contain")


def test_link_cycle(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1])
    legacy.extra = [sym("a/layer.tar", "../b/layer.tar"), sym("b/layer.tar", "../a/layer.tar")]
    legacy.manifest = [{"Config": legacy.config_name, "RepoTags": [], "Layers": ["a/layer.tar"]}]
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(path, r"manifest names layer a/layer\.tar, which is caught in a link cycle")


def test_self_link(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1])
    legacy.extra = [sym("loop", "loop")]
    legacy.manifest = [{"Config": "loop", "RepoTags": [], "Layers": legacy.layer_names}]
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(path, r"manifest names config loop, which is caught in a link cycle")


def test_layer_that_is_a_directory(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1])
    v1 = legacy.layer_names[0].split("/")[0]
    legacy.manifest = [{"Config": legacy.config_name, "RepoTags": [], "Layers": [v1]}]
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(path, rf"manifest names layer {v1}, which is a directory, not a regular file")


def test_config_that_is_a_symlink_to_a_directory(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1])
    v1 = legacy.layer_names[0].split("/")[0]
    legacy.extra = [sym("cfg.json", v1)]
    legacy.manifest = [{"Config": "cfg.json", "RepoTags": [], "Layers": legacy.layer_names}]
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(path, r"config cfg\.json, which is a directory, not a regular file")


def test_manifest_names_an_escaping_path(tmp_path: Path) -> None:
    legacy = Legacy(layers=[LAYER_1])
    legacy.manifest = [{"Config": legacy.config_name, "RepoTags": [], "Layers": ["../x"]}]
    path = legacy.write(tmp_path / "archive.tar")
    expect_error(path, r"manifest names layer \.\./x, which escapes the archive root")


def test_no_images_legacy(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "archive.tar", [Entry("manifest.json", b"[]")])
    expect_error(path, r"^archive\.tar: no images in manifest\.json$")


def test_no_images_oci(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "archive.tar", oci_entries(index_doc(), []))
    expect_error(path, r"^archive\.tar: no images in index\.json$")


def test_json_over_the_size_cap(tmp_path: Path) -> None:
    huge = b"[" + b" " * (16 * MIB) + b"]"
    path = write_tar(tmp_path / "archive.tar", [Entry("manifest.json", huge)])
    expect_error(path, r"manifest\.json is 16777218 bytes, over the 16 MiB limit")


def test_manifest_json_that_is_a_directory(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "archive.tar", [directory("manifest.json")])
    expect_error(path, r"manifest\.json, which is a directory, not a regular file")


# -- refusing bad OCI archives ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "pattern"),
    [
        (b"{", r"index\.json is not valid JSON"),
        (b"[]", r"index\.json is a JSON list, not an object"),
        (b'{"schemaVersion": 2}', r'index\.json has no "manifests" list'),
        (b'{"manifests": {}}', r'index\.json has no "manifests" list'),
        (b'{"manifests": ["x"]}', r"index\.json manifests\[0\] is a JSON string, not a desc"),
        (
            b'{"manifests": [{"digest": "sha256:' + b"a" * 64 + b'", "size": 1}]}',
            r'index\.json manifests\[0\] has no "mediaType" string',
        ),
        (
            b'{"manifests": [{"mediaType": "x", "digest": "sha256:' + b"a" * 64 + b'"}]}',
            r'index\.json manifests\[0\] has no valid "size" \(None\)',
        ),
        (
            b'{"manifests": [{"mediaType": "x", "size": -1, "digest": "sha256:'
            + b"a" * 64
            + b'"}]}',
            r'index\.json manifests\[0\] has no valid "size" \(-1\)',
        ),
        (
            b'{"manifests": [{"mediaType": "x", "size": true, "digest": "sha256:'
            + b"a" * 64
            + b'"}]}',
            r'index\.json manifests\[0\] has no valid "size" \(True\)',
        ),
    ],
)
def test_malformed_index_json(tmp_path: Path, index: bytes, pattern: str) -> None:
    path = write_tar(tmp_path / "archive.tar", oci_entries(index, []))
    expect_error(path, rf"^archive\.tar: {pattern}")


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha512:" + "a" * 128,
        "a" * 64,
        "sha256:" + "g" * 64,
        42,
    ],
)
def test_malformed_digest(tmp_path: Path, digest: Any) -> None:
    image = OciImage()
    entry = image.index_entry()
    entry["digest"] = digest
    path = write_tar(tmp_path / "archive.tar", oci_entries(index_doc(entry), image.blobs()))
    expect_error(path, r"index\.json manifests\[0\] has malformed digest .* \(want sha256:<64")


def test_malformed_layer_digest_in_manifest(tmp_path: Path) -> None:
    image = OciImage()
    doc = image.manifest_doc()
    doc["layers"][0]["digest"] = "sha256:xyz"
    manifest = json.dumps(doc).encode()
    entries = oci_entries(
        index_doc(descriptor(OCI_MANIFEST, manifest)), [manifest, *image.blobs()[1:]]
    )
    path = write_tar(tmp_path / "archive.tar", entries)
    expect_error(path, rf"manifest {sha(manifest)} layers\[0\] has malformed digest 'sha256:xyz'")


def test_index_entry_size_differs_from_member(tmp_path: Path) -> None:
    image = OciImage()
    entry = image.index_entry()
    entry["size"] += 1
    path = write_tar(tmp_path / "archive.tar", oci_entries(index_doc(entry), image.blobs()))
    expect_error(
        path,
        rf"names manifest {sha(image.manifest)}: its descriptor says {len(image.manifest) + 1} "
        rf"bytes but blobs/sha256/{hexof(image.manifest)} is {len(image.manifest)} bytes",
    )


@pytest.mark.parametrize("which", ["config", "layer"])
def test_manifest_descriptor_size_differs_from_member(tmp_path: Path, which: str) -> None:
    image = OciImage()
    doc = image.manifest_doc()
    target = doc["config"] if which == "config" else doc["layers"][1]
    target["size"] -= 3
    manifest = json.dumps(doc).encode()
    entries = oci_entries(
        index_doc(descriptor(OCI_MANIFEST, manifest)), [manifest, *image.blobs()[1:]]
    )
    path = write_tar(tmp_path / "archive.tar", entries)
    expect_error(
        path,
        rf"manifest {sha(manifest)} names {which} {target['digest']}: its descriptor says "
        rf"{target['size']} bytes but .* is {target['size'] + 3} bytes",
    )


def test_unsupported_manifest_media_type(tmp_path: Path) -> None:
    image = OciImage()
    entry = image.index_entry()
    entry["mediaType"] = "application/vnd.oci.artifact.manifest.v1+json"
    path = write_tar(tmp_path / "archive.tar", oci_entries(index_doc(entry), image.blobs()))
    expect_error(
        path,
        r"index\.json manifests\[0\] has unsupported media type "
        r"application/vnd\.oci\.artifact\.manifest\.v1\+json",
    )


def test_manifest_media_type_disagrees_with_descriptor(tmp_path: Path) -> None:
    image = OciImage(manifest_media_type=DOCKER_MANIFEST)
    entry = image.index_entry()
    entry["mediaType"] = OCI_MANIFEST
    path = write_tar(tmp_path / "archive.tar", oci_entries(index_doc(entry), image.blobs()))
    expect_error(
        path, re.escape(f"whose descriptor says {OCI_MANIFEST} but it is {DOCKER_MANIFEST}")
    )


def test_nested_index_with_no_supported_manifest(tmp_path: Path) -> None:
    child = descriptor("application/vnd.example+json", b"{}")
    nested = json.dumps(index_doc(child)).encode()
    top = index_doc(descriptor(OCI_INDEX, nested))
    path = write_tar(tmp_path / "archive.tar", oci_entries(top, [nested, b"{}"]))
    expect_error(path, rf"index {sha(nested)} lists no image manifest of a supported media type")


def test_nested_index_whose_manifests_are_all_absent(tmp_path: Path) -> None:
    image = OciImage()
    nested = json.dumps(index_doc(image.index_entry())).encode()
    top = index_doc(descriptor(OCI_INDEX, nested))
    path = write_tar(tmp_path / "archive.tar", oci_entries(top, [nested]))
    expect_error(path, rf"index {sha(nested)}: none of its manifests is in the archive")


def test_index_names_a_missing_manifest(tmp_path: Path) -> None:
    image = OciImage()
    path = write_tar(
        tmp_path / "archive.tar", oci_entries(index_doc(image.index_entry()), image.blobs()[1:])
    )
    expect_error(
        path,
        rf"index\.json manifests\[0\] names manifest {sha(image.manifest)}, which the archive "
        r"does not contain$",
    )


def test_manifest_names_a_missing_layer_blob(tmp_path: Path) -> None:
    image = OciImage()
    blobs = image.blobs()
    path = write_tar(
        tmp_path / "archive.tar", oci_entries(index_doc(image.index_entry()), blobs[:-1])
    )
    expect_error(
        path,
        rf"manifest {sha(image.manifest)} names layer {sha(blobs[-1])}, which the archive "
        r"does not contain$",
    )


def test_oci_layer_count_differs_from_diff_ids(tmp_path: Path) -> None:
    image = OciImage()
    doc = image.manifest_doc()
    doc["layers"].pop()
    manifest = json.dumps(doc).encode()
    entries = oci_entries(
        index_doc(descriptor(OCI_MANIFEST, manifest, annotations=PERL_ANNOTATIONS)),
        [manifest, *image.blobs()[1:]],
    )
    path = write_tar(tmp_path / "archive.tar", entries)
    expect_error(path, r"image perl:latest lists 1 layers but its config has 2 rootfs\.diff_ids")


def test_oci_blob_that_is_a_directory(tmp_path: Path) -> None:
    image = OciImage()
    blobs = image.blobs()
    entries = oci_entries(index_doc(image.index_entry()), blobs[:-1])
    entries.insert(2, directory(f"blobs/sha256/{hexof(blobs[-1])}"))
    path = write_tar(tmp_path / "archive.tar", entries)
    expect_error(path, r"names layer sha256:[0-9a-f]{64}, which is a directory, not a regular")


def test_oci_blob_content_does_not_match_digest(tmp_path: Path) -> None:
    image = OciImage()
    blobs = image.blobs()
    entries = oci_entries(index_doc(image.index_entry()), blobs)
    config_member = f"blobs/sha256/{hexof(image.config)}"
    tampered = image.config.replace(b"linux", b"LINUX")
    entries = [Entry(e.name, tampered) if e.name == config_member else e for e in entries]
    path = write_tar(tmp_path / "archive.tar", entries)
    expect_error(
        path,
        rf"config {sha(image.config)} does not match its digest \(its content hashes to "
        rf"{sha(tampered)}\)",
    )


def test_oci_manifest_without_layers_list(tmp_path: Path) -> None:
    image = OciImage()
    doc = image.manifest_doc()
    del doc["layers"]
    manifest = json.dumps(doc).encode()
    entries = oci_entries(
        index_doc(descriptor(OCI_MANIFEST, manifest)), [manifest, *image.blobs()[1:]]
    )
    path = write_tar(tmp_path / "archive.tar", entries)
    expect_error(path, rf'manifest {sha(manifest)} has no "layers" list')


def test_oci_manifest_without_config(tmp_path: Path) -> None:
    image = OciImage()
    doc = image.manifest_doc()
    del doc["config"]
    manifest = json.dumps(doc).encode()
    entries = oci_entries(
        index_doc(descriptor(OCI_MANIFEST, manifest)), [manifest, *image.blobs()[1:]]
    )
    path = write_tar(tmp_path / "archive.tar", entries)
    expect_error(path, rf"manifest {sha(manifest)} config is a JSON null, not a descriptor")


def test_broken_index_json_is_not_silently_replaced_by_manifest_json(tmp_path: Path) -> None:
    image = OciImage(layers=[(LAYER_1, OCI_LAYER)])
    manifest_json = [
        {
            "Config": f"blobs/sha256/{hexof(image.config)}",
            "RepoTags": ["perl:latest"],
            "Layers": [f"blobs/sha256/{hexof(LAYER_1)}"],
        }
    ]
    entries = oci_entries(b"{oops", image.blobs(), manifest_json=manifest_json)
    path = write_tar(tmp_path / "archive.tar", entries)
    expect_error(path, r"index\.json is not valid JSON")


def test_archive_image_is_frozen(tmp_path: Path) -> None:
    path = Legacy().write(tmp_path / "archive.tar")
    with ImageArchive(path) as archive:
        image = archive.find(None)
    assert isinstance(image, ArchiveImage)
    with pytest.raises(AttributeError):
        image.repo_tags = ()  # type: ignore[misc]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    expect_error(fifo, r"^pipe\.tar: not a regular file$")
