"""Recovery times: how soon a restored domain runs, and how soon one file
is back, each against its peer in the same run.

- Time to running: `virtbackup restore --live` (the domain starts on
  overlays of the backup; its disk moves in the background) against the
  plain way (`virtbackup restore --define`, which writes the whole disk
  first, then `virsh start`), for a 1 GiB and an 8 GiB disk full of data.
  Then the live restore's move: its throughput (disk size / time until
  the block job has ended and the image stands alone) and its result,
  checked with `qemu-img compare` against the plain restore.
- Time to one file: `virtbackup mount` of a backup of a disk with five
  filesystems (GPT and MBR, ext4, vfat, xfs, ext4 on LVM) and reading one
  file, against restoring that disk to a raw image and loop-mounting one
  partition of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from testbed import guest_disks  # noqa: E402
from testbed.domains import DomainFactory, remove_domain  # noqa: E402
from testbed.host import connect, ensure_libvirtd  # noqa: E402
from testbed.tools import qemu_img_info  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
VIRTBACKUP = str(REPO / ".venv" / "bin" / "virtbackup")


def _vb(config: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [VIRTBACKUP, "-c", str(config), "--json", *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"virtbackup {' '.join(args)}: {proc.stderr.strip()}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def _config(work: Path, name: str) -> Path:
    (work / f"policies-{name}").mkdir(exist_ok=True)
    cfg = work / f"{name}.yaml"
    cfg.write_text(
        f"state_dir: {work}/state-{name}\nbackup_root: {work}/backups-{name}\n"
        f"runtime_dir: {work}/run-{name}\nscratch_dir: {work}/scratch-{name}\n"
        f"policy_dirs: [{work}/policies-{name}]\n"
    )
    return cfg


def _time_to_running(work: Path, factory: DomainFactory, size: int) -> list[str]:
    conn = factory.conn
    td = factory.create(qcow2_sizes=[size], start=False)
    writes = [a for g in range(size // GiB) for a in ("-c", f"write -P 0x5a {g * GiB} {GiB}")]
    subprocess.run(["qemu-io", *writes, str(td.disk("vda").path)], check=True, capture_output=True)
    cfg = _config(work, f"live{size // GiB}")
    _vb(cfg, "backup", td.name)
    gib = size // GiB
    rows = []

    # The plain way: the whole disk first, then the domain starts.
    plain_dir, plain = td.workdir / "plain", f"{td.name}-plain"
    t0 = time.monotonic()
    _vb(cfg, "restore", td.name, "--to", str(plain_dir), "--define", plain)
    conn.lookupByName(plain).create()
    plain_s = time.monotonic() - t0
    conn.lookupByName(plain).destroy()
    rows.append(f"| {gib} GiB | restore, then start | {plain_s:.1f} s | - |")

    live_dir, live = td.workdir / "live", f"{td.name}-live"
    t0 = time.monotonic()
    _vb(cfg, "restore", td.name, "--to", str(live_dir), "--define", live, "--live")
    dom = conn.lookupByName(live)
    assert dom.isActive()
    live_s = time.monotonic() - t0
    image = live_dir / "vda.qcow2"
    restarts, gone_since = 0, None
    # Done when the image stands alone, not when the job is gone: once (a
    # run of 2026-12-06) the job was gone with the backing file still
    # there. `status` settles live restores as the daemon does every 5 s:
    # it restarts a pull that stopped and releases the hold when done.
    while "backing-filename" in qemu_img_info(image):
        if dom.blockJobInfo("vda", 0):
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()  # it may be finishing: give it a moment
        elif time.monotonic() - gone_since > 2:
            restarts += 1
            gone_since = None
            _vb(cfg, "status")
        assert time.monotonic() - t0 < 900, "the live restore never finished"
        time.sleep(0.1)
    move_s = time.monotonic() - t0
    _vb(cfg, "status")  # releases the hold (the daemon would, every 5 s)
    dom.destroy()
    assert "backing-filename" not in qemu_img_info(image)
    subprocess.run(
        ["qemu-img", "compare", str(image), str(plain_dir / "vda.qcow2")],
        check=True,
        capture_output=True,
    )
    again = f"; the pull stopped and was restarted {restarts}x by `status`" if restarts else ""
    rows.append(
        f"| {gib} GiB | live restore | {live_s:.1f} s | move {move_s:.1f} s, "
        f"{size / MiB / move_s:.0f} MiB/s; standalone, identical to the plain restore{again} |"
    )
    for name in (plain, live):
        remove_domain(conn, name)
    return rows


def _time_to_file(work: Path, factory: DomainFactory) -> list[str]:
    td = factory.create(qcow2_sizes=[guest_disks.GPT_SIZE, guest_disks.MBR_SIZE], start=False)
    raws = {"vda": work / "vda.raw", "vdb": work / "vdb.raw"}
    guest_disks.build_gpt(raws["vda"], 1)
    guest_disks.build_mbr(raws["vdb"], 1)
    for t, raw in raws.items():
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "qcow2",
                str(raw),
                str(td.disk(t).path),
            ],
            check=True,
        )
    cfg = _config(work, "mount")
    _vb(cfg, "backup", td.name)
    want = guest_disks.text("part3", 1)

    mnt = work / "mnt"
    mnt.mkdir()
    t0 = time.monotonic()
    _vb(cfg, "mount", td.name, str(mnt))
    assert (mnt / "vda" / "part3" / "hello.txt").read_text() == want
    mount_s = time.monotonic() - t0
    t0 = time.monotonic()
    _vb(cfg, "umount", str(mnt))
    umount_s = time.monotonic() - t0

    t0 = time.monotonic()
    _vb(cfg, "restore", td.name, "--disk", "vda", "--to", str(work / "r"), "--format", "raw")
    start, size = guest_disks.GPT_LAYOUT["part3"][1:]
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(
            [
                "mount",
                "-o",
                f"ro,loop,offset={start * MiB},sizelimit={size * MiB}",
                str(work / "r" / "vda.raw"),
                d,
            ],
            check=True,
        )
        try:
            assert (Path(d) / "hello.txt").read_text() == want
        finally:
            subprocess.run(["umount", d], check=True)
    restore_s = time.monotonic() - t0
    return [
        f"| `virtbackup mount` (7 filesystems of 2 disks) and read a file | {mount_s:.2f} s |",
        f"| `virtbackup umount` | {umount_s:.2f} s |",
        f"| restore the 1 GiB disk to raw, loop-mount one partition, read the file "
        f"| {restore_s:.2f} s |",
    ]


def recovery_times(work: Path, sizes_gib: tuple[int, ...] = (1, 8)) -> str:
    ensure_libvirtd()
    work.chmod(0o755)  # QEMU (libvirt-qemu) reads the repositories below for live restores
    factory = DomainFactory(connect())
    try:
        lines = [
            "### Time to running: live restore against restore-then-start",
            "",
            "A shut-off domain's qcow2 disk full of data, one full backup; the",
            "new domain defined from it and started (TCG). One run each.",
            "",
            "| disk | way | running after | |",
            "| --- | --- | ---: | --- |",
        ]
        for gib in sizes_gib:
            lines += _time_to_running(work, factory, gib * GiB)
        lines += [
            "",
            "### Time to one file",
            "",
            "| | seconds |",
            "| --- | ---: |",
            *_time_to_file(work, factory),
        ]
        return "\n".join(lines) + "\n"
    finally:
        factory.cleanup()
