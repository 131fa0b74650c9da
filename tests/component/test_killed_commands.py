"""`virtbackup` commands SIGKILLed at random instants (testbed.faults):
no helper process outlives the command that started it, the next command
removes the dead command's export folders and works (no image lock in its
way), and the backups still restore byte-identical to their references.

Repositories are built without libvirt (testbed.repo_builder); the
commands run as real processes with real qemu-nbd/qemu-img. The config
names libvirt's test driver, so a prune finds no domain there and leaves
checkpoints alone, as it does when libvirtd is away.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from testbed.faults import (
    Cli,
    assert_no_helpers,
    export_folders,
    fault_rng,
    iterations,
    kill_at,
)
from testbed.repo_builder import BuiltDomain, MiB
from testbed.tools import qemu_img_compare, run
from virtbackupd.adapters import qemu_nbd
from virtbackupd.adapters.store import Store


def built(tmp: Path, n: int = 5) -> tuple[BuiltDomain, Cli]:
    """n backups of two disks, each overwriting part of what the one
    before wrote (so that a merge reads the layers through qemu-nbd), and
    a config whose policy keeps the last two."""
    b = BuiltDomain(tmp, {"vda": 24 * MiB, "vdb": 8 * MiB})

    async def backups() -> None:
        async with Store.open(b.state_db) as store:
            for i in range(n):
                b.write("vda", i * MiB, 6 * MiB, 0x30 + i)
                b.write("vdb", (i % 4) * MiB, MiB + i * 4096, 0x60 + i)
                await b.backup(store)

    asyncio.run(backups())
    (tmp / "policies").mkdir()
    (tmp / "policies" / "p.yaml").write_text(f"domains: [{b.name}]\nretention: {{keep_last: 2}}\n")
    config = tmp / "virtbackupd.yaml"
    config.write_text(
        "state_dir: state\nbackup_root: repo\nruntime_dir: run\nscratch_dir: scratch\n"
        "policy_dirs: [policies]\nlibvirt_uri: 'test:///default'\n"
    )
    return b, Cli(config)


def restores_identical(b: BuiltDomain, cli: Cli, ids: list[str], out: Path) -> None:
    """`virtbackup restore` of each backup equals its reference, disk by disk."""
    for backup_id in ids:
        target = out / backup_id
        shutil.rmtree(target, ignore_errors=True)
        cli.run("restore", b.name, "--backup", backup_id, "--to", str(target))
        for disk, ref in b.refs[backup_id].items():
            qemu_img_compare(ref, target / f"{disk}.qcow2", "raw", "qcow2")


def verify_agrees(b: BuiltDomain, cli: Cli, ids: list[str]) -> None:
    """`verify` passes every backup that restored byte-identical."""
    verdicts = {v["backup"]: v for v in cli.json("verify", b.name)}
    for backup_id in ids:
        assert verdicts[backup_id]["ok"], verdicts[backup_id]


def no_folders_left(b: BuiltDomain, about: object) -> None:
    """Run after the next command: no export folder of anyone is left (no
    command is running any more)."""
    left = export_folders(b.runtime)
    assert not left, f"{about}: the next command left the dead one's folders: {left}"


def test_a_restore_killed_at_random_leaves_no_helper_and_no_folder(tmp_path: Path) -> None:
    b, cli = built(tmp_path, 3)
    newest = b.ids[-1]
    args = ("restore", b.name, "--backup", newest, "--to")
    normal = cli.duration(*args, str(tmp_path / "first"))
    rng = fault_rng("restore")
    for i in range(iterations(5)):
        kill = kill_at(cli, (*args, str(tmp_path / f"killed-{i}")), rng.uniform(0, normal))
        assert_no_helpers([tmp_path], kill)
        restores_identical(b, cli, [newest], tmp_path / "again")  # the next command
        no_folders_left(b, kill)
    verify_agrees(b, cli, b.ids)


def test_a_prune_killed_at_random_leaves_no_helper_and_no_folder(tmp_path: Path) -> None:
    """The helper and folder invariants, and the next prune is not stopped
    by a lock. (Whether the kept backups then restore is the business of
    test_a_prune_killed_at_random_keeps_every_backup_restorable.)"""
    b, cli = built(tmp_path)
    pristine = tmp_path / "pristine"
    for part in ("repo", "state"):
        shutil.copytree(tmp_path / part, pristine / part)
    normal = cli.duration("prune", b.name)
    rng = fault_rng("prune")
    for _ in range(iterations(5)):
        for part in ("repo", "state"):
            shutil.rmtree(tmp_path / part)
            shutil.copytree(pristine / part, tmp_path / part)
        kill = kill_at(cli, ("prune", b.name), rng.uniform(0, normal))
        assert_no_helpers([tmp_path], kill)
        cli.run("prune", b.name)  # the next command: it finishes what the killed one began
        no_folders_left(b, kill)


@pytest.mark.timeout(900)
def test_a_prune_killed_at_random_keeps_every_backup_restorable(tmp_path: Path) -> None:
    """After each kill and the prune that finishes it, every backup `list`
    calls complete restores byte-identical to its reference, and verify
    agrees."""
    b, cli = built(tmp_path)
    pristine = tmp_path / "pristine"
    for part in ("repo", "state"):
        shutil.copytree(tmp_path / part, pristine / part)
    normal = cli.duration("prune", b.name)
    rng = fault_rng("prune, full invariants")
    for i in range(iterations(4)):
        for part in ("repo", "state"):
            shutil.rmtree(tmp_path / part)
            shutil.copytree(pristine / part, tmp_path / part)
        kill = kill_at(cli, ("prune", b.name), rng.uniform(0, normal))
        assert_no_helpers([tmp_path], kill)
        listed = [x["id"] for x in cli.json("list", b.name) if x["state"] == "complete"]
        restores_identical(b, cli, listed, tmp_path / f"r{i}")
        verify_agrees(b, cli, listed)
        cli.run("prune", b.name)
        listed = [x["id"] for x in cli.json("list", b.name) if x["state"] == "complete"]
        assert listed == b.ids[-2:], kill
        restores_identical(b, cli, listed, tmp_path / f"r{i}")
        verify_agrees(b, cli, listed)


def test_a_reindex_killed_at_random_loses_nothing(tmp_path: Path) -> None:
    b, cli = built(tmp_path, 3)
    normal = cli.duration("reindex")
    rng = fault_rng("reindex")
    for _ in range(iterations(4)):
        for f in b.state_db.parent.glob("state.db*"):
            f.unlink()
        kill = kill_at(cli, ("reindex",), rng.uniform(0, normal))
        assert_no_helpers([tmp_path], kill)
        cli.run("reindex")
        no_folders_left(b, kill)
        listed = [x["id"] for x in cli.json("list", b.name) if x["state"] == "complete"]
        assert listed == b.ids, kill
    restores_identical(b, cli, b.ids, tmp_path / "restored")
    verify_agrees(b, cli, b.ids)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def exec_done(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"qemu-nbd")
    except OSError:
        return False


def serve_in_child(image: Path, runtime: Path) -> int:
    """A forked process that exports `image` with qemu_nbd.serve and waits."""

    async def serve() -> None:
        async with qemu_nbd.serve(image, runtime_dir=runtime):
            await asyncio.sleep(3600)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            asyncio.run(serve())
        finally:
            os._exit(3)
    return pid


def test_a_process_killed_while_its_qemu_nbd_starts_leaves_no_qemu_nbd(tmp_path: Path) -> None:
    """qemu-nbd loses a SIGTERM that comes in its first milliseconds (it
    then serves for ever, holding its image's lock): the owner is killed
    at a random instant of that start-up, many times."""
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, str(16 * MiB))
    runtime = tmp_path / "run"
    rng = fault_rng("qemu-nbd start-up")
    for _ in range(iterations(30)):
        owner = serve_in_child(image, runtime)
        deadline = time.monotonic() + 60
        while not any(exec_done(c) for c in children(owner)):
            assert time.monotonic() < deadline, "no qemu-nbd started"
            time.sleep(0.0002)
        after = rng.uniform(0, 0.015)
        time.sleep(after)
        os.kill(owner, signal.SIGKILL)
        os.waitpid(owner, 0)
        assert_no_helpers(
            [runtime], f"the owner killed {after * 1000:.1f} ms into qemu-nbd's start"
        )


def loops_under(top: Path) -> list[str]:
    out = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if str(top) in backing.read_text():
            out.append(backing.parent.parent.name)
    return out


def mounts_under(top: Path) -> list[str]:
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(top) in line.split()[4]
    ]


def test_a_filesystem_check_killed_at_random_leaves_no_helper_mount_or_device(
    tmp_path: Path,
) -> None:
    """`verify --filesystems` exports the backup through qemu-storage-daemon
    (FUSE) and loop devices: killed, it leaves no daemon; the next command
    unmounts the dead exports, detaches the devices, removes the folder."""
    b = BuiltDomain(tmp_path, {"vda": 32 * MiB})
    raw = tmp_path / "fs.raw"
    run("truncate", "-s", str(32 * MiB), raw)
    run("mkfs.ext4", "-q", "-F", raw)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raw, b.source("vda"))

    async def backup() -> None:
        async with Store.open(b.state_db) as store:
            await b.backup(store)

    asyncio.run(backup())
    config = tmp_path / "virtbackupd.yaml"
    config.write_text("state_dir: state\nbackup_root: repo\nruntime_dir: run\n")
    cli = Cli(config)
    args = ("verify", b.name, "--filesystems")
    normal = cli.duration(*args)
    rng = fault_rng("verify --filesystems")
    for _ in range(iterations(4)):
        kill = kill_at(cli, args, rng.uniform(0, normal))
        assert_no_helpers([tmp_path], kill)
        found = cli.json(*args)  # the next command
        assert found[0]["filesystems"][0]["ok"], found
        assert not list((b.runtime / "fscheck").glob("*")), kill
        assert not loops_under(tmp_path), kill
        assert not mounts_under(tmp_path), kill
