"""The on-disk format, the backup job and `verify` agree for every disk
kind, on a real libvirtd and QEMU, through the CLI: a raw file and a raw
block device under `raw: full` are copied whole into every incremental as a standalone image
(the manifest says so per disk), and every point of a running and of a
shut-off domain restores byte-identical and verifies; manifests written
before the per-disk field still verify; a prune keeps such an image
standalone. And the domain's next CLI `backup` finishes an interrupted
prune (docs/repository-format.md)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.block_disks import add_block_disk, loop_devices
from testbed.cli import run_cli
from testbed.domains import DomainFactory, GuestDomain, MiB
from testbed.guest import GuestWriter
from testbed.tools import qemu_img_compare, qemu_img_info
from virtbackupd.adapters.repository import MANIFEST, PRUNE_JOURNAL
from virtbackupd.adapters.store import Store
from virtbackupd.core.extents import covers, ranges_from_json
from virtbackupd.core.policy import Retention
from virtbackupd.engine.upkeep.prune import prune_domain

Refs = dict[str, dict[str, Path]]


def snapshot(td: GuestDomain, backup_id: str, tmp: Path, refs: Refs) -> None:
    refs[backup_id] = {}
    for d in td.data_disks:
        assert d.reference is not None
        copy = tmp / f"ref-{backup_id}-{d.target}.raw"
        shutil.copyfile(d.reference, copy)
        refs[backup_id][d.target] = copy


@pytest.fixture
def loops() -> Iterator[list[str]]:
    with loop_devices() as made:
        yield made


def write_point(td: GuestDomain, i: int, running: bool) -> None:
    """Guest writes (through QEMU: a shut-off domain is started for them
    and shut off again, so the backup is an offline one)."""
    if not running:
        td.start()
    guest = GuestWriter(td)
    guest.write("vda", i * 2 * MiB, MiB + i * 64 * 1024, 0x31 + i)
    guest.write("vdb", i * MiB + 4096, 256 * 1024, 0x51 + i)
    block = any(d.target == "vdc" for d in td.disks)
    if block:
        guest.write("vdc", (3 - i) * MiB, 128 * 1024, 0x71 + i)
    if i:
        guest.zero("vdb", 4096, 64 * 1024)
        if block:
            guest.zero("vdc", 3 * MiB, 64 * 1024)
    if not running:
        td.shutdown_hard()


def assert_every_point(
    config: Path, capsys: pytest.CaptureFixture[str], td: GuestDomain, refs: Refs, out: Path
) -> None:
    """`verify` exits 0 with every backup ok, and each restores (CLI)
    byte-identical to the reference at its time."""
    verdicts = run_cli(config, capsys, "verify", td.name)
    assert [v["backup"] for v in verdicts] == list(refs)
    assert all(v["ok"] and not v["notes"] for v in verdicts), verdicts
    for backup_id, disks in refs.items():
        to = out / backup_id
        run_cli(config, capsys, "restore", td.name, "--backup", backup_id, "--to", str(to))
        for disk, ref in disks.items():
            qemu_img_compare(ref, to / f"{disk}.qcow2", "raw", "qcow2")
        shutil.rmtree(to)


@pytest.mark.parametrize("running", [True, False], ids=["running", "shut-off"])
def test_raw_disk_copied_whole_into_incrementals_restores_and_verifies(
    domains: DomainFactory,
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    running: bool,
    loops: list[str],
) -> None:
    """vda: qcow2; vdb: a raw file; vdc: a raw block device."""
    td = domains.create(qcow2_sizes=[16 * MiB], raw_size=8 * MiB, start=False)
    add_block_disk(td, loops, 4 * MiB, discard=True)
    if running:
        td.start()
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: [{td.name}]\ndisks: {{raw: full}}\n"
    )
    refs: Refs = {}
    records = []
    for i in range(3):
        write_point(td, i, running)
        rec = run_cli(config, capsys, "backup", td.name)
        assert rec["level"] == ("full" if i == 0 else "incremental"), rec
        records.append(rec)
        snapshot(td, rec["id"], tmp_path, refs)
    ids = [r["id"] for r in records]
    assert_every_point(config, capsys, td, refs, tmp_path / "restored")

    for n, rec in enumerate(records):
        folder = Path(rec["path"])
        manifest = json.loads((folder / MANIFEST).read_text())
        by_disk = {d["name"]: d for d in manifest["disks"]}
        # vda is an overlay on its parent's image in an incremental; the
        # raw disks are copied whole every time: standalone images, said so.
        assert by_disk["vda"]["standalone"] is (n == 0)
        vda = qemu_img_info(folder / "vda.qcow2")
        assert vda.get("backing-filename") == (f"../{ids[n - 1]}/vda.qcow2" if n else None)
        for raw in ("vdb", "vdc"):
            assert by_disk[raw]["standalone"] is True
            assert "backing-filename" not in qemu_img_info(folder / f"{raw}.qcow2")
            # A whole copy answers for every byte: what lets a reader accept
            # a standalone image in a manifest written before the field.
            ranges = ranges_from_json(by_disk[raw]["ranges"])
            assert covers(ranges, by_disk[raw]["virtual_size"])

    # Manifests written before the per-disk field (older virtbackupd wrote
    # the same images): still verify.
    for rec in records:
        path = Path(rec["path"]) / MANIFEST
        data = json.loads(path.read_text())
        for d in data["disks"]:
            del d["standalone"]
        path.write_text(json.dumps(data))
    assert all(v["ok"] for v in run_cli(config, capsys, "verify", td.name))
    for rec in records:  # back as this version writes them
        path = Path(rec["path"]) / MANIFEST
        data = json.loads(path.read_text())
        for d in data["disks"]:
            d["standalone"] = d["name"] != "vda" or rec is records[0]
        path.write_text(json.dumps(data))

    # The chain limit makes the newest skip the middle backup: its vda is
    # rebased onto the full's, its raw disks' images stay standalone.
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: [{td.name}]\ndisks: {{raw: full}}\nchain: {{max_incrementals: 1}}\n"
    )
    done = run_cli(config, capsys, "prune", td.name)[0]
    assert done["operations"] == [f"rebase {ids[2]} onto {ids[0]} (taking over {ids[1]}'s bytes)"]
    newest = Path(records[2]["path"])
    assert qemu_img_info(newest / "vda.qcow2")["backing-filename"] == f"../{ids[0]}/vda.qcow2"
    assert "backing-filename" not in qemu_img_info(newest / "vdb.qcow2")
    assert "backing-filename" not in qemu_img_info(newest / "vdc.qcow2")
    m = json.loads((newest / MANIFEST).read_text())
    assert {d["name"]: d["standalone"] for d in m["disks"]} == {
        "vda": False,
        "vdb": True,
        "vdc": True,
    }
    assert_every_point(config, capsys, td, refs, tmp_path / "after-prune")


class Interrupted(BaseException):
    """Stands for the prune's process dying right after a step."""


