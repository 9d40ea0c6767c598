"""Push progress: bars on a terminal, a line a blob otherwise. Always on stderr."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from docket_cli.render import human_size, stderr
from docket_common.archive import ArchiveBlob
from docket_common.digest import short


def transfer_bars() -> Progress:
    """Bars for bytes moving (push, pull): what, bar, bytes, rate, time left. On stderr."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=False),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
    )


class PushProgress:
    """Implements push.Progress; bars only when stderr is a terminal."""

    def __init__(self, label: str, quiet: bool = False) -> None:
        self.label = label
        self.quiet = quiet
        self.live = stderr.is_terminal and not quiet
        self._bars = transfer_bars()
        self._tasks: dict[str, TaskID] = {}
        self._total: TaskID | None = None
        self._export: TaskID | None = None

    def __enter__(self) -> PushProgress:
        if self.live:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._bars.stop()

    def note(self, text: str) -> None:
        if not self.quiet:
            stderr.print(text)

    def exporting(self, size_hint: int) -> None:
        """The engine has the image and starts `docker save` (about ``size_hint`` bytes)."""
        if not self.live:
            self.note(f"Exporting {self.label} from the Docker engine…")
            return
        self._export = self._bars.add_task("exporting from docker", total=size_hint or None)

    def exported(self, nbytes: int) -> None:
        if self._export is not None:
            self._bars.update(self._export, advance=nbytes)

    def export_done(self, size: int) -> None:
        if self._export is not None:
            self._bars.update(self._export, total=size, completed=size)

    def plan(self, uploads: list[ArchiveBlob], present: list[ArchiveBlob]) -> None:
        if present:
            self.note(
                f"{len(present)} of {len(uploads) + len(present)} blobs already on the server "
                f"({human_size(sum(b.size for b in present))}): not uploaded"
            )
        if not self.live:
            return
        if len(uploads) > 1:
            self._total = self._bars.add_task("[bold]total", total=sum(b.size for b in uploads))
        for blob in uploads:
            self._tasks[blob.digest] = self._bars.add_task(f"{short(blob.digest)}", total=blob.size)

    def streaming(self, blob: ArchiveBlob) -> None:
        """A blob goes up while the engine still exports it."""
        if self.live:
            self._tasks[blob.digest] = self._bars.add_task(f"{short(blob.digest)}", total=blob.size)

    def advance(self, blob: ArchiveBlob, nbytes: int) -> None:
        if not self.live:
            return
        self._bars.update(self._tasks[blob.digest], advance=nbytes)
        if self._total is not None:
            self._bars.update(self._total, advance=nbytes)

    def done(self, blob: ArchiveBlob, already_existed: bool) -> None:
        if not self.live:
            how = "already on the server" if already_existed else "uploaded"
            self.note(f"{short(blob.digest)}: {how} ({human_size(blob.size)})")
