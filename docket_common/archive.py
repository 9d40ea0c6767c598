"""Read ``docker save`` tarballs without holding an image, or even one layer, in memory.

Two layouts are understood:

* legacy (Docker < 25): ``manifest.json`` naming ``<id>.json`` configs and ``<v1id>/layer.tar``
  layers, which are uncompressed and addressed by the config's ``rootfs.diff_ids``;
* OCI (Docker >= 25, skopeo, buildx): ``index.json`` and ``blobs/sha256/<hex>``. Docker >= 25
  also writes a ``manifest.json``; ``index.json`` wins because it carries media types.

Opening an archive reads only the tar headers and the small JSON documents (capped at
16 MiB each); layers are streamed later through :meth:`ImageArchive.open_blob`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import posixpath
import re
import stat
import tarfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Self

from docket_common.manifest import (
    DOCKER_MANIFEST,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
)
from docket_common.timefmt import parse_rfc3339

if TYPE_CHECKING:
    from types import TracebackType

    from _typeshed import WriteableBuffer

__all__ = ["ArchiveBlob", "ArchiveError", "ArchiveImage", "ImageArchive"]

_MIB = 1024 * 1024
_JSON_LIMIT = 16 * _MIB
_MAX_LINK_HOPS = 40
_MAX_INDEX_DEPTH = 4
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")

_MANIFEST_TYPES = frozenset(IMAGE_MANIFEST_TYPES)
_INDEX_TYPES = frozenset(INDEX_TYPES)

_IMAGE_NAME = "io.containerd.image.name"
_REF_NAME = "org.opencontainers.image.ref.name"
_DOCKER_PREFIXES = ("docker.io/library/", "docker.io/")

# (magic, format, command that undoes it)
_COMPRESSION_MAGIC = (
    (re.compile(rb"\x1f\x8b"), "gzip", "gunzip"),
    (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd", "unzstd"),
    (re.compile(rb"\xfd7zXZ\x00"), "xz", "unxz"),
    (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2", "bunzip2"),
)

# platform.machine() -> (GOARCH, variant), the names image platforms use.
_GO_ARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


class ArchiveError(Exception):
    """The archive cannot be used. ``str(e)`` is one line a user can act on, prefixed with the
    archive's file name, e.g. ``archive.tar: no manifest.json or index.json``."""


@dataclass(frozen=True)
class ArchiveBlob:
    """One blob (config or layer) stored as a regular tar member."""

    digest: str  # "sha256:<64 hex>"
    size: int
    media_type: str
    member: str  # the tar member holding the bytes, after resolving links


@dataclass(frozen=True)
class ArchiveImage:
    """One image in the archive."""

    config: ArchiveBlob
    layers: tuple[ArchiveBlob, ...]  # base first
    diff_ids: tuple[str, ...]  # the config's rootfs.diff_ids
    repo_tags: tuple[str, ...]  # e.g. ("perl:latest",); empty if untagged
    created: datetime | None  # tz-aware UTC
    platform: str  # "os/architecture[/variant]", "" if the config does not say
    layout: Literal["legacy", "oci"]


@dataclass(frozen=True)
class _Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None
    annotations: dict[str, str]

    @property
    def member(self) -> str:
        return "blobs/sha256/" + self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class _Config:
    digest: str
    diff_ids: tuple[str, ...]
    created: datetime | None
    platform: str


