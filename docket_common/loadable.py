"""Rebuild a ``docker load``-able archive from an image's blobs on disk, and stream it.

An agent keeps an image as one file per blob: the config (JSON) and the layers (tars, maybe
gzip-compressed). :func:`archive_chunks` turns them into the legacy ``docker save`` layout
that every engine since Docker 1.10 accepts::

    <confighex>.json            the config, byte for byte
    <layerhex>/                 one directory per distinct layer blob
    <layerhex>/layer.tar        the layer file as it is (docker load decompresses gzip itself;
                                zstd only since Docker 23: for older engines a zstd layer is
                                sent decompressed, see ``expand_zstd``)
    manifest.json               [{"Config": ..., "RepoTags": [name], "Layers": [...]}]

No ``repositories`` file: an engine reads it only when there is no ``manifest.json``.

The archive is generated on the fly: tar headers are made with :class:`tarfile.TarInfo`,
file bodies are read from disk ``chunk_size`` bytes at a time, so neither the image nor one
layer is ever held in memory, and :func:`load_into_docker` sends it to the engine as a
chunked request body without writing a copy to disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import secrets
import socket
import stat
import tarfile
import threading
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import docker

_log = structlog.get_logger()

__all__ = [
    "LoadError",
    "LoadableImage",
    "PendingBlob",
    "archive_chunks",
    "archive_size",
    "import_layer",
    "load_importing_base",
    "load_into_docker",
    "write_archive",
]

_BLOCK = 512
_END_OF_ARCHIVE = bytes(2 * _BLOCK)
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class LoadableImage:
    """An image held as blob files, ready to be turned into a ``docker load`` archive."""

    name: str  # "repo:tag", becomes the RepoTags entry; "repo@sha256:…" loads it untagged
    config_path: Path
    config_digest: str  # "sha256:<hex>"
    layer_paths: tuple[Path, ...]  # base first
    layer_digests: tuple[str, ...]  # "sha256:<hex>" of each layer file's bytes (may be compressed)
    # Send zstd-compressed layers as plain tars, for engines before Docker 23 (which read
    # gzip in `docker load`, but not zstd).
    expand_zstd: bool = False
    # Blobs still arriving, by digest: their size, and their bytes in order as they are
    # verified (``pending[d].body(chunk_size)``), read while the archive is sent instead of
    # from the path. Such a blob is taken as it is (not expanded from zstd).
    pending: Mapping[str, PendingBlob] = field(default_factory=dict, compare=False, hash=False)
    # Layers the engine holds by the time it reads manifest.json (imported while the archive
    # is sent: see load_importing_base): their layer.tar is left out, the manifest still names
    # it, and the engine, which finds the layer, never opens it.
    registered: frozenset[str] = frozenset()
    # Called (in the sending thread) before manifest.json goes out; raises OSError, which
    # ends the archive unfinished, when the ``registered`` layers are not in the engine.
    before_manifest: Callable[[], None] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"image name {self.name!r} is not a repo:tag reference")
        for digest in (self.config_digest, *self.layer_digests):
            # The digests name tar members: anything else could point outside the archive.
            if not _DIGEST_RE.fullmatch(digest):
                raise ValueError(f"{digest!r} is not a digest (want sha256:<64 hex digits>)")
        if len(self.layer_paths) != len(self.layer_digests):
            raise ValueError(
                f"{self.name}: {len(self.layer_paths)} layer paths but "
                f"{len(self.layer_digests)} layer digests"
            )


@dataclass(frozen=True)
class PendingBlob:
    """A blob of a :class:`LoadableImage` not yet on disk: its size and a reader of its bytes
    (which raises OSError when they cannot come, or failed their digest)."""

    size: int
    body: Callable[[int], Iterator[bytes]]


class LoadError(Exception):
    """The engine refused the image or could not be reached; str() is one line a user can act on."""


class _LayerFailed(LoadError):
    """A layer's bytes could not come, or failed their digest, while they were sent."""


class _ImportFailed(OSError):
    """The base layer did not go in by import: the archive that left it out stops."""


