"""Which way the agent puts an image into the engine (docket_agent.agent.pull_source): the
rule of --load-via auto and --pull-below, and where the engine pulls from; and what
pull_into_docker asks of the engine after the pull (a fake engine: the real one is in
tests/test_pull.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from docket_agent.agent import PULL_BELOW, pull_source
from docket_common.loadable import LoadError, pull_into_docker
from docket_common.pb import agent_pb2

MiB = 1 << 20
DIGEST = "sha256:" + "ab" * 32
GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def order(*layers: tuple[int, str], name: str = "team/app:1") -> agent_pb2.PullOrder:
    return agent_pb2.PullOrder(
        order_id="o1",
        image_name=name,
        image_digest=DIGEST,
        config=agent_pb2.OrderBlob(digest="sha256:" + "cd" * 32, size_bytes=1000),
        layers=[
            agent_pb2.OrderBlob(digest=f"sha256:{i:064x}", size_bytes=size, media_type=kind)
            for i, (size, kind) in enumerate(layers)
        ],
    )


def test_auto_pulls_an_image_under_the_threshold_from_the_face_on_loopback() -> None:
    small = order((3 * MiB, GZIP), (MiB, GZIP))
    assert pull_source(small, "auto", PULL_BELOW, "127.0.0.1:5001", 5001) == (
        f"127.0.0.1:5001/team/app@{DIGEST}"
    )
    # The port is the one the face listens on (port 0 in the flag: any free one).
    assert pull_source(small, "auto", PULL_BELOW, "0.0.0.0:0", 40123) == (
        f"127.0.0.1:40123/team/app@{DIGEST}"
    )
    assert pull_source(small, "auto", PULL_BELOW, "[::1]:5001", 5001) == (
        f"[::1]:5001/team/app@{DIGEST}"
    )
    # A name with a registry port and a digest reference: the repository is what is left.
    named = order((MiB, GZIP), name=f"reg.example:5000/team/app@{DIGEST}")
    assert pull_source(named, "auto", PULL_BELOW, "127.0.0.1:5001", 5001) == (
        f"127.0.0.1:5001/reg.example:5000/team/app@{DIGEST}"
    )


@pytest.mark.parametrize(
    ("layers", "pull_below"),
    [
        ([(8 * MiB - 500, GZIP)], PULL_BELOW),  # with the config (1000 bytes), past 8 MiB
        ([(7 * MiB, GZIP), (MiB, GZIP)], PULL_BELOW),
        ([(MiB, GZIP)], 0),  # 0: never
        ([(MiB, GZIP)], MiB),  # the image (layer and config) is over 1 MiB
        ([(MiB, ZSTD)], PULL_BELOW),  # engines before Docker 23 cannot pull zstd
    ],
)
def test_auto_loads_large_and_zstd_images_by_import(
    layers: list[tuple[int, str]], pull_below: int
) -> None:
    assert pull_source(order(*layers), "auto", pull_below, "127.0.0.1:5001", 5001) is None


def test_auto_loads_by_import_when_the_engine_cannot_pull_from_the_face() -> None:
    small = order((MiB, GZIP))
    assert pull_source(small, "auto", PULL_BELOW, None, 0) is None  # the face is off
    # Plain HTTP to an address past loopback: dockerd refuses it unless told otherwise.
    assert pull_source(small, "auto", PULL_BELOW, "10.1.2.3:5001", 5001) is None
    # Told to, it pulls from there whatever the size.
    large = order((64 * MiB, GZIP))
    assert pull_source(large, "registry", PULL_BELOW, "10.1.2.3:5001", 5001) == (
        f"10.1.2.3:5001/team/app@{DIGEST}"
    )


@pytest.mark.parametrize("load_via", ["import", "archive"])
def test_import_and_archive_never_pull(load_via: str) -> None:
    assert pull_source(order((MiB, GZIP)), load_via, PULL_BELOW, "127.0.0.1:5001", 5001) is None


class FakeEngineAPI:
    """The calls pull_into_docker makes of docker-py's APIClient, answered from memory."""

    base_url = "http+docker://fake"

    def __init__(self, images: dict[str, str], messages: list[dict[str, object]]) -> None:
        self.images = images  # reference -> image id: what the engine holds after the pull
        self.messages = messages
        self.pulled: dict[str, object] = {}
        self.tagged: list[tuple[str, str, str]] = []
        self.removed: list[str] = []

    def _url(self, path: str) -> str:
        return path

    def _post(self, url: str, params: dict[str, object], **_kwargs: object) -> object:
        self.pulled = {"url": url, **params}
        return object()

    def _raise_for_status(self, _response: object) -> None:
        pass

    def _stream_helper(self, _response: object, decode: bool) -> Iterator[dict[str, object]]:
        assert decode
        yield from self.messages

    def tag(self, image: str, repository: str, tag: str) -> bool:
        self.tagged.append((image, repository, tag))
        return True

    def remove_image(self, reference: str) -> None:
        self.removed.append(reference)


@dataclass
class FakeImage:
    id: str


class FakeImages:
    def __init__(self, api: FakeEngineAPI) -> None:
        self.api = api

    def get(self, reference: str) -> FakeImage:
        import docker.errors

        if reference not in self.api.images:
            raise docker.errors.ImageNotFound(f"No such image: {reference}")
        return FakeImage(self.api.images[reference])


class FakeEngine:
    def __init__(self, api: FakeEngineAPI) -> None:
        self.api = api
        self.images = FakeImages(api)


CONFIG = "sha256:" + "cd" * 32
SOURCE = f"127.0.0.1:5001/team/app@{DIGEST}"


def pull(api: FakeEngineAPI, name: str = "team/app:1") -> str:
    return pull_into_docker(FakeEngine(api), SOURCE, name, CONFIG)


@pytest.mark.parametrize(
    ("name", "repository", "tag"),
    [("team/app:1", "team/app", "1"), ("localhost:5000/app", "localhost:5000/app", "latest")],
)
def test_a_pull_by_digest_is_tagged_with_the_name_and_the_face_reference_removed(
    name: str, repository: str, tag: str
) -> None:
    api = FakeEngineAPI({SOURCE: CONFIG}, [{"status": "Pulling"}, {"status": "Digest: x"}])
    assert pull(api, name) == CONFIG
    assert api.pulled == {
        "url": "/images/create",
        "fromImage": "127.0.0.1:5001/team/app",
        "tag": DIGEST,
    }
    assert api.tagged == [(CONFIG, repository, tag)]
    assert api.removed == [SOURCE]


def test_a_pull_that_gave_another_image_id_is_a_load_error_and_tags_nothing() -> None:
    other = "sha256:" + "ef" * 32
    api = FakeEngineAPI({SOURCE: other}, [{"status": "Digest: x"}])
    with pytest.raises(
        LoadError, match=re.escape(f"pulled {SOURCE} as image {other}, not {CONFIG}")
    ):
        pull(api)
    assert api.tagged == []


def test_an_error_in_the_pull_stream_is_a_load_error_and_tags_nothing() -> None:
    api = FakeEngineAPI({}, [{"status": "Pulling"}, {"error": "manifest unknown"}])
    with pytest.raises(LoadError, match=r"could not pull .*: manifest unknown"):
        pull(api)
    assert api.tagged == []
    assert api.removed == []
