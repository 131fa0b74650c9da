"""Restore and verify against a real libvirtd and QEMU: every point of a
chain restores byte-identical to the reference taken at that point, a
flipped byte is named by verify, `--define` makes a domain that starts, and
`--in-place` writes over a shut-off domain and makes the next backup full."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from testbed.cli import run_cli
from testbed.domains import PREFIX, DomainFactory, GuestDomain, MiB, remove_domain
from testbed.guest import GuestWriter
from testbed.tools import flip_byte, qemu_img_compare, qemu_img_info
from virtbackupd.cli.main import main as cli

Snapshots = dict[str, dict[str, Path]]  # backup id -> disk -> reference copy


def snapshot(td: GuestDomain, backup_id: str, tmp: Path, refs: Snapshots) -> None:
    refs[backup_id] = {}
    for d in td.data_disks:
        assert d.reference is not None
        copy = tmp / f"ref-{backup_id}-{d.target}.raw"
        shutil.copyfile(d.reference, copy)
        refs[backup_id][d.target] = copy


def take(
    config: Path, capsys: pytest.CaptureFixture[str], td: GuestDomain, *extra: str
) -> dict[str, Any]:
    record: dict[str, Any] = run_cli(config, capsys, "backup", td.name, *extra)
    assert record["status"] == "complete"
    return record


def test_every_point_of_a_chain_restores_and_verify_names_a_flipped_byte(
    domains: DomainFactory, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    td = domains.create(qcow2_sizes=[24 * MiB, 8 * MiB])
    (config.parent / "policies" / "p.yaml").write_text(f"domains: [{td.name}]\n")
    guest = GuestWriter(td)
    refs: Snapshots = {}
    ids = []
    # Before each backup: the guest's writes, in order.
    writes: list[list[Callable[[], None]]] = [
        [lambda: guest.write("vda", 0, 2 * MiB, 0x10), lambda: guest.write("vdb", MiB, MiB, 0x11)],
        [lambda: guest.write("vda", MiB, 128 * 1024, 0x20)],
        [lambda: guest.zero("vda", 0, 512 * 1024), lambda: guest.write("vdb", 4 * MiB, MiB, 0x31)],
        [lambda: guest.discard("vdb", MiB, 512 * 1024)],
        [lambda: guest.write("vda", 20 * MiB, 4 * MiB, 0x50)],
        [
            lambda: guest.write("vda", 0, 64 * 1024, 0x60),
            lambda: guest.write("vdb", 7 * MiB, MiB, 0x61),
        ],
    ]
    for i, step in enumerate(writes):
        for write in step:
            write()
        record = take(config, capsys, td)
        assert record["level"] == ("full" if i == 0 else "incremental")
        ids.append(record["id"])
        snapshot(td, record["id"], tmp_path, refs)

    # Every point, each disk, both formats: byte-identical to its reference.
    for i, backup_id in enumerate(ids):
        fmt = "raw" if i % 2 == 0 else "qcow2"
        out_dir = tmp_path / f"restore-{i}"
        result = run_cli(
            config,
            capsys,
            "restore",
            td.name,
            "--backup",
            backup_id,
            "--to",
            str(out_dir),
            "--format",
            fmt,
        )
        assert result["backup"] == backup_id
        for disk in ("vda", "vdb"):
            image = out_dir / f"{disk}.{fmt}"
            info = qemu_img_info(image)
            assert "backing-filename" not in info
            # Sparse: holes were never written (vda holds at most ~6 MiB of data).
            assert image.stat().st_blocks * 512 < info["virtual-size"] // 2
            qemu_img_compare(refs[backup_id][disk], image, "raw", fmt)
        shutil.rmtree(out_dir)

    # --at picks the newest backup started at or before the time; one disk only.
    listed = run_cli(config, capsys, "list", td.name)
    third = listed[2]
    out_dir = tmp_path / "at"

    def restore_vdb(*extra: str, expect: int = 0) -> None:
        run_cli(
            config, capsys, "restore", td.name, "--disk", "vdb", "--to", str(out_dir),
            "--format", "raw", *extra, expect=expect,
        )  # fmt: skip

    restore_vdb("--at", third["finished"])
    assert sorted(p.name for p in out_dir.iterdir()) == ["vdb.raw"]
    qemu_img_compare(refs[third["id"]]["vdb"], out_dir / "vdb.raw", "raw", "raw")
    # An existing file is not overwritten without --force.
    restore_vdb(expect=1)
    qemu_img_compare(refs[third["id"]]["vdb"], out_dir / "vdb.raw", "raw", "raw")
    restore_vdb("--force")
    qemu_img_compare(refs[ids[-1]]["vdb"], out_dir / "vdb.raw", "raw", "raw")
    # A disk the backup does not have is bad input (docs/cli.md: exit 2).
    run_cli(config, capsys, "restore", td.name, "--disk", "vdz", "--to", str(out_dir), expect=2)

    # Everything verifies; then one flipped byte in the middle of the chain
    # is found and named: its disk fails, every backup restoring through it
    # fails naming it, the older ones stay good.
    verdicts = run_cli(config, capsys, "verify", td.name)
    assert [v["backup"] for v in verdicts] == ids
    assert all(v["ok"] for v in verdicts), verdicts
    middle = Path(listed[2]["path"]) / "vdb.qcow2"
    flip_byte(middle, 4 * MiB + 4096)
    verdicts = run_cli(config, capsys, "verify", td.name, expect=1)
    bad = [(v["backup"], d["disk"]) for v in verdicts for d in v["disks"] if not d["ok"]]
    assert bad == [(ids[2], "vdb")]
    problems = next(d for v in verdicts for d in v["disks"] if not d["ok"])["problems"]
    assert any("digest differs" in p for p in problems), problems
    assert [v["ok"] for v in verdicts] == [True, True, False, False, False, False]
    assert all(v["damaged_ancestors"] == [ids[2]] for v in verdicts[3:]), verdicts
    only_full = run_cli(config, capsys, "verify", "--backup", ids[0])
    assert only_full[0]["ok"]
    newest = run_cli(config, capsys, "verify", "--backup", ids[-1], expect=1)
    assert any(ids[2] in p for p in newest[0]["problems"]), newest
    # A restore through the damaged image refuses, naming backup and disk;
    # --allow-damaged writes what can be read.
    out_dir = tmp_path / "damaged"
    capsys.readouterr()
    assert cli(["-c", str(config), "restore", td.name, "--to", str(out_dir)]) == 1
    err = capsys.readouterr().err
    assert f"backup {ids[2]} disk vdb" in err, err
    assert not out_dir.exists() or not list(out_dir.iterdir())  # all or nothing
    run_cli(config, capsys, "restore", td.name, "--to", str(out_dir), "--allow-damaged")
    qemu_img_compare(refs[ids[-1]]["vda"], out_dir / "vda.qcow2", "raw", "qcow2")


def test_define_makes_a_new_domain_that_starts_and_in_place_restores_a_shut_off_one(
    domains: DomainFactory,
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    libvirt_conn: libvirt.virConnect,
) -> None:
    td = domains.create(qcow2_sizes=[16 * MiB], raw_size=4 * MiB)
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: [{td.name}]\ndisks: {{raw: full}}\n"
    )
    guest = GuestWriter(td)
    refs: Snapshots = {}
    guest.write("vda", 0, MiB, 0x71)
    guest.write("vdb", 0, MiB, 0x72)
    first = take(config, capsys, td)
    snapshot(td, first["id"], tmp_path, refs)
    guest.write("vda", 2 * MiB, MiB, 0x73)
    second = take(config, capsys, td)
    snapshot(td, second["id"], tmp_path, refs)

    name = f"{td.name}-copy"
    images = td.workdir / "copy"
    try:
        out = run_cli(config, capsys, "restore", td.name, "--to", str(images), "--define", name)
        assert out["defined"]["name"] == name
        new = libvirt_conn.lookupByName(name)
        assert new.UUIDString() != td.dom.UUIDString()
        xml = new.XMLDesc(0)
        assert str(images / "vda.qcow2") in xml and str(images / "vdb.qcow2") in xml
        assert new.listAllCheckpoints(0) == []
        new.create()  # it starts
        assert new.isActive()
        new.destroy()
        # Defining over an existing domain needs --force: refused as bad
        # input before a byte is copied.
        run_cli(
            config,
            capsys,
            "restore",
            td.name,
            "--to",
            str(tmp_path / "again"),
            "--define",
            name,
            expect=2,
        )
        assert not (tmp_path / "again").exists() or not any((tmp_path / "again").iterdir())
    finally:
        if name.startswith(PREFIX):
            remove_domain(libvirt_conn, name)

    # In place: refused while running; once shut off, the disks become the
    # first backup's content and the checkpoints go, so the next is full.
    run_cli(config, capsys, "restore", td.name, "--backup", first["id"], "--in-place", expect=1)
    td.shutdown_hard()
    run_cli(config, capsys, "restore", td.name, "--backup", first["id"], "--in-place")
    for d in td.data_disks:
        qemu_img_compare(refs[first["id"]][d.target], d.path, "raw", d.fmt)
    assert td.dom.listAllCheckpoints(0) == []
    bitmaps = qemu_img_info(td.disk("vda").path).get("format-specific", {}).get("data", {})
    assert not bitmaps.get("bitmaps")
    td.start()
    after = take(config, capsys, td)
    assert after["level"] == "full"  # of the first backup's content, restored in place

    # A domain gone from libvirt is restored as a new one all the same.
    td.dom.destroy()
    td.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    back = f"{td.name}-back"
    try:
        out = run_cli(
            config, capsys, "restore", td.name, "--to", str(td.workdir / "back"), "--define", back
        )
        assert out["defined"]["name"] == back
        qemu_img_compare(
            refs[first["id"]]["vda"], td.workdir / "back" / "vda.qcow2", "raw", "qcow2"
        )
    finally:
        remove_domain(libvirt_conn, back)