# Engines (by socket) that loaded the whole archive where the base layer by import failed
# (an engine with containerd's image store, say, needs every layer's file): they get the
# whole archive from then on.
_NO_IMPORT: set[str] = set()


@dataclass(frozen=True)
class _Member:
    """One tar member: its header, and its body from a file (``path``) or from ``data``."""

    header: bytes
    size: int
    path: Path | None = None
    data: bytes = b""
    zstd: bool = False  # the body is the file, decompressed
    pending: PendingBlob | None = None  # the body comes from here, as it arrives
    before: Callable[[], None] | None = None  # called before the member goes out

    @property
    def length(self) -> int:
        """Bytes this member takes in the archive: header, body and padding."""
        return len(self.header) + _padded(self.size)


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _header(name: str, size: int, *, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = size
    info.mtime = 0  # deterministic: the same blobs always give the same archive
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    # PAX: sizes of 8 GiB and more go into an extended header that Go's archive/tar reads.
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _file_size(path: Path) -> int:
    st = path.stat()  # FileNotFoundError for a missing blob, with the path in it
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path} is not a regular file")
    return st.st_size


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _plan(image: LoadableImage) -> list[_Member]:
    """The archive's members, in order; stats every blob file (so a missing one fails here)."""
    config_name = f"{_hex(image.config_digest)}.json"
    pending = image.pending.get(image.config_digest)
    if pending is not None:
        members = [_Member(_header(config_name, pending.size), pending.size, pending=pending)]
    else:
        config_size = _file_size(image.config_path)
        members = [_Member(_header(config_name, config_size), config_size, image.config_path)]
    layer_names: list[str] = []
    written: set[str] = set()
    for path, digest in zip(image.layer_paths, image.layer_digests, strict=True):
        directory = _hex(digest)
        name = f"{directory}/layer.tar"
        layer_names.append(name)
        pending = image.pending.get(digest)
        if digest in image.registered:
            continue
        if digest in written:
            if pending is None:
                _file_size(path)  # still a blob the image names: it must be there
            continue
        written.add(digest)
        if pending is not None:
            members.append(_Member(_header(f"{directory}/", 0, directory=True), 0))
            members.append(_Member(_header(name, pending.size), pending.size, pending=pending))
            continue
        size = _file_size(path)
        expand = image.expand_zstd and _is_zstd(path)
        if expand:
            size = _zstd_size(path)
        members.append(_Member(_header(f"{directory}/", 0, directory=True), 0))
        members.append(_Member(_header(name, size), size, path, zstd=expand))
    tags = [] if "@" in image.name else [image.name]  # engines tag no digest references
    manifest = [{"Config": config_name, "RepoTags": tags, "Layers": layer_names}]
    data = json.dumps(manifest, separators=(",", ":")).encode()
    members.append(
        _Member(
            _header("manifest.json", len(data)),
            len(data),
            data=data,
            before=image.before_manifest,
        )
    )
    return members


def archive_size(image: LoadableImage) -> int:
    """Exact byte count of the archive :func:`archive_chunks` yields for ``image``."""
    return sum(member.length for member in _plan(image)) + len(_END_OF_ARCHIVE)


