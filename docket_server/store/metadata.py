"""The metadata store interface: what the registry needs to remember about blobs and images."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from docket_server.domain.models import Blob, Image


class MissingBlobsError(Exception):
    """An image names blobs the store does not hold."""

    def __init__(self, digests: Sequence[str]) -> None:
        super().__init__(", ".join(digests))
        self.digests = list(digests)


@dataclass(frozen=True)
class DeleteResult:
    names: list[str]
    orphaned_digests: list[str]


class MetadataStore(ABC):
    """Blobs and images. SQLite is the implementation today; PostgreSQL is the same code."""

    @abstractmethod
    async def open(self) -> None:
        """Connects and brings the schema up to date."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def add_blob(self, blob: Blob) -> None:
        """Records a stored blob; recording one already recorded changes nothing."""

    @abstractmethod
    async def get_blob(self, digest: str) -> Blob | None: ...

    @abstractmethod
    async def present_digests(self, digests: Sequence[str]) -> set[str]: ...

    @abstractmethod
    async def list_blobs(self) -> list[Blob]: ...

    @abstractmethod
    async def put_image(self, image: Image) -> None:
        """Records the image under its name, replacing what the name pointed at.

        Raises MissingBlobsError, and records nothing, when a blob it names is not recorded.
        """

    @abstractmethod
    async def get_image(self, repository: str, tag: str) -> Image | None: ...

    @abstractmethod
    async def find_images_by_digest(self, repository: str, digest: str) -> list[Image]: ...

    @abstractmethod
    async def list_images(self, after: tuple[str, str] | None, limit: int) -> list[Image]:
        """Images ordered by (repository, tag), starting after ``after``."""

    @abstractmethod
    async def delete_images(self, names: Sequence[tuple[str, str]]) -> DeleteResult:
        """Deletes the named images and then every blob no remaining image uses, atomically."""
