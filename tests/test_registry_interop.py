"""Real registry clients against a real docket-server: docker push and pull through real
engines, skopeo both ways, containerd's ctr, docker login, the reference registry (Debian's
docker-registry) on the other end of a copy, a multi-platform index, and compressed layers
rolled out and loaded into Docker."""

from __future__ import annotations

import gzip
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agents import StartAgent, wait_for_states
from tests.support.dockerd import DockerEngine
from tests.support.images import ImagePair, write_base_rootfs
from tests.support.oci import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    build_image,
    build_index,
    descriptor,
    sha256,
    tar_of,
    write_oci_layout,
)
from tests.support.registry import ReferenceRegistry, skopeo_ok, tool
from tests.support.server import ServerProcess, docketctl, rollout

pytestmark = pytest.mark.docker

FAST = ["--heartbeat-interval", "0.5", "--hello-timeout", "2"]
PLAIN = "--tls-verify=false"


@pytest.fixture(scope="module")
def docket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("interop") / "server"
    proc = ServerProcess(data_dir=data, extra_args=FAST).start()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def docker(engine: DockerEngine, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["docker", *args],
        env=env or engine.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout


def image_json(server: ServerProcess, name: str) -> dict[str, object]:
    result = docketctl("inspect", name, "-o", "json", server=server)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def pushed_digest(output: str) -> str:
    """The digest `docker push` printed (its last line: "TAG: digest: sha256:… size: N")."""
    for line in reversed(output.splitlines()):
        if "digest: sha256:" in line:
            return line.split("digest: ", 1)[1].split()[0]
    raise AssertionError(f"no digest in:\n{output}")


def test_docker_push_then_a_rollout_to_three_engines_that_run_it(
    docket: ServerProcess,
    docker_engine: DockerEngine,
    test_images: ImagePair,
    agent_engines: list[DockerEngine],
    agents: StartAgent,
) -> None:
    ref = f"{docket.registry}/interop/pushed:1"
    docker(docker_engine, "tag", test_images.app1, ref)
    digest = pushed_digest(docker(docker_engine, "push", ref))
    shown = image_json(docket, "interop/pushed:1")
    assert shown["digest"] == digest  # what docker push printed is what Docket shows
    assert shown["media_type"] == "application/vnd.docker.distribution.manifest.v2+json"
    layers = shown["layers"]
    assert isinstance(layers, list)
    assert all(layer["media_type"].endswith(".tar.gzip") for layer in layers)  # docker gzips

    names = ["push1", "push2", "push3"]
    for name, engine in zip(names, agent_engines, strict=True):
        agents(docket, name, groups=["pushed"], docker_host=engine.host)
    wait_for_states(docket, dict.fromkeys(names, "online"))
    code, _, hosts = rollout(docket, "interop/pushed:1", "--hosts", "pushed")
    assert code == 0, hosts
    for name, engine in zip(names, agent_engines, strict=True):
        assert hosts[name]["state"] == "succeeded"
        out = docker(
            engine, "run", "--rm", "--network", "none", "interop/pushed:1", "ls", "/layers"
        )
        assert out.split() == ["app1-0.bin", "app1-1.bin"]


def test_docketctl_push_then_docker_pull_into_a_fresh_engine(
    docket: ServerProcess, docker_engine: DockerEngine, test_images: ImagePair
) -> None:
    pushed = docketctl(
        "push", test_images.app2, "-o", "json", server=docket, env=docker_engine.env()
    )
    assert pushed.returncode == 0, pushed.stderr
    digest = json.loads(pushed.stdout)["image"]["digest"]
    with DockerEngine() as fresh:
        out = docker(fresh, "pull", f"{docket.registry}/docket-test/app2:1")
        assert f"Digest: {digest}" in out
        listed = docker(
            fresh,
            "run",
            "--rm",
            "--network",
            "none",
            f"{docket.registry}/docket-test/app2:1",
            "ls",
            "/layers",
        )
        assert listed.split() == ["app2-0.bin"]
        by_digest = docker(fresh, "pull", f"{docket.registry}/docket-test/app2@{digest}")
        assert digest in by_digest
    # skopeo reads Docket's own manifest too, and sees its digest.
    inspected = json.loads(
        skopeo_ok("inspect", PLAIN, f"docker://{docket.registry}/docket-test/app2:1")
    )
    assert inspected["Digest"] == digest


def test_skopeo_copies_both_ways_inspects_lists_and_deletes(
    docket: ServerProcess, docker_engine: DockerEngine, test_images: ImagePair, tmp_path: Path
) -> None:
    source = f"docker://{docket.registry}/interop/skopeo:1"
    skopeo_ok(
        "copy",
        "--dest-tls-verify=false",
        "--src-daemon-host",
        docker_engine.host,
        f"docker-daemon:{test_images.base}",
        source,
    )
    inspected = json.loads(skopeo_ok("inspect", PLAIN, source))
    assert inspected["Name"] == f"{docket.registry}/interop/skopeo"
    raw = skopeo_ok("inspect", PLAIN, "--raw", source).encode()
    assert inspected["Digest"] == sha256(raw)
    assert inspected["Digest"] == image_json(docket, "interop/skopeo:1")["digest"]

    out = tmp_path / "copied"
    skopeo_ok("copy", "--src-tls-verify=false", source, f"oci:{out}:x")
    back = f"docker://{docket.registry}/interop/skopeo:2"
    skopeo_ok("copy", "--dest-tls-verify=false", f"oci:{out}:x", back)
    assert json.loads(skopeo_ok("list-tags", PLAIN, f"docker://{docket.registry}/interop/skopeo"))[
        "Tags"
    ] == ["1", "2"]

    skopeo_ok("delete", PLAIN, back)
    assert docketctl("inspect", "interop/skopeo:2", server=docket).returncode == 1
    # The first copy had other bytes (OCI, not Docker schema 2): it stays.
    assert image_json(docket, "interop/skopeo:1")["digest"] == inspected["Digest"]


def test_containerd_pulls_over_tls_with_a_viewer_token(
    tmp_path: Path, docket: ServerProcess, docker_engine: DockerEngine, test_images: ImagePair
) -> None:
    ref = f"{docket.registry}/interop/ctr:1"
    docker(docker_engine, "tag", test_images.app1, ref)
    digest = pushed_digest(docker(docker_engine, "push", ref))
    address = str(docker_engine.dir / "exec" / "containerd" / "containerd.sock")
    ctr = [tool("ctr"), "--address", address, "--namespace", "docket-test"]
    # ctr takes a loopback registry for plain HTTP unless its hosts.toml says https (and which
    # CA to trust), as an operator's /etc/containerd/certs.d would.
    hosts = tmp_path / "certs.d" / docket.registry / "hosts.toml"
    hosts.parent.mkdir(parents=True)
    hosts.write_text(
        f'server = "https://{docket.registry}"\n\n'
        f'[host."https://{docket.registry}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        f'  ca = "{docket.ca_path}"\n'
    )
    pulled = subprocess.run(
        [
            *ctr,
            "images",
            "pull",
            "--hosts-dir",
            str(tmp_path / "certs.d"),
            "--user",
            f"docket:{docket.token('viewer')}",
            ref,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert pulled.returncode == 0, pulled.stderr
    listed = subprocess.run(
        [*ctr, "images", "ls"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert ref in listed
    assert digest in listed


def test_docker_login_with_a_token(
    tmp_path: Path, docket: ServerProcess, docker_engine: DockerEngine, test_images: ImagePair
) -> None:
    env = docker_engine.env() | {"DOCKER_CONFIG": str(tmp_path / "docker-config")}

    def run(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", *args], input=token, env=env, capture_output=True, text=True, check=False
        )

    def login(token: str) -> subprocess.CompletedProcess[str]:
        return run("login", docket.registry, "-u", "docket", "--password-stdin", token=token)

    ref = f"{docket.registry}/interop/login:1"
    docker(docker_engine, "tag", test_images.base, ref)
    refused = run("push", ref)
    assert refused.returncode != 0
    assert "no basic auth credentials" in refused.stderr or "unauthorized" in refused.stderr
    assert login("dkt_000000000000_not-a-token-at-all-not-one").returncode != 0
    viewer = login(docket.token("viewer"))
    assert viewer.returncode == 0, viewer.stderr
    denied = run("push", ref)  # a viewer reads, and may not push
    assert denied.returncode != 0
    assert "denied" in denied.stderr.lower(), denied.stderr
    publisher = login(docket.token("publisher", "--description", "CI"))
    assert publisher.returncode == 0, publisher.stderr
    assert "Login Succeeded" in publisher.stdout
    docker(docker_engine, "push", ref, env=env)
    assert image_json(docket, "interop/login:1")["name"] == "interop/login:1"


def test_copies_to_and_from_the_reference_registry_keep_their_digests(
    tmp_path: Path, docket: ServerProcess, docker_engine: DockerEngine, test_images: ImagePair
) -> None:
    reference = ReferenceRegistry(tmp_path / "reference")
    reference.start()
    try:
        # An image that starts in the reference registry (docker push, Docker schema 2)...
        there = f"{reference.address}/interop/sync:1"
        docker(docker_engine, "tag", test_images.app1, there)
        digest = pushed_digest(docker(docker_engine, "push", there))
        skopeo_ok(
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"docker://{there}",
            f"docker://{docket.registry}/interop/sync:1",
        )
        assert image_json(docket, "interop/sync:1")["digest"] == digest
        # ...and one that starts in Docket, synced to the reference registry. (docker push
        # gzips layers; an image pushed with docketctl has uncompressed layers, which skopeo
        # compresses on the way to any registry, so its copy would have other digests.)
        here = f"{docket.registry}/interop/mirror/app2:1"
        docker(docker_engine, "tag", test_images.app2, here)
        ours = pushed_digest(docker(docker_engine, "push", here))
        skopeo_ok(
            "sync",
            "--src",
            "docker",
            "--dest",
            "docker",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"{docket.registry}/interop/mirror/app2",
            f"{reference.address}/mirror",
        )
        theirs = json.loads(
            skopeo_ok("inspect", PLAIN, f"docker://{reference.address}/mirror/app2:1")
        )["Digest"]
        assert theirs == ours
        back = json.loads(
            skopeo_ok("inspect", PLAIN, f"docker://{docket.registry}/interop/sync:1")
        )["Digest"]
        assert back == digest
    finally:
        reference.stop()


def busybox_layer(tmp_path: Path) -> bytes:
    path = tmp_path / "rootfs.tar"
    write_base_rootfs(path)
    return path.read_bytes()


def test_a_multi_platform_index_pushed_with_skopeo_and_rolled_out_per_platform(
    tmp_path: Path,
    docket: ServerProcess,
    agent_engines: list[DockerEngine],
    agents: StartAgent,
) -> None:
    rootfs = busybox_layer(tmp_path)
    amd = build_image([rootfs, tar_of({"platform": b"amd64\n"})], architecture="amd64")
    arm = build_image(
        [rootfs, tar_of({"platform": b"arm64\n"})], architecture="arm64", variant="v8"
    )
    index = build_index([(amd, "amd64", ""), (arm, "arm64", "v8")])
    layout = tmp_path / "layout"
    top = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                descriptor(OCI_INDEX, index, annotations={"org.opencontainers.image.ref.name": "1"})
            ],
        }
    ).encode()
    write_oci_layout(layout, top, [index, amd.manifest, arm.manifest, *amd.blobs, *arm.blobs])
    target = f"docker://{docket.registry}/interop/multi:1"
    skopeo_ok("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:1", target)

    # skopeo writes the index (and its manifests) afresh as it copies: what it pushed is
    # what Docket stores and gives back, to the byte.
    raw = skopeo_ok("inspect", PLAIN, "--raw", target).encode()
    assert json.loads(raw)["mediaType"] == OCI_INDEX
    shown = image_json(docket, "interop/multi:1")
    assert shown["digest"] == sha256(raw)
    assert shown["media_type"] == OCI_INDEX
    manifests = shown["manifests"]
    assert isinstance(manifests, list)
    assert [m["platform"] for m in manifests] == ["linux/amd64", "linux/arm64/v8"]
    back = tmp_path / "back"
    skopeo_ok("copy", "--all", "--src-tls-verify=false", target, f"oci:{back}:1")
    copied = json.loads((back / "index.json").read_text())["manifests"][0]
    assert copied["digest"] == sha256(raw)
    pulled = (back / "blobs" / "sha256" / sha256(raw).split(":")[1]).read_bytes()
    assert pulled == raw
    amd_layer = manifests[0]["layers"][1]["digest"]  # (skopeo may recompress layers)
    arm_layer = manifests[1]["layers"][1]["digest"]

    agents(docket, "multi-amd", groups=["multi"], docker_host=agent_engines[0].host)
    agents(docket, "multi-arm", groups=["multi"], extra_args=["--platform", "linux/arm64"])
    agents(docket, "multi-s390x", groups=["multi"], extra_args=["--platform", "linux/s390x"])
    wait_for_states(docket, {"multi-amd": "online", "multi-arm": "online", "multi-s390x": "online"})
    code, _, hosts = rollout(docket, "interop/multi:1", "--hosts", "multi", "--max-failures", "2")
    assert code == 3  # one host has no image for its platform
    assert hosts["multi-amd"]["state"] == "succeeded"
    # Without Docker the arm64 host stops at downloaded, with the arm64 image's blobs.
    assert hosts["multi-arm"]["error"].startswith("downloaded, but not loaded")
    assert "has no image for linux/s390x" in hosts["multi-s390x"]["error"]
    assert hosts["multi-amd"]["image_digest"] == manifests[0]["digest"]
    assert hosts["multi-arm"]["image_digest"] == manifests[1]["digest"]
    assert hosts["multi-arm"]["platform"] == "linux/arm64/v8"
    cache = tmp_path / "multi-arm" / "blobs" / "sha256"
    assert (cache / arm_layer.split(":")[1][:2] / arm_layer.split(":")[1]).is_file()
    assert not (cache / amd_layer.split(":")[1][:2] / amd_layer.split(":")[1]).exists()
    out = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "interop/multi:1", "cat", "/platform"],
        env=agent_engines[0].env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "amd64\n"


def test_gzip_and_zstd_layers_go_through_a_rollout_into_docker(
    tmp_path: Path,
    docket: ServerProcess,
    agent_engines: list[DockerEngine],
    agents: StartAgent,
) -> None:
    rootfs = gzip.compress(busybox_layer(tmp_path), mtime=0)
    plain_zstd = tar_of({"zstd.txt": b"from a zstd layer\n"})
    zstd = subprocess.run(
        [tool("zstd"), "-q", "-c"], input=plain_zstd, capture_output=True, check=True
    ).stdout
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {
                "type": "layers",
                "diff_ids": [sha256(gzip.decompress(rootfs)), sha256(plain_zstd)],
            },
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor(OCI_CONFIG, config),
            "layers": [
                descriptor(OCI_LAYER + "+gzip", rootfs),
                descriptor(OCI_LAYER + "+zstd", zstd),
            ],
        }
    ).encode()
    client = docket.registry_client()
    for blob in (config, rootfs, zstd):
        assert client.push_blob("interop/zstd", blob).status_code == 201
    assert client.put_manifest("interop/zstd", "1", manifest).status_code == 201

    agents(docket, "zstd1", groups=["zstd"], docker_host=agent_engines[1].host)
    wait_for_states(docket, {"zstd1": "online"})
    code, _, hosts = rollout(docket, "interop/zstd:1", "--hosts", "zstd")
    assert code == 0, hosts
    out = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "interop/zstd:1", "cat", "/zstd.txt"],
        env=agent_engines[1].env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "from a zstd layer\n"