def archive_chunks(image: LoadableImage, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The ``docker load`` archive of ``image``, in chunks: each tar header, padding and
    the end-of-archive marker on their own, blob files in pieces of at most ``chunk_size``.

    Every blob file is checked (stat) when this is called, so a missing one raises
    :class:`OSError` (e.g. :class:`FileNotFoundError`) at once; the files are read only
    while the chunks are consumed. A file that changes size in between raises
    :class:`OSError` from the iterator. Together the chunks are :func:`archive_size` bytes.
    """
    return _chunks(image, chunk_size)


def _chunks(image: LoadableImage, chunk_size: int) -> Generator[bytes, None, None]:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    return _generate(_plan(image), chunk_size)


def _generate(members: list[_Member], chunk_size: int) -> Generator[bytes, None, None]:
    for member in members:
        if member.before is not None:
            member.before()
        yield member.header
        if member.pending is not None:
            yield from _pending_body(member.pending, member.size, chunk_size)
        elif member.path is not None and member.zstd:
            yield from _zstd_body(member.path, member.size, chunk_size)
        elif member.path is not None:
            yield from _file_body(member.path, member.size, chunk_size)
        elif member.data:
            yield member.data
        pad = _padded(member.size) - member.size
        if pad:
            yield bytes(pad)
    yield _END_OF_ARCHIVE


def _file_body(path: Path, size: int, chunk_size: int) -> Generator[bytes, None, None]:
    with path.open("rb", buffering=0) as file:
        now = os.fstat(file.fileno()).st_size
        if now != size:
            raise OSError(f"{path} changed size while the archive was made ({size} -> {now} bytes)")
        left = size
        while left > 0:
            chunk = file.read(min(chunk_size, left))
            if not chunk:
                raise OSError(
                    f"{path} shrank while being read (ended after {size - left} of {size} bytes)"
                )
            left -= len(chunk)
            yield chunk


def _pending_body(pending: PendingBlob, size: int, chunk_size: int) -> Iterator[bytes]:
    left = size
    for chunk in pending.body(chunk_size):
        left -= len(chunk)
        if left < 0:
            raise OSError(f"a blob of {size} bytes came with more")
        yield chunk
    if left:
        raise OSError(f"a blob of {size} bytes ended after {size - left}")


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _is_zstd(path: Path) -> bool:
    """Whether a layer file is zstd-compressed (its magic number); a peek, not a read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, 4, 0) == _ZSTD_MAGIC
    finally:
        os.close(fd)


def _zstd_size(path: Path) -> int:
    """The decompressed size of a zstd file: one pass of decompression (about 1 GB/s on
    these machines), as frames need not say it."""
    import zstandard

    total = 0
    with path.open("rb") as file, zstandard.ZstdDecompressor().stream_reader(file) as reader:
        while chunk := reader.read(1 << 20):
            total += len(chunk)
    return total


def _zstd_body(path: Path, size: int, chunk_size: int) -> Generator[bytes, None, None]:
    import zstandard

    with path.open("rb") as file, zstandard.ZstdDecompressor().stream_reader(file) as reader:
        left = size
        while chunk := reader.read(chunk_size):
            left -= len(chunk)
            if left < 0:
                raise OSError(f"{path} changed while the archive was made: it grew")
            yield chunk
        if left:
            raise OSError(f"{path} changed while the archive was made: it shrank")