class ImageArchive:
    """A ``docker save`` archive, opened on a path to a seekable, uncompressed tar file.

    Opening scans the member headers once (tarfile seeks over member data, so this is cheap
    even for multi-GB archives), validates them and parses the manifests; any problem raises
    :class:`ArchiveError`. Use as a context manager, or call :meth:`close`.
    """

    images: tuple[ArchiveImage, ...]

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._label = self._path.name or str(path)
        self._closed = False
        self._file = self._open_file()
        try:
            self._size = self._file_size()
            self._members = self._scan()
            self.images = self._parse()
        except BaseException:
            self._file.close()
            raise

    # -- public API ------------------------------------------------------------------------

    def find(self, repo_tag: str | None) -> ArchiveImage:
        """The image tagged ``repo_tag`` ("perl" means "perl:latest"; a config digest also
        works), or with ``None`` the archive's only image."""
        if repo_tag is None:
            if len(self.images) == 1:
                return self.images[0]
            raise self._error(
                f"holds {len(self.images)} images ({self._describe_all()}); name one of them"
            )
        wanted = _normalize_tag(repo_tag)
        for image in self.images:
            if repo_tag == image.config.digest or wanted in map(_normalize_tag, image.repo_tags):
                return image
        raise self._error(f"has no image tagged {repo_tag} (it holds {self._describe_all()})")

    def open_blob(self, blob: ArchiveBlob) -> BinaryIO:
        """A streaming, seekable file object over ``blob``'s bytes; close it when done.

        Reading past the end of a file that has been truncated raises :class:`ArchiveError`.
        Each returned object has its own file descriptor, so several may be read at once,
        from different threads, and they stay usable after :meth:`close`.
        """
        if self._closed:
            raise ValueError("I/O operation on a closed ImageArchive")
        info = self._members.get(blob.member)
        if info is None or not _is_regular(info) or info.size != blob.size:
            raise self._error(f"{blob.member} is not a {blob.size}-byte blob in this archive")
        if hasattr(os, "pread"):
            handle = io.FileIO(os.dup(self._file.fileno()), "rb")
        else:  # pragma: no cover - no positional reads: a private handle keeps its own offset
            handle = io.FileIO(self._path, "rb")
        raw = _BlobReader(handle, info.offset_data, info.size, self._label, blob.member)
        return io.BufferedReader(raw, buffer_size=64 * 1024)

    def close(self) -> None:
        """Release the archive's file handle. Blob readers already open keep working."""
        if not self._closed:
            self._closed = True
            self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageArchive({str(self._path)!r}, images={len(getattr(self, 'images', ()))})"

    # -- scanning the tar --------------------------------------------------------------------

    def _error(self, message: str) -> ArchiveError:
        return ArchiveError(f"{self._label}: {message}")

    def _open_file(self) -> io.FileIO:
        try:
            # Checked before opening: opening a FIFO for reading would block.
            if not stat.S_ISREG(self._path.stat().st_mode):
                raise self._error("not a regular file")
            return io.FileIO(self._path, "rb")
        except OSError as e:
            raise self._error(f"cannot open: {e.strerror or e}") from e

    def _file_size(self) -> int:
        st = os.fstat(self._file.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise self._error("not a regular file")
        return st.st_size

    def _open_tar(self) -> tarfile.TarFile:
        try:
            return tarfile.open(fileobj=self._file, mode="r:")
        except (tarfile.TarError, ValueError, OverflowError) as e:
            raise self._error("not a tar archive") from e

    def _scan(self) -> dict[str, tarfile.TarInfo]:
        """Reads every member header; returns members by normalized name (later ones win)."""
        head = _read_at(self._file, 0, 512)
        if not head:
            raise self._error("empty file, not a tar archive")
        for magic, kind, command in _COMPRESSION_MAGIC:
            if magic.match(head):
                raise self._error(
                    f"{kind}-compressed, not a plain tar archive; decompress it first "
                    f"(e.g. `{command} -k {self._label}`) or pipe `docker save` straight to a file"
                )
        members: dict[str, tarfile.TarInfo] = {}
        last = ""
        with self._open_tar() as tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, ValueError, OverflowError) as e:
                    raise self._broken_at(tar.offset, last, str(e)) from e
                if info is None:
                    break
                self._check_extent(info)
                members[self._check_names(info)] = info
                last = info.name
            self._check_end(tar.offset, last)
        return members

    def _check_extent(self, info: tarfile.TarInfo) -> None:
        """A member whose data runs past the end of the file means a truncated archive."""
        if info.issparse() or not (info.isreg() or info.type not in tarfile.SUPPORTED_TYPES):
            return
        remain = max(0, self._size - info.offset_data)
        if info.size > remain:
            raise self._error(
                f"truncated (member {info.name} is {info.size} bytes but only {remain} remain)"
            )

    def _check_end(self, offset: int, last: str) -> None:
        """tarfile stops quietly at a cut or corrupt header; the end-of-archive block tells."""
        block = _read_at(self._file, offset, 512)
        if len(block) < 512:
            after = f"after member {last} " if last else ""
            raise self._error(f"truncated (the file ends {after}without an end-of-archive marker)")
        if block.count(0) != len(block):
            raise self._broken_at(offset, last, "bad header checksum")

    def _broken_at(self, offset: int, last: str, detail: str) -> ArchiveError:
        if offset + 512 > self._size:
            after = f" after member {last}" if last else ""
            return self._error(f"truncated (the file ends{after} in the middle of a tar block)")
        after = f", after member {last}" if last else ""
        return self._error(f"corrupt tar header at offset {offset}{after} ({detail})")

    def _check_names(self, info: tarfile.TarInfo) -> str:
        """Refuses absolute or escaping member names and link targets; returns the name
        normalized ("./a//b" -> "a/b")."""
        name = self._clean(info.name, f"member {info.name}")
        if info.issym() or info.islnk():
            what = f"link {info.name} -> {info.linkname}"
            if info.linkname.startswith("/"):
                raise self._error(f"{what} points at an absolute path")
            base = posixpath.dirname(name) if info.issym() else ""
            self._clean(posixpath.join(base, info.linkname), what)
        return name

    def _clean(self, name: str, what: str) -> str:
        if name.startswith("/"):
            raise self._error(f"{what} is an absolute path")
        normal = posixpath.normpath(name) if name else "."
        if normal == ".." or normal.startswith("../"):
            raise self._error(f"{what} escapes the archive root")
        return normal

    def _resolve(self, name: str, ref: str) -> tuple[str, tarfile.TarInfo]:
        """Follows symlinks and hard links (also in directory components) to a member.

        ``ref`` says who asked, for messages: "manifest names layer abc/layer.tar".
        """
        if name.startswith("/"):
            raise self._error(f"{ref}, which is an absolute path")
        pending = name.split("/")
        done: list[str] = []
        hops = 0
        link = ""
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not done:
                    raise self._error(f"{ref}, which escapes the archive root")
                done.pop()
                continue
            path = "/".join([*done, part])
            info = self._members.get(path)
            if info is not None and (info.issym() or info.islnk()):
                hops += 1
                if hops > _MAX_LINK_HOPS:
                    raise self._error(f"{ref}, which is caught in a link cycle at {path}")
                if info.linkname.startswith("/"):
                    raise self._error(f"{ref}, which links to absolute path {info.linkname}")
                link = path
                if info.islnk():  # hard link targets are relative to the archive root
                    done = []
                pending = info.linkname.split("/") + pending
                continue
            done.append(part)
        final = "/".join(done)
        info = self._members.get(final)
        if info is None:
            if link:
                raise self._error(
                    f"{ref}, a link ({link}) to {final or '.'}, which the archive does not contain"
                )
            raise self._error(f"{ref}, which the archive does not contain")
        return final, info

    def _regular(self, name: str, ref: str) -> tuple[str, tarfile.TarInfo]:
        final, info = self._resolve(name, ref)
        if not _is_regular(info):
            raise self._error(f"{ref}, which is a {_kind(info)}, not a regular file")
        return final, info

    def _exists(self, name: str) -> bool:
        try:
            self._regular(name, name)
        except ArchiveError:
            return False
        return True

    def _read_small(self, info: tarfile.TarInfo, what: str) -> bytes:
        if info.size > _JSON_LIMIT:
            raise self._error(
                f"{what} is {info.size} bytes, over the {_JSON_LIMIT // _MIB} MiB limit "
                "for a JSON document"
            )
        data = _read_at(self._file, info.offset_data, info.size)
        if len(data) != info.size:
            raise self._error(
                f"truncated (member {info.name} is {info.size} bytes but only {len(data)} remain)"
            )
        return data

    def _json(self, data: bytes, what: str) -> Any:
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise self._error(f"{what} is not valid JSON ({detail})") from e

    # -- manifests ---------------------------------------------------------------------------

    def _parse(self) -> tuple[ArchiveImage, ...]:
        if "index.json" in self._members:
            images, source = self._parse_oci(), "index.json"
        elif "manifest.json" in self._members:
            images, source = self._parse_legacy(), "manifest.json"
        else:
            raise self._error(
                "no manifest.json or index.json; is this the output of `docker save`?"
            )
        if not images:
            raise self._error(f"no images in {source}")
        return images

    def _config(self, info: tarfile.TarInfo, what: str, digest: str | None) -> _Config:
        """Reads and parses an image config; checks its digest when one is given."""
        data = self._read_small(info, what)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and actual != digest:
            raise self._error(f"{what} does not match its digest (its content hashes to {actual})")
        doc = self._json(data, what)
        if not isinstance(doc, dict):
            raise self._error(f"{what} is not a JSON object")
        rootfs = doc.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list):
            raise self._error(f"{what} has no rootfs.diff_ids list")
        for i, diff_id in enumerate(diff_ids):
            if not isinstance(diff_id, str) or not _DIGEST_RE.fullmatch(diff_id):
                raise self._error(
                    f"{what}: rootfs.diff_ids[{i}] is {diff_id!r}, not sha256:<64 hex digits>"
                )
        os_name, arch, variant = doc.get("os"), doc.get("architecture"), doc.get("variant")
        plat = ""
        if isinstance(os_name, str) and isinstance(arch, str) and os_name and arch:
            plat = f"{os_name}/{arch}"
            if isinstance(variant, str) and variant:
                plat += f"/{variant}"
        return _Config(actual, tuple(diff_ids), parse_rfc3339(doc.get("created")), plat)

    def _parse_legacy(self) -> tuple[ArchiveImage, ...]:
        _, info = self._regular("manifest.json", "manifest.json")
        doc = self._json(self._read_small(info, "manifest.json"), "manifest.json")
        if not isinstance(doc, list):
            raise self._error(f"manifest.json is a JSON {_json_type(doc)}, not a list of images")
        images = []
        for i, entry in enumerate(doc):
            where = f"manifest.json entry {i}"
            if not isinstance(entry, dict):
                raise self._error(f"{where} is a JSON {_json_type(entry)}, not an object")
            config_name = entry.get("Config")
            if not isinstance(config_name, str) or not config_name:
                raise self._error(f'{where} has no "Config" string')
            layer_names = entry.get("Layers")
            if not isinstance(layer_names, list) or not all(
                isinstance(n, str) and n for n in layer_names
            ):
                raise self._error(f'{where} has no "Layers" list of member names')
            tags = entry.get("RepoTags")
            if tags is None:
                tags = []
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise self._error(f'{where} has a "RepoTags" that is not a list of strings')

            config_member, config_info = self._regular(
                config_name, f"manifest names config {config_name}"
            )
            config = self._config(config_info, f"config {config_name}", None)
            label = tags[0] if tags else config.digest
            if len(layer_names) != len(config.diff_ids):
                raise self._error(
                    f"image {label} lists {len(layer_names)} layers but its config has "
                    f"{len(config.diff_ids)} rootfs.diff_ids"
                )
            layers = []
            for layer_name, diff_id in zip(layer_names, config.diff_ids, strict=True):
                member, layer_info = self._regular(layer_name, f"manifest names layer {layer_name}")
                # Content-addressed names (Docker >= 25) tell whether the bytes really are the
                # uncompressed layer the diff_id describes.
                parts = member.split("/")
                if (
                    len(parts) == 3
                    and parts[:2] == ["blobs", "sha256"]
                    and _DIGEST_RE.fullmatch("sha256:" + parts[2])
                    and parts[2] != diff_id.split(":", 1)[1]
                ):
                    raise self._error(
                        f"image {label}: layer {layer_name} is blob sha256:{parts[2]}, not the "
                        f"uncompressed layer {diff_id} its config lists"
                    )
                layers.append(ArchiveBlob(diff_id, layer_info.size, OCI_LAYER, member))
            images.append(
                ArchiveImage(
                    config=ArchiveBlob(config.digest, config_info.size, OCI_CONFIG, config_member),
                    layers=tuple(layers),
                    diff_ids=config.diff_ids,
                    repo_tags=tuple(tags),
                    created=config.created,
                    platform=config.platform,
                    layout="legacy",
                )
            )
        return tuple(images)

    def _parse_oci(self) -> tuple[ArchiveImage, ...]:
        _, info = self._regular("index.json", "index.json")
        doc = self._json(self._read_small(info, "index.json"), "index.json")
        entries = self._descriptors(doc, "manifests", "index.json")
        images: dict[str, ArchiveImage] = {}  # by manifest digest: Docker repeats one per tag
        for i, entry in enumerate(entries):
            tags = _tags_from_annotations(entry.annotations)
            seen = images.get(entry.digest)
            if seen is not None:
                merged = seen.repo_tags + tuple(t for t in tags if t not in seen.repo_tags)
                images[entry.digest] = _replace_tags(seen, merged)
                continue
            images[entry.digest] = self._oci_image(
                entry, f"index.json manifests[{i}]", tags, depth=0
            )
        return tuple(images.values())

    def _descriptors(self, doc: Any, key: str, what: str) -> list[_Descriptor]:
        if not isinstance(doc, dict):
            raise self._error(f"{what} is a JSON {_json_type(doc)}, not an object")
        items = doc.get(key)
        if not isinstance(items, list):
            raise self._error(f'{what} has no "{key}" list')
        return [self._descriptor(item, f"{what} {key}[{i}]") for i, item in enumerate(items)]

    def _descriptor(self, item: Any, where: str) -> _Descriptor:
        if not isinstance(item, dict):
            raise self._error(f"{where} is a JSON {_json_type(item)}, not a descriptor object")
        media_type, digest, size = item.get("mediaType"), item.get("digest"), item.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise self._error(f'{where} has no "mediaType" string')
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise self._error(
                f"{where} has malformed digest {digest!r} (want sha256:<64 lowercase hex digits>)"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise self._error(f'{where} has no valid "size" ({size!r})')
        plat = item.get("platform")
        annotations = item.get("annotations")
        return _Descriptor(
            media_type=media_type,
            digest=digest,
            size=size,
            platform=plat if isinstance(plat, dict) else None,
            annotations={
                k: v
                for k, v in (annotations.items() if isinstance(annotations, dict) else ())
                if isinstance(k, str) and isinstance(v, str)
            },
        )

    def _blob(self, desc: _Descriptor, ref: str) -> tuple[str, tarfile.TarInfo]:
        """The member holding ``desc``'s bytes; its size must match the descriptor's."""
        member, info = self._regular(desc.member, ref)
        if info.size != desc.size:
            raise self._error(
                f"{ref}: its descriptor says {desc.size} bytes but {member} is {info.size} bytes"
            )
        return member, info

    def _json_blob(self, desc: _Descriptor, ref: str) -> Any:
        _, info = self._blob(desc, ref)
        data = self._read_small(info, ref)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != desc.digest:
            raise self._error(f"{ref} does not match its digest (its content hashes to {actual})")
        return self._json(data, ref)

    def _oci_image(
        self, desc: _Descriptor, where: str, tags: tuple[str, ...], depth: int
    ) -> ArchiveImage:
        if desc.media_type in _INDEX_TYPES:
            if depth >= _MAX_INDEX_DEPTH:
                raise self._error(f"{where}: image indexes nested more than {depth} deep")
            ref = f"{where} names index {desc.digest}"
            doc = self._json_blob(desc, ref)
            self._check_media_type(doc, desc, ref)
            children = self._descriptors(doc, "manifests", f"index {desc.digest}")
            child, i = self._choose(children, f"index {desc.digest}")
            return self._oci_image(child, f"index {desc.digest} manifests[{i}]", tags, depth + 1)
        if desc.media_type not in _MANIFEST_TYPES:
            raise self._error(
                f"{where} has unsupported media type {desc.media_type} (want an image manifest: "
                f"{OCI_MANIFEST} or {DOCKER_MANIFEST}, or an image index)"
            )
        ref = f"{where} names manifest {desc.digest}"
        doc = self._json_blob(desc, ref)
        what = f"manifest {desc.digest}"
        if not isinstance(doc, dict):
            raise self._error(f"{what} is a JSON {_json_type(doc)}, not an object")
        self._check_media_type(doc, desc, ref)
        config_desc = self._descriptor(doc.get("config"), f"{what} config")
        layer_descs = self._descriptors(doc, "layers", what)
        config_member, config_info = self._blob(
            config_desc, f"{what} names config {config_desc.digest}"
        )
        config = self._config(config_info, f"config {config_desc.digest}", config_desc.digest)
        label = tags[0] if tags else desc.digest
        if len(layer_descs) != len(config.diff_ids):
            raise self._error(
                f"image {label} lists {len(layer_descs)} layers but its config has "
                f"{len(config.diff_ids)} rootfs.diff_ids"
            )
        layers = []
        for layer in layer_descs:
            member, info = self._blob(layer, f"{what} names layer {layer.digest}")
            layers.append(ArchiveBlob(layer.digest, info.size, layer.media_type, member))
        return ArchiveImage(
            config=ArchiveBlob(
                config_desc.digest, config_info.size, config_desc.media_type, config_member
            ),
            layers=tuple(layers),
            diff_ids=config.diff_ids,
            repo_tags=tags,
            created=config.created,
            platform=config.platform,
            layout="oci",
        )

    def _check_media_type(self, doc: Any, desc: _Descriptor, ref: str) -> None:
        inner = doc.get("mediaType") if isinstance(doc, dict) else None
        if isinstance(inner, str) and inner != desc.media_type:
            raise self._error(f"{ref}, whose descriptor says {desc.media_type} but it is {inner}")

    def _choose(self, children: list[_Descriptor], what: str) -> tuple[_Descriptor, int]:
        """Picks from a nested index: the host platform's manifest if the entries say their
        platform, else the first; entries whose blobs are absent (or attestations) never."""
        usable = [
            (i, d)
            for i, d in enumerate(children)
            if (d.media_type in _MANIFEST_TYPES or d.media_type in _INDEX_TYPES)
            and not _is_attestation(d)
        ]
        present = [(i, d) for i, d in usable if self._exists(d.member)]
        if not present:
            if not usable:
                raise self._error(f"{what} lists no image manifest of a supported media type")
            raise self._error(f"{what}: none of its manifests is in the archive")
        host_os, host_arch, host_variant = _host_platform()
        matches = [
            (i, d)
            for i, d in present
            if d.platform is not None
            and d.platform.get("os") == host_os
            and d.platform.get("architecture") == host_arch
        ]
        exact = [
            (i, d) for i, d in matches if (d.platform or {}).get("variant", "") == host_variant
        ]
        i, chosen = (exact or matches or present)[0]
        return chosen, i

    def _describe_all(self) -> str:
        return ", ".join(
            ", ".join(image.repo_tags) if image.repo_tags else f"untagged {image.config.digest}"
            for image in self.images
        )


class _BlobReader(io.RawIOBase):
    """Raw reader over ``size`` bytes at ``start`` of a file it owns; positional reads."""

    def __init__(self, handle: io.FileIO, start: int, size: int, label: str, member: str) -> None:
        super().__init__()
        self._handle = handle
        self._start = start
        self._size = size
        self._pos = 0
        self._label = label
        self._member = member

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence ({whence})")
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._check_open()
        with memoryview(buffer) as view, view.cast("B") as out:
            n = min(len(out), self._size - self._pos)
            if n <= 0:
                return 0
            data = _read_at(self._handle, self._start + self._pos, n)
            if len(data) < n:
                raise ArchiveError(
                    f"{self._label}: truncated (member {self._member} is {self._size} bytes but "
                    f"the file ends after {self._pos + len(data)} of them)"
                )
            out[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._handle.close()
            finally:
                super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")


def _read_at(handle: io.FileIO, offset: int, size: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer only at end of file)."""
    chunks: list[bytes] = []
    got = 0
    while got < size:
        if hasattr(os, "pread"):
            chunk = os.pread(handle.fileno(), size - got, offset + got)
        else:  # pragma: no cover
            handle.seek(offset + got)
            chunk = handle.read(size - got) or b""
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _is_regular(info: tarfile.TarInfo) -> bool:
    return info.isreg() and not info.issparse()


def _kind(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "directory"
    if info.issparse():
        return "sparse file"
    if info.isfifo():
        return "FIFO"
    if info.ischr() or info.isblk():
        return "device"
    return f"tar member of type {info.type!r}"


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"


def _familiar(name: str) -> str:
    for prefix in _DOCKER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _has_tag(name: str) -> bool:
    last = name.rsplit("/", 1)[-1]
    return ":" in last and not last.startswith(":") and not last.endswith(":")


def _normalize_tag(name: str) -> str:
    """ "docker.io/library/perl" -> "perl:latest", for comparing references."""
    name = _familiar(name.strip())
    return name if _has_tag(name) or "@" in name else f"{name}:latest"


def _tags_from_annotations(annotations: dict[str, str]) -> tuple[str, ...]:
    """The repo:tag an OCI index entry was saved as: from io.containerd.image.name, else from
    org.opencontainers.image.ref.name when that is a whole "repo:tag" (not just "latest")."""
    name = annotations.get(_IMAGE_NAME, "").strip()
    repo, _, digest = name.partition("@")
    if repo and _has_tag(repo):
        return (_familiar(repo),)
    if repo and not digest:
        return (_familiar(repo) + ":latest",)
    ref = annotations.get(_REF_NAME, "").strip()
    if ref and "@" not in ref and not any(c.isspace() for c in ref) and _has_tag(ref):
        return (_familiar(ref),)
    return ()


def _replace_tags(image: ArchiveImage, tags: tuple[str, ...]) -> ArchiveImage:
    return ArchiveImage(
        config=image.config,
        layers=image.layers,
        diff_ids=image.diff_ids,
        repo_tags=tags,
        created=image.created,
        platform=image.platform,
        layout=image.layout,
    )


def _is_attestation(desc: _Descriptor) -> bool:
    if desc.annotations.get("vnd.docker.reference.type") == "attestation-manifest":
        return True
    return desc.platform is not None and desc.platform.get("os") == "unknown"


def _host_platform() -> tuple[str, str, str]:
    """(os, architecture, variant) of this machine as image platforms spell them; images
    run on Linux even on a Mac, so the os is always "linux"."""
    machine = platform.machine().lower()
    arch, variant = _GO_ARCH.get(machine, (machine or "amd64", ""))
    return "linux", arch, variant
