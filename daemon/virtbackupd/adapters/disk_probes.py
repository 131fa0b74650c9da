"""Reading a guest disk's layout and checking its filesystems with the
host's tools, all read-only: `sfdisk --json` (partition tables), `blkid
-p` (what a byte range holds), `lvm` restricted to one device with
device-mapper disabled (never the host's volume groups), and the
filesystems' own checkers in their no-change modes."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

from virtbackupd.adapters.qemu_img import die_with_parent, run_tool
from virtbackupd.errors import ProcessError


async def partition_table(file: Path) -> str:
    """sfdisk's JSON of the table, "" when the disk has none."""
    proc = await asyncio.create_subprocess_exec(
        "sfdisk",
        "--json",
        str(file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent(),
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        text = err.decode(errors="replace")
        if "does not contain a recognized partition table" in text:
            return ""
        raise ProcessError(f"sfdisk --json {file}", text.strip())
    return out.decode(errors="replace")


async def content_type(file: Path, offset: int, size: int) -> str | None:
    """What blkid finds at that byte range (ext4, xfs, vfat, LVM2_member,
    swap, ...), None for nothing it knows."""
    proc = await asyncio.create_subprocess_exec(
        "blkid",
        "-p",
        "-o",
        "export",
        "--offset",
        str(offset),
        "--size",
        str(size),
        str(file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent(),
    )
    out, err = await proc.communicate()
    if proc.returncode == 2:  # nothing found
        return None
    if proc.returncode != 0:
        raise ProcessError(f"blkid {file}", err.decode(errors="replace").strip())
    for line in out.decode(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key == "TYPE":
            return value
    return None


def _lvm_argv(device: str, *args: str) -> list[str]:
    return [
        "lvm",
        *args,
        "--devices",
        device,
        "--driverloaded",
        "n",
        "--readonly",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
    ]


_LVM_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}


@dataclass(frozen=True)
class LvmReport:
    segments_json: str
    pe_start: int


async def lvm_report(device: str) -> LvmReport:
    """The logical volumes on one physical volume (a read-only loop device),
    read by lvm with only that device visible and device-mapper off."""
    os.environ.update(_LVM_ENV)
    segs = await run_tool(
        _lvm_argv(
            device,
            "lvs",
            "--segments",
            "-o",
            "vg_name,lv_name,segtype,seg_pe_ranges,vg_extent_size",
        ),
        f"lvm lvs on {device}",
    )
    pvs = await run_tool(_lvm_argv(device, "pvs", "-o", "pe_start"), f"lvm pvs on {device}")
    try:
        pe_start = int(str(json.loads(pvs)["report"][0]["pv"][0]["pe_start"]).rstrip("B"))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ProcessError(f"lvm pvs on {device}", f"unreadable report: {exc}") from exc
    return LvmReport(segs, pe_start)


#: The read-only check of each filesystem type: (argv before the device,
#: exit codes that mean "clean").
FSCK = {
    "ext2": (["e2fsck", "-n", "-f"], {0}),
    "ext3": (["e2fsck", "-n", "-f"], {0}),
    "ext4": (["e2fsck", "-n", "-f"], {0}),
    "xfs": (["xfs_repair", "-n"], {0}),
    "vfat": (["fsck.vfat", "-n"], {0}),
}


@dataclass(frozen=True)
class FsckResult:
    clean: bool
    exit_code: int
    output: str


async def check_filesystem(device: str, fstype: str) -> FsckResult:
    argv, clean = FSCK[fstype]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        device,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        preexec_fn=die_with_parent(),
    )
    out, _ = await proc.communicate()
    code = proc.returncode if proc.returncode is not None else -1
    return FsckResult(code in clean, code, out.decode(errors="replace"))