def engine_reads_zstd(version: dict[str, object]) -> bool:
    """Whether an engine (its `docker version` answer) takes zstd layers in `docker load`:
    Docker 23 (API 1.42) and later do."""
    try:
        major, minor = (int(p) for p in str(version.get("ApiVersion", "0.0")).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (1, 42)


def write_archive(image: LoadableImage, dest: Path) -> None:
    """Write the archive of :func:`archive_chunks` to ``dest``, through a temporary file in
    the same directory that is renamed into place once complete."""
    chunks = _chunks(image, 1 << 20)
    try:
        temp, file = _create_temp(dest)
    except BaseException:
        chunks.close()
        raise
    try:
        with file, contextlib.closing(chunks):
            for chunk in chunks:
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        temp.replace(dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _create_temp(dest: Path) -> tuple[Path, io.BufferedWriter]:
    for _attempt in range(100):
        temp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return temp, open(fd, "wb")  # noqa: PTH123 - a descriptor, not a path
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
    raise FileExistsError(f"could not create a temporary file next to {dest}")


# -- loading into an engine ------------------------------------------------------------------


class _Body:
    """The request body: the archive's chunks, remembering whether sending started and
    whether reading a blob failed (the HTTP stack reports that as a broken connection)."""

    def __init__(self, chunks: Generator[bytes, None, None]) -> None:
        self._chunks = chunks
        self.started = False
        self.error: OSError | None = None

    def __iter__(self) -> Iterator[bytes]:
        self.started = True
        try:
            yield from self._chunks
        except OSError as e:
            self.error = e
            raise

    def close(self) -> None:
        self._chunks.close()


def load_into_docker(client: docker.DockerClient, image: LoadableImage) -> str:
    """Stream ``image``'s archive into the engine behind ``client`` (``docker load``) and
    return the id the engine gives it (``sha256:…``, the config digest).

    The archive goes out as a chunked request body, generated while it is sent. Raises
    :class:`LoadError` if a blob file is missing (before anything is sent), if the engine
    cannot be reached or refuses the image (its message is in the error), or if the engine
    does not then know ``image.name`` as the image with ``image.config_digest``.
    The client's timeout applies to each read from the engine.
    """
    # Imported here: importing docker is slow, and most users of this module never load.
    import docker.errors
    import requests.exceptions
    import urllib3.exceptions

    engine = _engine_label(client)
    try:
        _plan(image)  # every blob file is there, before the engine is asked anything
        zstd = not image.expand_zstd and any(
            _is_zstd(p)
            for p, d in set(zip(image.layer_paths, image.layer_digests, strict=True))
            if d not in image.pending
        )
    except OSError as e:
        raise LoadError(f"cannot load {image.name}: {_os_reason(e)}") from e
    if zstd:
        try:
            if not engine_reads_zstd(client.version()):
                image = dataclasses.replace(image, expand_zstd=True)
        except (OSError, docker.errors.DockerException) as e:
            raise LoadError(
                f"cannot reach the Docker engine at {engine} ({_reason(e)}); is dockerd "
                "running, and is DOCKER_HOST right?"
            ) from e
    try:
        body = _Body(_chunks(image, 1 << 20))
    except OSError as e:
        raise LoadError(f"cannot load {image.name}: {_os_reason(e)}") from e
    try:
        refusal = _send(client, body)
    except docker.errors.APIError as e:  # an HTTP error status
        raise LoadError(
            f"the Docker engine at {engine} refused {image.name}: {_one_line(e.explanation or e)}"
        ) from e
    except (
        # requests' errors are OSErrors too; the reply is read from urllib3 directly.
        OSError,
        urllib3.exceptions.HTTPError,
        docker.errors.DockerException,
    ) as e:
        _close_leaked_sockets(e)
        if isinstance(body.error, _ImportFailed):
            raise LoadError(f"cannot load {image.name}: {body.error}") from body.error
        if body.error is not None:
            raise _LayerFailed(
                f"cannot load {image.name}: {_os_reason(body.error)}"
            ) from body.error
        timeouts = (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)
        if isinstance(e, timeouts):
            raise LoadError(
                f"the Docker engine at {engine} did not answer in time while loading "
                f"{image.name} ({_reason(e)}); try a longer client timeout"
            ) from e
        if body.started:
            raise LoadError(
                f"the connection to the Docker engine at {engine} broke while loading "
                f"{image.name} ({_reason(e)}); see the engine's log"
            ) from e
        raise LoadError(
            f"cannot reach the Docker engine at {engine} ({_reason(e)}); is dockerd running, "
            "and is DOCKER_HOST right?"
        ) from e
    finally:
        body.close()
    if refusal is not None:
        raise LoadError(f"the Docker engine at {engine} refused {image.name}: {refusal}")
    return _check_loaded(client, image, engine)


def _send(client: docker.DockerClient, body: _Body) -> str | None:
    """POSTs the archive; returns the engine's error message, or None if it took the image.

    The engine's reply is read to its end even after an error, so the connection is
    released rather than left open.
    """
    messages = client.api.load_image(body, quiet=False)
    refusal: str | None = None
    try:
        for message in messages:
            if refusal is None:
                refusal = _error_of(message)
    finally:
        messages.close()
    return refusal


def _error_of(message: Any) -> str | None:
    if not isinstance(message, dict):
        return None
    detail = message.get("errorDetail")
    text = detail.get("message") if isinstance(detail, dict) else None
    if not text:
        text = message.get("error")
    if not text:
        return None
    return _one_line(text)


def _check_loaded(client: docker.DockerClient, image: LoadableImage, engine: str) -> str:
    import docker.errors
    import requests.exceptions

    try:
        loaded = client.images.get(image.config_digest if "@" in image.name else image.name)
    except docker.errors.ImageNotFound as e:
        raise LoadError(
            f"the Docker engine at {engine} accepted {image.name} but does not list it "
            "afterwards; see the engine's log"
        ) from e
    except (requests.exceptions.RequestException, docker.errors.DockerException) as e:
        raise LoadError(
            f"the Docker engine at {engine} loaded {image.name} but could not be asked about "
            f"it afterwards ({_reason(e)})"
        ) from e
    image_id = loaded.id
    if not isinstance(image_id, str) or image_id != image.config_digest:
        raise LoadError(
            f"after loading, {image.name} in the Docker engine at {engine} is image {image_id}, "
            f"not {image.config_digest}; was it re-tagged meanwhile?"
        )
    return image_id


def import_layer(client: docker.DockerClient, name: str, layer: PendingBlob) -> str:
    """Streams a base layer's bytes into the engine as they arrive (``docker import``): the
    engine unpacks and registers the layer while it reads them, so it holds the layer as
    soon as the last byte is in. Returns the id of the untagged image the import makes (its
    config is the engine's, not the image's: only the layer is of use). LoadError otherwise.
    ``name`` is the image the layer is for, for messages."""
    import docker.errors
    import requests.exceptions
    import urllib3.exceptions

    engine = _engine_label(client)
    body = _Body(chunk for chunk in _pending_body(layer, layer.size, 1 << 20))
    try:
        reply = client.api.import_image_from_stream(body)
    except docker.errors.APIError as e:
        raise LoadError(
            f"the Docker engine at {engine} refused the base layer of {name}: "
            f"{_one_line(e.explanation or e)}"
        ) from e
    except (
        OSError,
        urllib3.exceptions.HTTPError,
        requests.exceptions.RequestException,
        docker.errors.DockerException,
    ) as e:
        _close_leaked_sockets(e)
        if body.error is not None:
            raise _LayerFailed(f"cannot load {name}: {_os_reason(body.error)}") from body.error
        raise LoadError(
            f"the connection to the Docker engine at {engine} broke while importing the base "
            f"layer of {name} ({_reason(e)})"
        ) from e
    finally:
        body.close()
    image_id = None
    for line in str(reply).splitlines():
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            refusal = _error_of(message)
            if refusal is not None:
                raise LoadError(
                    f"the Docker engine at {engine} refused the base layer of {name}: {refusal}"
                )
            status = message.get("status") if isinstance(message, dict) else None
            if isinstance(status, str) and _DIGEST_RE.fullmatch(status):
                image_id = status
    if image_id is None:
        raise LoadError(
            f"the Docker engine at {engine} imported the base layer of {name} but named no "
            f"image for it: {_one_line(reply)}"
        )
    return image_id


def load_importing_base(client: docker.DockerClient, image: LoadableImage) -> str:
    """load_into_docker, with the base layer imported while it arrives rather than sent in
    the archive, when it is still arriving (``image.pending``).

    ``docker load`` registers a layer only once it has the whole archive: for a large layer
    that is most of the time past the last piece. ``docker import`` registers one while it
    reads it, but only a base layer (it makes an image of that layer alone). So the base
    layer goes in by import, the rest of the image by the archive, at the same time; the
    archive's manifest.json, which the engine reads only at the end, waits for the import.
    The engine then finds the base layer (by its chain id, which for a base layer is its
    diff id) and does not look for its file. The import's own image is removed afterwards,
    whatever happened: the layer stays as the loaded image's. When the import fails, or the
    engine does not load the archive without the layer (unless a layer's bytes failed),
    the whole archive is sent again, as load_into_docker does; if that loads, this engine
    gets the whole archive from then on. A base layer the image uses again higher up is
    sent in the archive (there it needs its file)."""
    base = image.layer_digests[0] if image.layer_digests else None
    layer = image.pending.get(base) if base is not None else None
    engine = _engine_label(client)
    if (
        base is None
        or layer is None
        or base in image.registered
        or base in image.layer_digests[1:]  # there, on other layers, it needs its file
        or engine in _NO_IMPORT
    ):
        return load_into_docker(client, image)
    imported: list[str] = []
    failed: list[LoadError] = []
    done = threading.Event()

    def run_import() -> None:
        try:
            imported.append(import_layer(client, image.name, layer))
        except LoadError as e:
            failed.append(e)
        except Exception as e:  # a bug: the load says so, not this thread
            failed.append(LoadError(f"cannot import the base layer of {image.name}: {e!r}"))
        finally:
            done.set()

    def base_in() -> None:
        done.wait()
        if failed:
            raise _ImportFailed(str(failed[0]))

    thread = threading.Thread(target=run_import, name="docker-import", daemon=True)
    thread.start()
    try:
        try:
            return load_into_docker(
                client,
                dataclasses.replace(image, registered=frozenset({base}), before_manifest=base_in),
            )
        except _LayerFailed:
            raise  # a layer's bytes failed: so would a second try
        except LoadError as e:
            thread.join()
            if failed and isinstance(failed[0], _LayerFailed):
                raise failed[0] from None
            why = failed[0] if failed else e
        # The engine did not take the base layer by import, or not the archive without it.
        _log.warning(
            "the base layer did not go in by import: loading the whole archive",
            image=image.name,
            engine=engine,
            error=str(why),
        )
        image_id = load_into_docker(client, image)
        _NO_IMPORT.add(engine)  # the whole archive does, where the import did not
        return image_id
    finally:
        thread.join()
        for image_id in imported:
            _remove_imported(client, image_id)


def _remove_imported(client: docker.DockerClient, image_id: str) -> None:
    """Removes the untagged image a base layer's import made (its layer stays while a loaded
    image holds it); a failure only leaves that image behind, and is logged."""
    import docker.errors
    import requests.exceptions

    try:
        client.api.remove_image(image_id)
    except docker.errors.ImageNotFound:
        pass
    except (requests.exceptions.RequestException, docker.errors.DockerException, OSError) as e:
        _log.warning("cannot remove the image of an imported layer", image=image_id, error=str(e))


def _close_leaked_sockets(error: BaseException) -> None:
    """Closes sockets that a failed connect left open.

    docker's unix-socket transport (7.x) does not close its socket when ``connect()`` fails,
    so each failed attempt would leave one for the garbage collector (with a ResourceWarning).
    The socket is still reachable from the traceback, as that frame's local ``sock``.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        tb = item.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_name == "connect":
                sock = frame.f_locals.get("sock")
                if isinstance(sock, socket.socket):
                    sock.close()
            tb = tb.tb_next
        pending.extend(e for e in (item.__cause__, item.__context__) if e is not None)
        pending.extend(arg for arg in item.args if isinstance(arg, BaseException))


def _engine_label(client: docker.DockerClient) -> str:
    """Where the engine is, for messages: the unix socket's path if it is one."""
    api = getattr(client, "api", None)
    adapter = getattr(api, "_custom_adapter", None)
    socket_path = getattr(adapter, "socket_path", None)
    if isinstance(socket_path, str) and socket_path:
        return f"unix://{socket_path}"
    return str(getattr(api, "base_url", "(unknown)"))


def _one_line(text: object) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _os_reason(error: OSError) -> str:
    if error.strerror and error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    return _one_line(error)


def _reason(error: BaseException) -> str:
    """The innermost OSError's text if there is one (e.g. "No such file or directory"),
    else the error's own message."""
    seen: set[int] = set()
    pending: list[object] = [error]
    while pending:
        item = pending.pop(0)
        if id(item) in seen or not isinstance(item, BaseException):
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.strerror:
            return item.strerror
        pending.extend(item.args)
        pending.extend(e for e in (item.__cause__, item.__context__) if e is not None)
        reason = getattr(item, "reason", None)
        if reason is not None:
            pending.append(reason)
    return _one_line(error)


def _from_env(action: Callable[[docker.DockerClient], str]) -> str:
    """Runs ``action`` with a client of the engine at DOCKER_HOST, closed afterwards."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=600)
    except DockerException as e:
        raise LoadError(f"cannot reach the Docker engine (DOCKER_HOST): {e}") from e
    try:
        return action(client)
    finally:
        client.close()


def load_from_env(image: LoadableImage, *, import_base: bool = False) -> str:
    """load_into_docker (or load_importing_base) into the engine at DOCKER_HOST (blocking:
    run it in a thread)."""
    if import_base:
        return _from_env(lambda client: load_importing_base(client, image))
    return _from_env(lambda client: load_into_docker(client, image))


class PullCancel:
    """Ends an engine's pull under way, from any thread: it shuts the pull's HTTP connection
    to the engine, and dockerd, seeing its client gone, cancels the pull and releases what
    it had (rather than retry a blob broken off, 5 s and 15 s on, for an order that failed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: Any = None
        self.cancelled = False

    def attach(self, sock: Any) -> None:
        with self._lock:
            self._socket = getattr(sock, "_sock", sock)  # a SocketIO's socket
            if self.cancelled:
                self._shut()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            self._shut()

    def _shut(self) -> None:
        if self._socket is None:
            return
        with contextlib.suppress(OSError, AttributeError):
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes the thread reading the progress


def pull_into_docker(
    client: docker.DockerClient,
    source: str,
    name: str,
    config_digest: str,
    cancel: PullCancel | None = None,
) -> str:
    """Has the engine pull ``source`` ("host:port/repo@sha256:…", a registry on loopback:
    the agent's own registry face) and tag it ``name``; the source reference is removed
    again. Returns the image id, which must be ``config_digest``. LoadError otherwise, and
    when ``cancel`` ends the pull."""
    import docker.errors
    import requests.exceptions

    engine = _engine_label(client)
    repository, _, digest = source.partition("@")
    try:
        refusal: str | None = None
        # client.api.pull, but with its connection at hand for ``cancel``.
        response = client.api._post(
            client.api._url("/images/create"),
            params={"fromImage": repository, "tag": digest},
            stream=True,
            timeout=None,
        )
        if cancel is not None:
            cancel.attach(client.api._get_raw_response_socket(response))  # raises for status
        else:
            client.api._raise_for_status(response)
        try:
            for message in client.api._stream_helper(response, decode=True):
                refusal = refusal or _error_of(message)
        except (OSError, requests.exceptions.RequestException, ValueError):
            if cancel is None or not cancel.cancelled:
                raise
        if cancel is not None and cancel.cancelled:
            raise LoadError(
                f"the pull of {source} into the Docker engine at {engine} was cancelled"
            )
        if refusal is not None:
            raise LoadError(f"the Docker engine at {engine} could not pull {source}: {refusal}")
        pulled = client.images.get(source)
        if pulled.id != config_digest:
            raise LoadError(
                f"the Docker engine at {engine} pulled {source} as image {pulled.id}, "
                f"not {config_digest}"
            )
        repo, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
        if not client.api.tag(pulled.id, repo, tag or "latest"):
            raise LoadError(f"the Docker engine at {engine} did not tag {pulled.id} as {name}")
        client.api.remove_image(source)  # the name stays; only the face's reference goes
    except docker.errors.APIError as e:
        raise LoadError(
            f"the Docker engine at {engine} refused to pull {source}: "
            f"{_one_line(e.explanation or e)}"
        ) from e
    except (OSError, requests.exceptions.RequestException, docker.errors.DockerException) as e:
        raise LoadError(
            f"cannot pull {source} into the Docker engine at {engine}: {_reason(e)}"
        ) from e
    return config_digest


def pull_from_env(
    source: str, name: str, config_digest: str, cancel: PullCancel | None = None
) -> str:
    """pull_into_docker into the engine at DOCKER_HOST (blocking: run it in a thread)."""
    return _from_env(lambda client: pull_into_docker(client, source, name, config_digest, cancel))
