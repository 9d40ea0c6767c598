"""The metadata store interface: what the registry remembers about blobs, manifests and tags.

A repository holds manifests (keyed by digest) and tags (names pointing at one manifest each).
Blobs are shared by every repository: they are stored once, by digest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from docket_common.torrent import TorrentInfo
from docket_server.domain.models import Blob, Manifest


class MissingBlobsError(Exception):
    """A manifest names blobs the store does not hold."""

    def __init__(self, digests: Sequence[str]) -> None:
        super().__init__(", ".join(digests))
        self.digests = list(digests)


class MissingManifestsError(Exception):
    """An index names manifests its repository does not hold."""

    def __init__(self, digests: Sequence[str]) -> None:
        super().__init__(", ".join(digests))
        self.digests = list(digests)


class ManifestInUseError(Exception):
    """A manifest that an index of its repository still names cannot be deleted."""

    def __init__(self, parents: Sequence[str]) -> None:
        super().__init__(", ".join(parents))
        self.parents = list(parents)


@dataclass(frozen=True)
class DeleteResult:
    names: list[str]  # "repository:tag" of the tags removed
    manifests: list[str]  # digests of the manifests removed
    orphaned_digests: list[str]  # blobs the removed manifests used and no manifest uses now


@dataclass(frozen=True)
class Tagged:
    repository: str
    tag: str
    manifest: Manifest


class MetadataStore(ABC):
    """SQLite is the implementation today; PostgreSQL is the same code."""

    @abstractmethod
    async def open(self) -> None:
        """Connects and brings the schema up to date."""

    @abstractmethod
    async def close(self) -> None: ...

    # Blobs

    @abstractmethod
    async def add_blob(self, blob: Blob) -> None:
        """Records a stored blob; recording one already recorded changes nothing."""

    @abstractmethod
    async def set_torrents(self, torrents: Sequence[TorrentInfo]) -> None:
        """Replaces the torrents of stored blobs (made again for another CA)."""

    @abstractmethod
    async def get_blob(self, digest: str) -> Blob | None: ...

    @abstractmethod
    async def present_digests(self, digests: Sequence[str]) -> set[str]: ...

    @abstractmethod
    async def list_blobs(self) -> list[Blob]: ...

    @abstractmethod
    async def delete_unused_blobs(self, digests: Sequence[str]) -> list[str]:
        """Deletes the records of those blobs that no manifest uses, atomically; returns them."""

    @abstractmethod
    async def defer_blob_deletes(self, digests: Sequence[str]) -> None:
        """Remembers blobs to delete once nothing needs them (a rollout in flight)."""

    @abstractmethod
    async def deferred_blob_deletes(self) -> list[str]: ...

    @abstractmethod
    async def forget_blob_deletes(self, digests: Sequence[str]) -> None: ...

    @abstractmethod
    async def unused_blobs(self, ignoring: Sequence[tuple[str, str]] = ()) -> list[Blob]:
        """The blobs no manifest uses (as its config or a layer), oldest first: what garbage
        collection looks at. A push uploads its blobs before its manifest, so a young one is
        likely a push in progress; the caller decides by ``create_time``. With ``ignoring``
        ((repository, digest) pairs), as if those manifests were gone: a dry run's answer."""

    @abstractmethod
    async def untagged_manifests(self) -> list[Manifest]:
        """The image manifests no tag points at and no index includes (not indexes, not
        referrers): what a retag leaves behind."""

    @abstractmethod
    async def delete_untagged_manifest(self, repository: str, digest: str) -> list[str] | None:
        """Removes the manifest if it is still one untagged_manifests lists, atomically;
        returns the blobs it used that no manifest uses now, or None when it was not removed
        (tagged or included meanwhile, or gone)."""

    # Manifests and tags

    @abstractmethod
    async def put_manifest(self, manifest: Manifest, tag: str | None) -> None:
        """Records the manifest in its repository (once: it is keyed by digest), and points
        ``tag`` at it, replacing what the tag pointed at.

        Raises MissingBlobsError or MissingManifestsError, and records nothing, when a blob or
        (for an index) a child manifest it names is not recorded.
        """

    @abstractmethod
    async def get_manifest(self, repository: str, digest: str) -> Manifest | None: ...

    @abstractmethod
    async def get_manifests(self, repository: str, digests: Sequence[str]) -> list[Manifest]:
        """The ones of those manifests the repository holds."""

    @abstractmethod
    async def resolve_tag(self, repository: str, tag: str) -> Manifest | None: ...

    @abstractmethod
    async def tags_of(self, repository: str, digest: str) -> list[str]:
        """The tags pointing at a manifest, sorted."""

    @abstractmethod
    async def list_tags(self, repository: str, after: str | None, limit: int) -> list[str]:
        """A repository's tags in lexical order, starting after ``after``."""

    @abstractmethod
    async def repository_exists(self, repository: str) -> bool:
        """Whether the repository holds a manifest."""

    @abstractmethod
    async def list_repositories(self, after: str | None, limit: int) -> list[str]: ...

    @abstractmethod
    async def referrers(self, repository: str, subject: str) -> list[Manifest]:
        """The manifests of a repository whose subject is ``subject``, oldest first."""

    @abstractmethod
    async def list_tagged(self, after: tuple[str, str] | None, limit: int) -> list[Tagged]:
        """Every tag with its manifest, ordered by (repository, tag), starting after ``after``."""

    @abstractmethod
    async def delete_tag(self, repository: str, tag: str) -> bool:
        """Removes a tag (not its manifest); whether it existed."""

    @abstractmethod
    async def delete_manifest(self, repository: str, digest: str) -> DeleteResult | None:
        """Removes a manifest and every tag pointing at it, atomically. For an index, the
        child manifests that no tag and no other index names go with it. None when the
        repository does not hold the manifest; ManifestInUseError when an index names it."""
