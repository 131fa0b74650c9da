"""Prune of a SHUT-OFF domain (issue 24): the pruned backups' libvirt
checkpoints and the qcow2 bitmaps in the disk images go, as for a running
domain (they piled up, and `checkpoints` called them active); `checkpoints`
shows what is left without calling anything MISSING; the next incremental
still restores byte-identical (qemu-img compare); and after `restore
--in-place` the next full's reason names the restore, not a crash. The
domain never runs: the guest writes are qemu-io on the shut-off images
(the bitmaps record them as they would a guest's)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.block_disks import add_block_disk, loop_devices
from testbed.cli import run_cli
from testbed.domains import DomainFactory, GuestDomain, MiB
from testbed.tools import qemu_img_compare, qemu_img_info, qemu_io, run
from virtbackupd.cli.main import main as cli


@pytest.fixture
def loops() -> Iterator[list[str]]:
    with loop_devices() as made:
        yield made


def write(td: GuestDomain, i: int) -> None:
    """Different writes to every disk while the domain is off."""
    qemu_io(td.disk("vda").path, f"write -P {0x31 + i} {(i % 3) * 2 * MiB} {MiB + i * 4096}")
    if i:
        qemu_io(td.disk("vda").path, f"write -z {((i - 1) % 3) * 2 * MiB} 64k")
    for d in td.disks:
        if d.fmt == "raw":
            qemu_io(d.path, f"write -P {0x71 + i} {(i % 6) * 512 * 1024} 128k", fmt="raw")


def snapshot(td: GuestDomain, tag: str, tmp: Path) -> dict[str, Path]:
    """Raw copies of every disk as it is now: the reference to compare with."""
    refs = {}
    for d in td.disks:
        ref = tmp / f"ref-{tag}-{d.target}.raw"
        run("qemu-img", "convert", "-U", "-f", d.fmt, "-O", "raw", d.path, ref)
        refs[d.target] = ref
    return refs


def libvirt_checkpoints(td: GuestDomain) -> set[str]:
    return {c.getName() for c in td.dom.listAllCheckpoints(0)}


def bitmaps(image: Path) -> set[str]:
    specific = qemu_img_info(image)["format-specific"]["data"]
    return {b["name"] for b in specific.get("bitmaps", [])}


def policy(config: Path, td: GuestDomain, retention: str) -> None:
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: [{td.name}]\ndisks: {{raw: full}}\nretention: {{{retention}}}\n"
    )


def test_prune_of_a_shut_off_domain_removes_its_checkpoints_and_bitmaps(
    domains: DomainFactory,
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    loops: list[str],
) -> None:
    td = domains.create(qcow2_sizes=[8 * MiB], start=False)
    add_block_disk(td, loops, 4 * MiB, "vdb", reference=False)
    vda = td.disk("vda").path
    policy(config, td, "")  # no rule yet: everything is kept
    records = []
    for i in range(4):
        write(td, i)
        records.append(run_cli(config, capsys, "backup", td.name))
    assert [r["level"] for r in records] == ["full"] + ["incremental"] * 3
    cps = [r["checkpoint"] for r in records]
    assert libvirt_checkpoints(td) == set(cps) and bitmaps(vda) == set(cps)

    policy(config, td, "keep_last: 2")
    out = run_cli(config, capsys, "prune", td.name)[0]
    assert sorted(out["removed_checkpoints"]) == sorted(cps[:2]), out
    assert libvirt_checkpoints(td) == set(cps[2:])  # virsh checkpoint-list
    assert bitmaps(vda) == set(cps[2:])  # qemu-img info
    assert not td.dom.isActive()

    # `checkpoints`: the pruned ones are shown as pruned, nothing is MISSING.
    rows = {r["name"]: r for r in run_cli(config, capsys, "checkpoints", td.name)}
    assert {n: rows[n]["store"] for n in cps} == {
        **dict.fromkeys(cps[:2], "pruned"),
        **dict.fromkeys(cps[2:], "active"),
    }
    capsys.readouterr()
    assert cli(["-c", str(config), "checkpoints", td.name]) == 0
    text = capsys.readouterr().out
    assert "MISSING" not in text and "pruned" in text, text

    # The chain goes on: the next incremental restores byte-identical.
    write(td, 4)
    refs = snapshot(td, "after-prune", tmp_path)
    rec = run_cli(config, capsys, "backup", td.name)
    assert rec["level"] == "incremental" and rec["parent"] == records[-1]["id"], rec
    to = tmp_path / "restored"
    run_cli(config, capsys, "restore", td.name, "--backup", rec["id"], "--to", str(to))
    for disk, ref in refs.items():
        qemu_img_compare(ref, to / f"{disk}.qcow2", "raw", "qcow2")
    shutil.rmtree(to)

    # After `restore --in-place` the next backup is full, and says why.
    run_cli(
        config, capsys, "restore", td.name, "--backup", rec["id"], "--in-place", "--disk", "vda"
    )
    assert libvirt_checkpoints(td) == set() and bitmaps(vda) == set()
    rows = run_cli(config, capsys, "checkpoints", td.name)
    assert {r["store"] for r in rows if r["name"] == rec["checkpoint"]} == {"overwritten"}
    full = run_cli(config, capsys, "backup", td.name)
    assert full["level"] == "full", full
    manifest = json.loads((Path(full["path"]) / "manifest.json").read_text())
    assert "restored in place" in manifest["reason"], manifest["reason"]
    assert "crash" not in manifest["reason"]
