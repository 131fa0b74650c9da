"""docs/restore.md's runbook without virtbackup runs as written (issue 24
item 9): its shell blocks, taken from the doc (so the test fails when the
doc breaks), run in one bash with `set -euo pipefail` on a repository of
a shut-off domain with a qcow2 disk and a block-device disk, and a backup
in progress beside (a `.partial` folder newer than every backup). Only the
values of the settings block are the test's. Checked: the newest complete
backup is chosen, not the `.partial` one; every restored image, the block
device of step 4 and the live-restored images equal the disks (qemu-img
compare); the defined domains start, their disks are file disks (the
block device one too: `type='file'`); after the pull the chain's files are
root's and 0600 again and the folders opened for QEMU are closed again."""

from __future__ import annotations

import re
import stat
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from testbed.cli import run_cli
from testbed.domains import Disk, DomainFactory, GuestDomain, MiB, remove_domain
from testbed.tools import qemu_img_compare, qemu_img_info, qemu_io, run
from xmltools import child

RESTORE_MD = Path(__file__).resolve().parents[2] / "docs" / "restore.md"
SETTINGS = ("BACKUPS", "OUT", "NEW_NAME", "DISK", "DEVICE")


def runbook_blocks() -> list[str]:
    """The ```sh blocks of "Without virtbackup", up to the single-file part
    (which needs a partitioned guest disk: tests/integration/test_mount.py
    covers mounting), dedented as an operator pastes them."""
    text = RESTORE_MD.read_text()
    section = text[text.index("## Without virtbackup") : text.index("Single files, by hand")]
    blocks = re.findall(r"^( *)```sh\n(.*?)^\1```$", section, re.S | re.M)
    return [textwrap.dedent(body) for _, body in blocks]


def with_settings(block: str, values: dict[str, str]) -> str:
    """The settings block with the test's values (nothing else changes)."""
    lines = []
    for line in block.splitlines():
        m = re.match(r"^([A-Z_]+)=", line)
        assert m is not None and m.group(1) in values, f"unexpected settings line: {line}"
        lines.append(f"{m.group(1)}='{values[m.group(1)]}'")
    assert [ln.split("=")[0] for ln in lines] == list(SETTINGS)
    return "\n".join(lines) + "\n"


@pytest.fixture
def loops() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for dev in made:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def loop_device(path: Path, size: int, loops: list[str]) -> str:
    with path.open("wb") as f:
        f.truncate(size)
    dev = run("losetup", "--find", "--show", path).strip()
    loops.append(dev)
    return dev


def add_block_disk(td: GuestDomain, dev: str, target: str, size: int) -> None:
    xml = td.dom.XMLDesc(0).replace(
        "</devices>",
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
        f"<source dev='{dev}'/><target dev='{target}' bus='virtio'/></disk></devices>",
    )
    td.dom = td.conn.defineXML(xml)
    td.disks.append(Disk(target, Path(dev), "raw", size))


def file_disks(td: GuestDomain, name: str) -> dict[str, str]:
    """target -> source file of the named domain's disks (all must be files)."""
    dom = etree.fromstring(td.conn.lookupByName(name).XMLDesc(0).encode())
    out: dict[str, str] = {}
    for disk in dom.iter("disk"):
        assert disk.get("type") == "file", etree.tostring(disk, encoding="unicode")
        dev, file = child(disk, "target").get("dev"), child(disk, "source").get("file")
        assert dev is not None and file is not None, etree.tostring(disk, encoding="unicode")
        out[dev] = file
    return out


def test_the_runbook_without_virtbackup_runs_as_written(
    domains: DomainFactory,
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    loops: list[str],
) -> None:
    td = domains.create(qcow2_sizes=[8 * MiB], start=False)
    add_block_disk(td, loop_device(td.workdir / "vdb.loop", 4 * MiB, loops), "vdb", 4 * MiB)
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: [{td.name}]\ndisks: {{raw: full}}\n"
    )
    records = []
    for i in range(2):  # a full, then an incremental (vda an overlay on the full's)
        qemu_io(td.disk("vda").path, f"write -P {0x41 + i} {i * 3 * MiB} {MiB + 4096}")
        qemu_io(td.disk("vdb").path, f"write -P {0x61 + i} {i * MiB} 256k", fmt="raw")
        records.append(run_cli(config, capsys, "backup", td.name))
    assert [r["level"] for r in records] == ["full", "incremental"]
    refs = {}
    for d in td.disks:  # the disks now: what the newest backup holds
        refs[d.target] = tmp_path / f"ref-{d.target}.raw"
        run("qemu-img", "convert", "-U", "-f", d.fmt, "-O", "raw", d.path, refs[d.target])
    domain_dir = Path(records[-1]["path"]).parent
    # A backup in progress, newer than every complete one: never a restore point.
    partial = domain_dir / "99991231T235959.999Z-ffff.partial"
    partial.mkdir()
    (partial / "manifest.json").write_text("{}")

    out = td.workdir / "restore"  # QEMU's user reaches the test bed's work folders
    device = loop_device(td.workdir / "device.loop", 6 * MiB, loops)
    new_name = f"{td.name}-rb"
    values = {
        "BACKUPS": str(domain_dir),
        "OUT": str(out),
        "NEW_NAME": new_name,
        "DISK": "vdb",
        "DEVICE": device,
    }
    blocks = runbook_blocks()
    assert len(blocks) >= 7, blocks
    script = with_settings(blocks[0], values) + "\n".join(blocks[1:])
    modes = {p: p.stat().st_mode for p in [tmp_path, *tmp_path.parents]}
    try:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, f"the runbook failed:\n{proc.stdout}\n{proc.stderr}"
        newest = records[-1]["id"]
        assert newest in proc.stdout and partial.name not in proc.stdout, proc.stdout

        # Step 5: a running domain on file disks (vdb was a block device).
        restored = td.conn.lookupByName(new_name)
        assert restored.isActive()
        assert file_disks(td, new_name) == {t: str(out / f"{t}.qcow2") for t in refs}
        restored.destroy()  # its images are compared next
        # Step 3 (and 4): standalone images equal to the disks.
        for target, ref in refs.items():
            qemu_img_compare(ref, out / f"{target}.qcow2", "raw", "qcow2")
            assert "backing-filename" not in qemu_img_info(out / f"{target}.qcow2")
        # Step 4: the block device holds the disk, and zeroes beyond it.
        qemu_img_compare(refs["vdb"], device, "raw", "raw")

        # Step 6: the live copy's images stand alone and equal the disks.
        live = td.conn.lookupByName(f"{new_name}-live")
        assert file_disks(td, f"{new_name}-live") == {
            t: str(out / "live" / f"{t}.qcow2") for t in refs
        }
        live.destroy()
        for target, ref in refs.items():
            image = out / "live" / f"{target}.qcow2"
            assert "backing-filename" not in qemu_img_info(image)
            qemu_img_compare(ref, image, "raw", "qcow2")
        # The backup is the backup's again: files root's, 0600; folders closed.
        for image in domain_dir.glob("*/*.qcow2"):
            st = image.stat()
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), image
        assert {p: p.stat().st_mode for p in modes} == modes
    finally:
        for name in (new_name, f"{new_name}-live"):
            remove_domain(td.conn, name)
