"""A repository's identity: the id a catalogue records to know which
repository it describes."""

from __future__ import annotations

from pathlib import Path

from virtbackupd.core.repository_format.codec import Fields
from virtbackupd.core.repository_format.versions import IDENTITY_FORMAT, RECORD_VERSION


def identity_json(repository_id: str) -> dict[str, object]:
    return {"format": IDENTITY_FORMAT, "format_version": RECORD_VERSION, "id": repository_id}


def identity_from_json(data: object, path: Path) -> str:
    f = Fields(data, path)
    fmt = f.text("format")
    if fmt != IDENTITY_FORMAT:
        raise f.error("format", f"{fmt[:40]!r} is not {IDENTITY_FORMAT!r}")
    if f.integer("format_version") > RECORD_VERSION:
        raise f.error("format_version", f"newer than this virtbackupd reads ({RECORD_VERSION})")
    return f.uuid("id")
