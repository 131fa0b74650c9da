"""Pruning repositories built without libvirt (testbed.repo_builder): a
prune interrupted after every one of its steps loses no kept point, the
chain limit is met by merging instead of a new full backup, and a damaged
layer is never merged. The CLI and libvirt side of pruning is
tests/integration/test_prune.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest

from testbed.repo_builder import BuiltDomain, MiB
from testbed.tools import flip_byte, qemu_img_compare
from virtbackupd.adapters.repository import PRUNE_JOURNAL, Hold, HoldKind, read_pieces
from virtbackupd.adapters.store import Store
from virtbackupd.core.extents import Piece
from virtbackupd.core.merge_plan import Op
from virtbackupd.core.policy import Retention
from virtbackupd.core.records import BackupStatus, DiskRecord
from virtbackupd.engine.upkeep.merge_digests import merge_reads
from virtbackupd.engine.upkeep.prune import prune_domain
from virtbackupd.engine.upkeep.verify import verify_backup
from virtbackupd.errors import PruneError


async def chain(tmp: Path, n: int) -> BuiltDomain:
    """A full and n-1 incrementals, each after different writes."""
    b = BuiltDomain(tmp, {"vda": 16 * MiB, "vdb": 8 * MiB})
    async with Store.open(b.state_db) as store:
        for i in range(n):
            b.write("vda", (i % 4) * 4 * MiB, MiB + i * 64 * 1024, 0x30 + i)
            if i % 2:
                b.zero("vda", (i % 4) * 4 * MiB, 256 * 1024)
            b.write("vdb", i * MiB, 512 * 1024, 0x60 + i)
            await b.backup(store)
    return b


def assert_points_restore(b: BuiltDomain, ids: list[str]) -> None:
    """Each kept backup's chain reads exactly like the reference at its
    time (plain qemu-img, following the backing files)."""
    for backup_id in ids:
        for disk, ref in b.refs[backup_id].items():
            qemu_img_compare(ref, b.image(backup_id, disk), "raw", "qcow2")


class Interrupted(BaseException):
    """Stands for the process dying right after a step."""


async def test_prune_interrupted_after_every_step_loses_nothing(tmp_path: Path) -> None:
    b = await chain(tmp_path, 5)
    ids, domain_dir = b.ids, b.repo.domain_dir(b.uuid)
    kept = ids[2:]

    def stop_at_new_step(crashed: list[str]) -> Callable[[str], None]:
        """Die right after the first step no earlier run died after."""

        def hook(label: str) -> None:
            if label not in crashed:
                crashed.append(label)
                raise Interrupted(label)

        return hook

    crashed: list[str] = []
    for _ in range(100):
        try:
            async with Store.open(b.state_db) as store:
                await prune_domain(
                    store,
                    domain_dir,
                    Retention(keep_last=3),
                    1,  # chain limit: the newest ends one overlay above its base
                    b.runtime,
                    step=stop_at_new_step(crashed),
                )
        except Interrupted:
            assert_points_restore(b, kept)
            continue
        break
    # Died once after every step: journal, each standalone copy, move, rebase,
    # manifest, hide, removal, the store update and dropping the journal.
    kinds = {label.split()[0] for label in crashed}
    assert kinds == {"journal", "moved", "manifest", "rebased", "hid", "removed",
                     "store"}, crashed  # fmt: skip
    assert len(crashed) >= 13, crashed  # a merge's disks switch at once: one step per layer
    assert not (domain_dir / PRUNE_JOURNAL).exists()
    assert sorted(p.name for p in domain_dir.iterdir() if p.name[0] != ".") == kept
    assert_points_restore(b, kept)
    async with Store.open(b.state_db) as store:
        listed = await store.backups(b.uuid, status=BackupStatus.COMPLETE)
    # ids[4] skipped ids[3] to meet the chain limit: both now build on ids[2].
    assert [(r.id, r.parent) for r in listed] == [(ids[2], None), (ids[3], ids[2]),
                                                   (ids[4], ids[2])]  # fmt: skip
    for backup_id in kept:
        assert (await verify_backup(b.folder(backup_id), b.runtime)).ok


async def test_chain_limit_is_met_by_merging_not_by_a_new_full(tmp_path: Path) -> None:
    b = await chain(tmp_path, 5)
    async with Store.open(b.state_db) as store:
        await prune_domain(store, b.repo.domain_dir(b.uuid), Retention(), 2, b.runtime)
        parents = {r.id: r.parent for r in await store.backups(b.uuid)}
    depth, cur = 0, b.ids[-1]
    while (up := parents[cur]) is not None:
        depth, cur = depth + 1, up
    assert depth == 2
    assert_points_restore(b, b.ids)  # nothing was lost
    for backup_id in b.ids:
        assert (await verify_backup(b.folder(backup_id), b.runtime)).ok


async def test_a_damaged_layer_is_never_merged(tmp_path: Path) -> None:
    """A merge re-hashes only the grid cells the merged layers share, and
    checks first what it reads there: damage in such a cell stops the
    prune before anything changes, naming the damaged layer."""
    for damaged_one, where in ((0, 100), (1, MiB + 600 * 1024)):
        b = await shared_cell_chain(tmp_path / f"case{damaged_one}")
        flip_byte(b.image(b.ids[damaged_one], "vda"), where)
        async with Store.open(b.state_db) as store:
            with pytest.raises(PruneError, match=f"backup {b.ids[damaged_one]} disk vda"):
                await prune_domain(
                    store, b.repo.domain_dir(b.uuid), Retention(keep_last=1), None, b.runtime
                )
        assert not (b.repo.domain_dir(b.uuid) / PRUNE_JOURNAL).exists()
        assert sorted(s.manifest.id for s in b.repo.backups(b.uuid)) == b.ids


async def test_damage_in_a_pruned_layer_stops_the_merge_by_name(tmp_path: Path) -> None:
    """Damage in a piece of a pruned layer the merge does not re-hash (its
    hash is carried over into the kept backup) stops the prune before
    anything changes, naming the damaged layer: the damaged original is
    never deleted, and the kept backup never blamed (issue 22, item 11)."""
    b = await shared_cell_chain(tmp_path)
    flip_byte(b.image(b.ids[0], "vda"), 2 * MiB + 100)  # a cell only the full holds
    domain_dir = b.repo.domain_dir(b.uuid)
    async with Store.open(b.state_db) as store:
        with pytest.raises(PruneError, match=f"backup {b.ids[0]} disk vda does not match"):
            await prune_domain(store, domain_dir, Retention(keep_last=1), None, b.runtime)
    assert not (domain_dir / PRUNE_JOURNAL).exists()
    assert sorted(s.manifest.id for s in b.repo.backups(b.uuid)) == b.ids
    kept = b.ids[-1]
    assert (await verify_backup(b.folder(kept), b.runtime)).layer_ok
    bad = await verify_backup(b.folder(b.ids[0]), b.runtime)
    assert not bad.ok


async def shared_cell_chain(tmp: Path) -> BuiltDomain:
    """A full with 3 MiB of data, then incrementals writing inside its
    first 2 MiB cell (shared: the merge reads it) and elsewhere."""
    b = BuiltDomain(tmp, {"vda": 16 * MiB})
    async with Store.open(b.state_db) as store:
        b.write("vda", 0, 3 * MiB, 0x41)
        await b.backup(store)
        b.write("vda", MiB + 512 * 1024, 256 * 1024, 0x42)
        await b.backup(store)
        b.write("vda", 8 * MiB, MiB, 0x43)
        await b.backup(store)
    return b


async def test_a_held_backup_and_its_chain_stay_untouched(tmp_path: Path) -> None:
    """A hold (a live restore or a mount reading backup 2) keeps backups
    1 and 2 byte for byte, files and all, whatever retention and the chain
    limit say; once it is released the same prune takes them."""
    b = await chain(tmp_path, 4)
    held = b.ids[1]
    hold = Hold("mount-test", HoldKind.MOUNT, b.uuid, held, datetime.now(UTC), "mounted on /mnt/x")
    b.repo.add_hold(hold)
    before = {
        i: {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in b.folder(i).iterdir()}
        for i in b.ids[:2]
    }
    domain_dir = b.repo.domain_dir(b.uuid)
    async with Store.open(b.state_db) as store:
        result = await prune_domain(store, domain_dir, Retention(keep_last=1), 1, b.runtime)
        kept = {v.id: v.reasons for v in result.verdicts if v.keep}
        assert set(kept) == {b.ids[0], b.ids[1], b.ids[3]}
        assert kept[held] == ("held: mounted on /mnt/x",)
        assert kept[b.ids[0]] == ("held: mounted on /mnt/x",)  # the held one's parent
        for i in b.ids[:2]:
            now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in b.folder(i).iterdir()}
            assert now == before[i], f"backup {i} was rewritten while held"
        assert_points_restore(b, [b.ids[0], b.ids[1], b.ids[3]])
        b.repo.drop_hold(hold)
        result = await prune_domain(store, domain_dir, Retention(keep_last=1), 1, b.runtime)
    assert [s.manifest.id for s in b.repo.backups(b.uuid)] == [b.ids[3]]
    assert_points_restore(b, [b.ids[3]])


async def test_a_merge_reads_only_the_cells_both_layers_hold(tmp_path: Path) -> None:
    """What prune reads back follows what it merges: incrementals of whole
    grid cells merge into a full without a byte read; an incremental
    writing inside a cell of the full's data reads that one cell."""
    whole = BuiltDomain(tmp_path / "whole", {"vda": 64 * MiB})
    async with Store.open(whole.state_db) as store:
        whole.write("vda", 0, 24 * MiB, 0x41)  # the full's data: 12 cells
        await whole.backup(store)
        for i in range(3):
            whole.write("vda", 32 * MiB + i * 2 * MiB, 2 * MiB, 0x50 + i)
            await whole.backup(store)
    shared = await shared_cell_chain(tmp_path / "shared")
    for b, want in ((whole, {}), (shared, {(shared.ids[1], "vda"): [(0, 2 * MiB)]})):
        ops = await plan_only(b, Retention(keep_last=1))
        manifests = {s.manifest.id: s.manifest for s in b.repo.backups(b.uuid)}
        domain_dir = b.repo.domain_dir(b.uuid)
        got = merge_reads(
            ops, manifests, partial(lambda top, i, d: read_pieces(top / i, d), domain_dir)
        )
        assert got == want, ops
        async with Store.open(b.state_db) as store:
            await prune_domain(store, domain_dir, Retention(keep_last=1), None, b.runtime)
        kept = b.ids[-1]
        qemu_img_compare(b.refs[kept]["vda"], b.image(kept, "vda"), "raw", "qcow2")
        assert (await verify_backup(b.folder(kept), b.runtime)).ok


def pieces_in(domain_dir: Path, backup_id: str, disk: DiskRecord) -> list[Piece]:
    return read_pieces(domain_dir / backup_id, disk)


async def plan_only(b: BuiltDomain, retention: Retention) -> list[Op]:
    async with Store.open(b.state_db) as store:
        result = await prune_domain(
            store, b.repo.domain_dir(b.uuid), retention, None, b.runtime, dry_run=True
        )
    return list(result.ops)
