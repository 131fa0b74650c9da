"""How a manifest says each disk image is stored (docs/repository-format.md,
*Images*): the backing files a reader accepts, with the per-disk
`standalone` field and for manifests written before it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from virtbackupd.adapters.repository import Manifest, allowed_backings
from virtbackupd.core.extents import Kind, Range
from virtbackupd.core.policy import Level
from virtbackupd.core.records import DiskRecord

SIZE = 1 << 20
WHOLE = (Range(0, SIZE // 2, Kind.DATA), Range(SIZE // 2, SIZE // 2, Kind.ZERO))
PART = (Range(4096, 8192, Kind.DATA),)
# Backup ids and a UUID as the format requires (manifests are validated where read).
B, P = "20261207T000000.000Z-000b", "20261207T000000.000Z-000a"
OVERLAY = f"../{P}/vdb.qcow2"


def manifest(parent: str | None, ranges: tuple[Range, ...], standalone: bool | None) -> Manifest:
    now = datetime(2026, 12, 7, tzinfo=UTC)
    disk = DiskRecord(
        "vdb", "vdb.qcow2", SIZE, 0, 0, 0, "", 1 << 21, ranges, "vdb.pieces", standalone
    )
    level = Level.FULL if parent is None else Level.INCREMENTAL
    uuid = "0b1cbd0e-1c2f-4a57-9b43-5b1f1e0f7a01"
    return Manifest(B, "vm", uuid, level, "", None, parent, None, now, now, (disk,))


@pytest.mark.parametrize(
    ("parent", "ranges", "standalone", "allowed"),
    [
        (None, WHOLE, True, (None,)),  # a full backup
        (None, PART, None, (None,)),  # a full backup written before the field
        (P, PART, False, (OVERLAY,)),  # an incremental of a qcow2 disk
        (P, WHOLE, True, (None,)),  # a raw disk copied whole into an incremental
        (P, WHOLE, False, (OVERLAY,)),  # said overlay: must be one
        (P, WHOLE, None, (OVERLAY, None)),  # before the field: a whole copy, either way
        (P, PART, None, (OVERLAY,)),  # before the field: a partial layer is an overlay
    ],
)
def test_allowed_backings(
    parent: str | None,
    ranges: tuple[Range, ...],
    standalone: bool | None,
    allowed: tuple[str | None, ...],
) -> None:
    m = manifest(parent, ranges, standalone)
    assert allowed_backings(m, m.disks[0]) == allowed


def test_the_field_is_written_when_known_and_read_back() -> None:
    for standalone in (True, False, None):
        m = manifest(P, WHOLE, standalone)
        data = m.to_json()
        disks = data["disks"]
        assert isinstance(disks, list)
        disk = disks[0]
        assert disk.get("standalone") is standalone
        again = Manifest.from_json(json.loads(json.dumps(data)), Path("manifest.json"))
        assert again.disks[0].standalone is standalone
