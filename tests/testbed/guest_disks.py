"""Guest disks with real partition tables and filesystems, built on the
host (no guest OS): GPT with ext4, vfat, xfs and an LVM volume group, MBR
with ext4 and a logical vfat partition. Each filesystem holds `hello.txt`
saying which volume and which version it is, so that a test can tell two
backups apart by their files."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from testbed.domains import DomainFactory, GuestDomain

MiB = 1024 * 1024
SECTOR = 512
GPT_SIZE = 1024 * MiB
MBR_SIZE = 256 * MiB
LVM_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}

# label -> (fstype, (start, size) in MiB) ; LVM volumes come after
GPT_LAYOUT = {
    "part1": ("ext4", 1, 64),
    "part2": ("vfat", 65, 64),
    "part3": ("xfs", 129, 320),
    "part4": ("lvm", 449, 560),
}
MBR_LAYOUT = {
    "part1": ("ext4", 1, 100),
    # part2: the extended partition (no filesystem), holding part5
    "part5": ("vfat", 103, 100),
}
LVM_VOLUMES = {"data": 100, "logs": 60}  # MiB, in volume group "guestvg"
VG = "guestvg"


def run(*args: str | Path, env: dict[str, str] | None = None, input: str | None = None) -> str:
    return subprocess.run(
        [str(a) for a in args], check=True, capture_output=True, text=True, env=env, input=input
    ).stdout


@contextlib.contextmanager
def loop(file: Path, offset: int, size: int) -> Iterator[str]:
    dev = run(
        "losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size), file
    ).strip()
    try:
        yield dev
    finally:
        run("losetup", "--detach", dev)


@contextlib.contextmanager
def mounted(dev: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vb-guestfs-") as d:
        run("mount", dev, d)
        try:
            yield Path(d)
        finally:
            run("umount", d)


def text(label: str, version: int) -> str:
    return f"{label} version {version}\n"


def _mkfs(dev: str, fstype: str) -> None:
    if fstype == "ext4":
        run("mkfs.ext4", "-q", "-F", dev)
    elif fstype == "vfat":
        run("mkfs.vfat", dev)
    elif fstype == "xfs":
        run("mkfs.xfs", "-q", "-f", dev)
    else:
        raise AssertionError(fstype)


def _write(dev: str, label: str, version: int) -> None:
    if _fstype(dev) == "vfat":  # this host's kernel may lack vfat: mtools writes it
        with tempfile.TemporaryDirectory() as t:
            (Path(t) / "hello.txt").write_text(text(label, version))
            (Path(t) / "big.bin").write_bytes(bytes([version]) * (2 * MiB))
            for name in ("hello.txt", "big.bin"):
                run("mcopy", "-o", "-i", dev, Path(t) / name, f"::{name}")
        return
    with mounted(dev) as d:
        (d / "hello.txt").write_text(text(label, version))
        (d / "big.bin").write_bytes(bytes([version]) * (2 * MiB))
        os.sync()


def _fstype(dev: str) -> str:
    return run("blkid", "-p", "-o", "value", "-s", "TYPE", dev).strip()


def _lvm(*args: str) -> str:
    return run("lvm", *args, env=LVM_ENV)


def lvm_volumes(pv_dev: str) -> dict[str, tuple[int, int]]:
    """name -> (offset in the PV, size) of the LVs on `pv_dev`."""
    opts = ["--devices", pv_dev, "--driverloaded", "n", "--units", "b", "--nosuffix"]
    segs = json.loads(
        _lvm(
            "lvs",
            *opts,
            "--segments",
            "--reportformat",
            "json",
            "-o",
            "lv_name,seg_pe_ranges,vg_extent_size",
        )
    )["report"][0]["seg"]
    pe_start = int(
        json.loads(_lvm("pvs", *opts, "--reportformat", "json", "-o", "pe_start"))["report"][0][
            "pv"
        ][0]["pe_start"]
    )
    out = {}
    for s in segs:
        first, last = (int(x) for x in s["seg_pe_ranges"].split(":")[1].split("-"))
        extent = int(s["vg_extent_size"])
        out[s["lv_name"]] = (pe_start + first * extent, (last - first + 1) * extent)
    return out


def build_gpt(raw: Path, version: int) -> None:
    """Create (version 1) or rewrite the files of (later versions) the GPT disk."""
    if version == 1:
        with raw.open("wb") as f:
            f.truncate(GPT_SIZE)
        table = "label: gpt\n" + "".join(
            f"start={start * 2048}, size={size * 2048}, type="
            f"{'E6D6D379-F507-44C2-A23C-238F2A3DF928' if fs == 'lvm' else 'L'}\n"
            for fs, start, size in GPT_LAYOUT.values()
        )
        run("sfdisk", "-q", raw, input=table)
    for label, (fs, start, size) in GPT_LAYOUT.items():
        with loop(raw, start * MiB, size * MiB) as dev:
            if fs == "lvm":
                opts = ["--devices", dev, "--driverloaded", "n"]
                if version == 1:
                    _lvm("pvcreate", *opts, dev)
                    _lvm("vgcreate", *opts, VG, dev)
                    for lv, mib in LVM_VOLUMES.items():
                        _lvm("lvcreate", *opts, "-an", "-Zn", "-L", f"{mib}M", "-n", lv, VG)
                for lv, (off, lsize) in lvm_volumes(dev).items():
                    with loop(raw, start * MiB + off, lsize) as lvdev:
                        if version == 1:
                            _mkfs(lvdev, "ext4")
                        _write(lvdev, f"{label}/{VG}/{lv}", version)
                continue
            if version == 1:
                _mkfs(dev, fs)
            _write(dev, label, version)


def build_mbr(raw: Path, version: int) -> None:
    if version == 1:
        with raw.open("wb") as f:
            f.truncate(MBR_SIZE)
        table = (
            "label: dos\n"
            "start=2048, size=204800, type=83\n"
            "start=206848, type=5\n"
            "start=210944, size=204800, type=c\n"
        )
        run("sfdisk", "-q", raw, input=table)
    for label, (fs, start, size) in MBR_LAYOUT.items():
        with loop(raw, start * MiB, size * MiB) as dev:
            if version == 1:
                _mkfs(dev, fs)
            _write(dev, label, version)


def expected(version: int) -> dict[str, str]:
    """Mounted path below MOUNTPOINT -> the text of its hello.txt."""
    out = {
        f"vda/{label}": text(label, version)
        for label, (fs, *_x) in GPT_LAYOUT.items()
        if fs != "lvm"
    }
    out.update({f"vda/part4/{VG}/{lv}": text(f"part4/{VG}/{lv}", version) for lv in LVM_VOLUMES})
    out.update({f"vdb/{label}": text(label, version) for label in MBR_LAYOUT})
    return out


def write_version(td: GuestDomain, raws: dict[str, Path], version: int) -> None:
    """The guest's disks (vda: GPT, vdb: MBR) get version `version` of their
    files. The domain is shut off: the host writes its images through
    QEMU's block layer, so the persistent bitmaps see it as they see guest
    writes."""
    build_gpt(raws["vda"], version)
    build_mbr(raws["vdb"], version)
    for target, raw in raws.items():
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raw, td.disk(target).path)


def create_fs_domain(domains: DomainFactory, work: Path) -> tuple[GuestDomain, dict[str, Path]]:
    """A shut-off domain whose two disks carry version 1 of the files."""
    td = domains.create(qcow2_sizes=[GPT_SIZE, MBR_SIZE], start=False)
    raws = {"vda": work / f"{td.name}-vda.raw", "vdb": work / f"{td.name}-vdb.raw"}
    write_version(td, raws, 1)
    return td, raws


def damage_superblock(td: GuestDomain, raws: dict[str, Path]) -> None:
    """The guest damages vda/part1's ext4 superblock (its inode count)."""
    with raws["vda"].open("r+b") as f:
        f.seek(GPT_LAYOUT["part1"][1] * MiB + 1024)
        f.write((12345).to_bytes(4, "little"))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raws["vda"], td.disk("vda").path)
