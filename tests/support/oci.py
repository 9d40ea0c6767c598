"""Talking the registry protocol by hand in tests: blobs, manifests and indexes built from
bytes, pushed with plain HTTP requests, and OCI layouts on disk for skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ALL_MANIFEST_TYPES = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
TIMEOUT = 60


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class BuiltImage:
    """An image as bytes: its blobs (config first), and its manifest."""

    config: bytes
    layers: list[bytes]
    manifest: bytes
    media_type: str = OCI_MANIFEST

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def blobs(self) -> list[bytes]:
        return [self.config, *self.layers]


def build_image(
    layers: list[bytes],
    *,
    architecture: str = "amd64",
    variant: str = "",
    media_type: str = OCI_MANIFEST,
    indent: int | None = None,
    compress: bool = False,
) -> BuiltImage:
    """An image of tar layers, gzip-compressed with ``compress`` (as registries mostly hold
    them, and as skopeo copies without recompressing); ``indent`` makes the manifest's JSON
    unlike the compact form Docket writes itself (to show it is kept byte for byte)."""
    config_doc: dict[str, Any] = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(x) for x in layers]},
    }
    if compress:
        layers = [gzip.compress(x, mtime=0) for x in layers]
    if variant:
        config_doc["variant"] = variant
    config = json.dumps(config_doc).encode()
    docker = media_type == DOCKER_MANIFEST
    layer_type = "application/vnd.docker.image.rootfs.diff.tar" if docker else OCI_LAYER
    if compress:
        layer_type = (
            "application/vnd.docker.image.rootfs.diff.tar.gzip" if docker else OCI_LAYER_GZIP
        )
    config_type = "application/vnd.docker.container.image.v1+json" if docker else OCI_CONFIG
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": descriptor(config_type, config),
            "layers": [descriptor(layer_type, x) for x in layers],
        },
        indent=indent,
    ).encode()
    return BuiltImage(config, layers, manifest, media_type)


def build_index(images: list[tuple[BuiltImage, str, str]], media_type: str = OCI_INDEX) -> bytes:
    """An index of (image, architecture, variant) entries, all linux."""
    entries = []
    for image, architecture, variant in images:
        platform = {"architecture": architecture, "os": "linux"}
        if variant:
            platform["variant"] = variant
        entries.append(descriptor(image.media_type, image.manifest, platform=platform))
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}).encode()


class RegistryClient:
    """The registry protocol over requests, without the conveniences of a real client: every
    call returns the response as it is."""

    def __init__(
        self, base_url: str, auth: tuple[str, str] | None = None, verify: bool | str = True
    ) -> None:
        self.base = base_url.rstrip("/")
        self.http = requests.Session()
        self.http.verify = verify  # a CA file for the server's own certificates
        if auth is not None:
            self.http.auth = auth

    def url(self, path: str) -> str:
        return self.base + path if path.startswith("/") else f"{self.base}/{path}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT)
        kwargs.setdefault("allow_redirects", False)
        # Explicitly: a session's own verify loses to $REQUESTS_CA_BUNDLE otherwise.
        kwargs.setdefault("verify", self.http.verify)
        return self.http.request(method, self.url(path), **kwargs)

    def push_blob(self, repository: str, data: bytes) -> requests.Response:
        """POST then PUT ?digest= with the bytes: the monolithic upload."""
        started = self.request("POST", f"/v2/{repository}/blobs/uploads/")
        assert started.status_code == 202, started.text
        return self.request(
            "PUT",
            started.headers["Location"],
            params={"digest": sha256(data)},
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    def put_manifest(
        self, repository: str, reference: str, manifest: bytes, media_type: str = OCI_MANIFEST
    ) -> requests.Response:
        return self.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            data=manifest,
            headers={"Content-Type": media_type},
        )

    def push_image(self, repository: str, tag: str, image: BuiltImage) -> requests.Response:
        for blob in image.blobs:
            assert self.push_blob(repository, blob).status_code == 201
        return self.put_manifest(repository, tag, image.manifest, image.media_type)

    def get_manifest(
        self, repository: str, reference: str, accept: str = ALL_MANIFEST_TYPES
    ) -> requests.Response:
        return self.request(
            "GET", f"/v2/{repository}/manifests/{reference}", headers={"Accept": accept}
        )


def error_code(response: requests.Response) -> str:
    """The first error code of a spec error body (and checks it is one)."""
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.text
    body = response.json()
    assert isinstance(body.get("errors"), list), body
    assert body["errors"], body
    first = body["errors"][0]
    assert set(first) >= {"code", "message"}, first
    return str(first["code"])


def write_oci_layout(path: Path, index: bytes, blobs: list[bytes]) -> None:
    """An OCI image layout directory (what `skopeo copy oci:DIR` reads): ``index.json`` is
    ``index`` as given; every blob (and manifest) under ``blobs/sha256``."""
    (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_bytes(index)
    for data in blobs:
        (path / "blobs" / "sha256" / sha256(data).split(":", 1)[1]).write_bytes(data)


def expect_error(response: requests.Response, status: int, code: str) -> None:
    assert (response.status_code, error_code(response)) == (status, code), response.text
