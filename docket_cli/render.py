"""How the CLI shows things: sizes, times, tables, JSON. No RPCs here."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console

from docket_common.digest import short
from docket_common.manifest import IMAGE_CONFIG_TYPES
from docket_common.pb import image_pb2

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
        "media_type": image.media_type,
        "artifact_type": image.artifact_type,
        "size_bytes": image.size_bytes,
        "layers": [desc(layer) for layer in image.layers],
        "config": desc(image.config) if image.HasField("config") else None,
        "diff_ids": list(image.diff_ids),
        "platform": image.platform,
        "manifests": [image_json(m) for m in image.manifests],
        "build_time": ts_iso(image.build_time),
        "create_time": ts_iso(image.create_time),
    }


def _platforms(image: image_pb2.Image) -> str:
    if image.manifests:
        return ",".join(m.platform for m in image.manifests if m.platform) or "-"
    return image.platform or "-"


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns two spaces apart, like `docker images` prints them."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def images_table(images: Sequence[image_pb2.Image]) -> str:
    rows = [["NAME", "DIGEST", "LAYERS", "SIZE", "PLATFORM", "PUSHED"]]
    rows += [
        [
            image.name,
            short(image.digest),
            str(len(image.layers)) if image.HasField("config") else "-",
            human_size(image.size_bytes),
            _platforms(image),
            ago(image.create_time),
        ]
        for image in images
    ]
    return columns(rows)


def image_details(image: image_pb2.Image) -> str:
    rows = [
        ["Name", image.name],
        ["Digest", image.digest],
        ["Type", image.media_type],
        ["Size", f"{human_size(image.size_bytes)} ({image.size_bytes} bytes)"],
        ["Platform", _platforms(image)],
        ["Built", ts_iso(image.build_time) or "-"],
        ["Pushed", ts_iso(image.create_time) or "-"],
    ]
    if image.artifact_type and image.artifact_type not in IMAGE_CONFIG_TYPES:
        rows.append(["Artifact", image.artifact_type])
    rows += [
        [
            "Platforms" if i == 0 else "",
            f"{m.digest}  {human_size(m.size_bytes):>7}  {m.platform or '-'}",
        ]
        for i, m in enumerate(image.manifests)
    ]
    if image.HasField("config"):
        rows.append(["Config", f"{image.config.digest}  {human_size(image.config.size_bytes)}"])
    rows += [
        [
            "Layers" if i == 0 else "",
            f"{layer.digest}  {human_size(layer.size_bytes):>7}  {layer.media_type}",
        ]
        for i, layer in enumerate(image.layers)
    ]
    return columns(rows)
