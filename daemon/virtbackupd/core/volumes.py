"""Where a guest's filesystems lie inside one disk image: partitions from
the disk's partition table (MBR or GPT, as `sfdisk --json` reads it), and
LVM logical volumes from a physical volume's metadata (as `lvm lvs
--segments` reports it). Pure: tool output in, byte ranges out.

Each filesystem becomes a read-only loop device over exactly its range of
the exported image; nothing on the host (its device-mapper, its volume
groups, its udev) ever sees the guest's volumes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from virtbackupd.errors import VirtBackupError

SECTOR = 512

# Partition types that hold no filesystem of their own.
_EXTENDED_MBR = {"5", "f", "85"}


@dataclass(frozen=True)
class Region:
    """A byte range of one disk and the name it is shown under, relative
    to the disk's folder: "" (the whole disk), "part2", "part2/vg/lv"."""

    disk: str
    name: str
    offset: int
    size: int

    @property
    def label(self) -> str:
        return f"{self.disk}/{self.name}" if self.name else self.disk


class VolumeReadError(VirtBackupError):
    pass


def partitions(disk: str, sfdisk_json: str, disk_size: int) -> list[Region]:
    """The partitions of `disk`'s table (none: empty list), numbered as the
    guest's kernel numbers them (sfdisk's node suffix)."""
    if not sfdisk_json.strip():
        return []
    try:
        table = json.loads(sfdisk_json)["partitiontable"]
    except (ValueError, KeyError, TypeError) as exc:
        raise VolumeReadError(f"disk {disk}: unreadable partition table ({exc})") from exc
    sector = int(table.get("sectorsize", SECTOR))
    out = []
    for p in table.get("partitions", []):
        m = re.search(r"(\d+)$", str(p.get("node", "")))
        if m is None:
            continue
        if table.get("label") == "dos" and str(p.get("type", "")).lower() in _EXTENDED_MBR:
            continue  # the container of logical partitions, not a volume
        offset, size = int(p["start"]) * sector, int(p["size"]) * sector
        if offset + size > disk_size:
            raise VolumeReadError(
                f"disk {disk}: partition {m.group(1)} ends at byte {offset + size}, "
                f"past the disk's end ({disk_size})"
            )
        out.append(Region(disk, f"part{m.group(1)}", offset, size))
    return out


def logical_volumes(pv: Region, lvs_json: str, pe_start: int) -> tuple[list[Region], list[str]]:
    """The logical volumes on the physical volume `pv`, and why any others
    are not shown. Only an LV lying in one linear segment on this PV is a
    contiguous byte range; others (striped, spanning PVs, thin, snapshots)
    would need the host's device-mapper: named, not shown."""
    try:
        rows = json.loads(lvs_json)["report"][0]["seg"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise VolumeReadError(f"{pv.label}: unreadable LVM report ({exc})") from exc
    by_lv: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in rows:
        by_lv.setdefault((r["vg_name"], r["lv_name"]), []).append(r)
    out, skipped = [], []
    for (vg, lv), segs in sorted(by_lv.items()):
        where = f"{pv.label}/{vg}/{lv}"
        seg = segs[0]
        m = re.fullmatch(r"[^:]+:(\d+)-(\d+)", seg.get("seg_pe_ranges", ""))
        if len(segs) != 1 or seg.get("segtype") != "linear" or m is None:
            kinds = ", ".join(sorted({s.get("segtype", "?") for s in segs}))
            skipped.append(
                f"{where}: not shown: it is not one linear segment on this volume ({kinds}, "
                f"{len(segs)} segment(s)); only the host's device-mapper could assemble it"
            )
            continue
        extent = _bytes(seg["vg_extent_size"])
        first, last = int(m.group(1)), int(m.group(2))
        offset = pv.offset + pe_start + first * extent
        size = (last - first + 1) * extent
        if offset + size > pv.offset + pv.size:
            raise VolumeReadError(f"{where}: lies past the end of its physical volume")
        name = f"{pv.name}/{vg}/{lv}" if pv.name else f"{vg}/{lv}"
        out.append(Region(pv.disk, name, offset, size))
    return out, skipped


def _bytes(text: str) -> int:
    """LVM's "--units b" figures: "4194304B"."""
    return int(text.rstrip("B"))
