"""How the CLI shows things: sizes, times, tables, JSON. No RPCs here."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table

from docket_common.digest import short
from docket_common.pb import image_pb2

# Off a terminal rich would wrap at 80 columns: keep digests on one line for grep and cut.
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 250)
stderr = Console(stderr=True, highlight=False)


def human_size(n: int) -> str:
    """Sizes as `docker images` prints them: SI units, three significant digits."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.3g}{unit}"
        size /= 1000
    raise AssertionError("unreachable")


def ts_iso(ts: Timestamp) -> str | None:
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def ago(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    seconds = (datetime.now(UTC) - ts.ToDatetime(tzinfo=UTC)).total_seconds()
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            count = int(seconds // span)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


def image_json(image: image_pb2.Image) -> dict[str, Any]:
    def desc(d: image_pb2.Descriptor) -> dict[str, Any]:
        return {"digest": d.digest, "size_bytes": d.size_bytes, "media_type": d.media_type}

    return {
        "name": image.name,
        "repository": image.repository,
        "tag": image.tag,
        "digest": image.digest,
        "size_bytes": image.size_bytes,
        "layers": [desc(layer) for layer in image.layers],
        "config": desc(image.config),
        "diff_ids": list(image.diff_ids),
        "platform": image.platform,
        "build_time": ts_iso(image.build_time),
        "create_time": ts_iso(image.create_time),
    }


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def images_table(images: Sequence[image_pb2.Image]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "DIGEST", "LAYERS", "SIZE", "PLATFORM", "PUSHED"):
        table.add_column(column, no_wrap=True)
    for image in images:
        table.add_row(
            image.name,
            short(image.digest),
            str(len(image.layers)),
            human_size(image.size_bytes),
            image.platform or "-",
            ago(image.create_time),
        )
    return table


def image_details(image: image_pb2.Image) -> Table:
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("Name", image.name)
    table.add_row("Digest", image.digest)
    table.add_row("Size", f"{human_size(image.size_bytes)} ({image.size_bytes} bytes)")
    table.add_row("Platform", image.platform or "-")
    table.add_row("Built", ts_iso(image.build_time) or "-")
    table.add_row("Pushed", ts_iso(image.create_time) or "-")
    table.add_row("Config", f"{image.config.digest}  {human_size(image.config.size_bytes)}")
    for i, layer in enumerate(image.layers):
        table.add_row(
            "Layers" if i == 0 else "",
            f"{layer.digest}  {human_size(layer.size_bytes):>7}  {layer.media_type}",
        )
    return table