def test_the_next_cli_backup_finishes_an_interrupted_prune(
    domains: DomainFactory, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Meanwhile verify says the prune is pending (exit 0); the backup
    finishes it first, and every backup then verifies plainly and restores
    byte-identical."""
    td = domains.create(qcow2_sizes=[16 * MiB], raw_size=8 * MiB)
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: [{td.name}]\ndisks: {{raw: full}}\n"
    )
    refs: Refs = {}
    records = []
    for i in range(3):
        write_point(td, i, running=True)
        records.append(run_cli(config, capsys, "backup", td.name))
        snapshot(td, records[-1]["id"], tmp_path, refs)
    ids = [r["id"] for r in records]
    domain_dir = Path(records[0]["path"]).parent

    def stop(label: str) -> None:
        # The full's merge with its child has taken the child's place; the
        # child's manifest does not say so yet.
        if label.startswith("moved"):
            raise Interrupted(label)

    async def prune() -> None:
        async with Store.open(config.parent / "state" / "state.db") as store:
            await prune_domain(store, domain_dir, Retention(keep_last=2), None, tmp_path, step=stop)

    with pytest.raises(Interrupted):
        asyncio.run(prune())
    assert (domain_dir / PRUNE_JOURNAL).exists()
    verdicts = run_cli(config, capsys, "verify", td.name)
    assert [v["backup"] for v in verdicts] == ids[1:]  # the full is being removed
    for v in verdicts:
        assert v["ok"] and "an interrupted prune is pending" in v["notes"][0], v

    write_point(td, 3, running=True)
    nxt = run_cli(config, capsys, "backup", td.name)
    snapshot(td, nxt["id"], tmp_path, refs)
    assert not (domain_dir / PRUNE_JOURNAL).exists()
    assert sorted(p.name for p in domain_dir.iterdir() if p.name[0] != ".") == [*ids[1:], nxt["id"]]
    assert nxt["level"] == "incremental" and nxt["parent"] == ids[2]
    listed = run_cli(config, capsys, "list", td.name)
    assert [(b["id"], b["parent"]) for b in listed] == [
        (ids[1], None),
        (ids[2], ids[1]),
        (nxt["id"], ids[2]),
    ]
    # The pruned full's checkpoint left libvirt with it (the domain runs).
    assert records[0]["checkpoint"] not in {c.getName() for c in td.dom.listAllCheckpoints(0)}
    del refs[ids[0]]
    assert_every_point(config, capsys, td, refs, tmp_path / "restored")


def test_a_backup_whose_prune_replay_fails_goes_on_and_says_so(
    domains: DomainFactory, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The replay fails (the pruned full's image is away); the backup is
    taken all the same and the error logged; once the image is back, the
    next backup finishes the prune and every point restores and verifies."""
    td = domains.create(qcow2_sizes=[16 * MiB])
    (config.parent / "policies" / "p.yaml").write_text(f"domains: [{td.name}]\n")
    refs: Refs = {}
    records = []
    for i in range(2):
        GuestWriter(td).write("vda", i * MiB, MiB, 0x21 + i)
        records.append(run_cli(config, capsys, "backup", td.name))
        snapshot(td, records[-1]["id"], tmp_path, refs)
    domain_dir = Path(records[0]["path"]).parent

    def stop(label: str) -> None:
        if label == "journal written":
            raise Interrupted(label)

    async def prune() -> None:
        async with Store.open(config.parent / "state" / "state.db") as store:
            await prune_domain(store, domain_dir, Retention(keep_last=1), None, tmp_path, step=stop)

    with pytest.raises(Interrupted):
        asyncio.run(prune())
    image = Path(records[0]["path"]) / "vda.qcow2"
    image.rename(tmp_path / "away.qcow2")
    GuestWriter(td).write("vda", 5 * MiB, MiB, 0x31)
    capsys.readouterr()
    from virtbackupd.cli.main import main as cli

    assert cli(["-c", str(config), "--json", "backup", td.name]) == 0
    out, err = capsys.readouterr()
    taken = json.loads(out)
    snapshot(td, taken["id"], tmp_path, refs)
    assert "could not finish the interrupted prune; backing up anyway" in err, err
    # Named by the chain check before any helper runs (the pruned full's image).
    assert f"{records[0]['id']}/vda.qcow2: cannot open: No such file" in err, err
    assert (domain_dir / PRUNE_JOURNAL).exists()

    (tmp_path / "away.qcow2").rename(image)
    GuestWriter(td).write("vda", 6 * MiB, MiB, 0x41)
    last = run_cli(config, capsys, "backup", td.name)
    snapshot(td, last["id"], tmp_path, refs)
    assert not (domain_dir / PRUNE_JOURNAL).exists()
    del refs[records[0]["id"]]
    assert_every_point(config, capsys, td, refs, tmp_path / "restored")
