"""Pruning one domain's backups: retention decides, core.merge_plan plans,
this module carries the plan out on the repository, crash-safe.

The plan is written to ``<domain>/.prune-journal.json`` (fsynced) before
anything changes, and removed only when everything, the state store
included, agrees with it. Every operation is idempotent and leaves each
kept backup's view unchanged at every instant (see core.merge_plan), so:

- a prune interrupted anywhere loses nothing that is kept: a merge
  writes a new image under a hidden name and renames it into place once
  whole (`_stage`), never into an image a kept view reads;
- the next prune (or backup) replays the journal from the start, each
  operation noticing how far it had got, and only then plans anew.

A merged layer's new digest is planned from the piece hashes already
recorded, reading back only the grid cells the merged layers share
(engine.upkeep.merge_digests); before the journal is written, every recorded
piece those reads see, and every piece of a pruned layer whose bytes move
into a kept one, is checked in its own layer's view: a merge never
launders a corrupted backup into a fresh digest or a kept backup's name.
The space the merges need is bounded first, and a plan that may not fit
is refused with the numbers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import structlog

from virtbackupd.adapters import host_folders, qemu_img
from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.qcow2_reader import check_backing_names
from virtbackupd.adapters.repository import (
    Repository,
    fsync_path,
    read_manifest,
    remove_backup,
    write_manifest,
)
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.backup_documents import is_own_checkpoint
from virtbackupd.core.domain_xml import parse_domain
from virtbackupd.core.merge_plan import (
    Consolidate,
    Layer,
    Op,
    Rebase,
    Remove,
    plan_merges,
    space_needed,
)
from virtbackupd.core.policy import Policy, Retention
from virtbackupd.core.records import CheckpointStatus
from virtbackupd.core.repository_format.holds import Hold
from virtbackupd.core.repository_format.manifest import Manifest, allowed_backings
from virtbackupd.core.repository_format.names import backing_of
from virtbackupd.core.repository_format.prune_journal import PruneJournal
from virtbackupd.core.repository_format.versions import Operation
from virtbackupd.core.retention import Point, Verdict, decide
from virtbackupd.engine import vm_starts
from virtbackupd.engine.domain_job import domain_job
from virtbackupd.engine.recovery import own_checkpoints
from virtbackupd.engine.upkeep.merge_digests import check_inputs, merged_disks
from virtbackupd.errors import PruneError, VirtBackupError

log = structlog.get_logger("virtbackupd.prune")

StepHook = Callable[[str], None]  # called after every durable step (tests interrupt here)

Maker = Callable[[Path], Awaitable[None]]  # writes a merged image at the path given

# Beyond the merges' images: manifests, piece files, the journal, and
# qcow2 metadata a bound on data alone does not count.
MERGE_RESERVE = 8 * 1024 * 1024


@dataclass(frozen=True)
class PruneResult:
    domain_uuid: str
    verdicts: tuple[Verdict, ...]
    ops: tuple[Op, ...]
    dry_run: bool
    replayed: bool = False  # an interrupted prune was finished first
    removed_checkpoints: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, object]:
        return {
            "domain_uuid": self.domain_uuid,
            "dry_run": self.dry_run,
            "replayed_interrupted_prune": self.replayed,
            "backups": [
                {"id": v.id, "keep": v.keep, "reasons": list(v.reasons)} for v in self.verdicts
            ],
            "operations": [describe(op) for op in self.ops],
            "removed_checkpoints": list(self.removed_checkpoints),
        }


def describe(op: Op) -> str:
    if isinstance(op, Rebase):
        return f"rebase {op.child} onto {op.parent} (taking over {op.absorbed}'s bytes)"
    if isinstance(op, Consolidate):
        return (
            f"consolidate {op.heir} (standalone: a new image of its view, "
            f"taking over {op.into}'s bytes)"
        )
    return f"remove {op.id}"


# PLR0913: what to prune, then keyword-only options with defaults
async def prune_domain(  # noqa: PLR0913 (see above)
    store: Store,
    domain_dir: Path,
    retention: Retention,
    max_depth: int | None,
    runtime_dir: Path,
    *,
    dry_run: bool = False,
    libvirt: Libvirt | None = None,
    step: StepHook | None = None,
    domain: str | None = None,
) -> PruneResult:
    """Apply `retention` (and the chain limit `max_depth`) to the backups in
    `domain_dir`. The caller holds the domain's lock. `domain`: its name,
    for the log lines."""
    hook = step or (lambda _: None)
    uuid = domain_dir.name
    repo = Repository.of_domain(domain_dir)
    replayed = False
    earlier: tuple[str, ...] = ()
    if not dry_run and repo.journal(uuid) is not None:
        earlier = (
            await finish_interrupted(store, domain_dir, runtime_dir, libvirt, hook, domain=domain)
            or ()
        )
        replayed = True
    found = [b.manifest for b in repo.backups(uuid, operation=Operation.PRUNE)]
    layers = [_layer(m) for m in found]
    points = [Point(m.id, m.started) for m in found]
    held = repo.held(uuid)
    verdicts = [_held_verdict(v, held.get(v.id, [])) for v in decide(points, retention)]
    prune = {v.id for v in verdicts if not v.keep}
    try:
        ops = plan_merges(
            layers, prune, max_depth if max_depth and max_depth > 0 else None, frozenset(held)
        )
    except ValueError as exc:
        # The manifests' parents do not form chains (a backup folder
        # deleted by hand, a parent edited into a loop): nothing is merged
        # over a chain we cannot follow.
        raise PruneError(
            f"{domain_dir}: {exc}; nothing was pruned. `virtbackup verify` names the backups "
            "this touches; restore what you need from them, then remove their folders"
        ) from exc
    result = PruneResult(uuid, tuple(verdicts), tuple(ops), dry_run, replayed, earlier)
    if dry_run:
        return result
    if not ops:
        # Nothing to prune now; checkpoints earlier prunes left still go.
        swept = await _drop_checkpoints(store, uuid, libvirt, [])
        return replace(result, removed_checkpoints=earlier + swept)
    manifests = {m.id: m for m in found}
    for m in found:
        for d in m.disks:
            # Before qemu-img and qemu-nbd open what the images name.
            await asyncio.to_thread(check_backing_names, domain_dir / m.id / d.path)
    await check_inputs(domain_dir, ops, manifests, runtime_dir)
    await _check_space(domain_dir, ops, manifests)
    checkpoints = {op.id: manifests[op.id].checkpoint for op in ops if isinstance(op, Remove)}
    repo.write_journal(uuid, PruneJournal(tuple(ops), checkpoints))
    hook("journal written")
    removed = await _run_journal(store, domain_dir, runtime_dir, libvirt, hook)
    log.info(  # the prune's one outcome line
        "prune done",
        domain=domain,
        domain_uuid=uuid,
        pruned=sorted(prune),
        operations=[describe(op) for op in ops],
    )
    return PruneResult(uuid, tuple(verdicts), tuple(ops), False, replayed, earlier + removed)


def _held_verdict(v: Verdict, holds: Sequence[Hold]) -> Verdict:
    """A backup something reads (a live restore, a mount) stays, and says so."""
    if not holds:
        return v
    return Verdict(v.id, True, (*v.reasons, *(f"held: {h.detail}" for h in holds)))


# PLR0913: which domain under which policy, then keyword-only options with defaults
async def prune_under_policy(  # noqa: PLR0913 (see above)
    config: DaemonConfig,
    store: Store,
    policy: Policy,
    uuid: str,
    name: str,
    *,
    dry_run: bool = False,
    libvirt: Libvirt | None = None,
) -> PruneResult:
    """Prune one domain as its policy says, holding the domain's lock."""
    repo = Repository(policy.target or config.backup_root)
    async with domain_job(config, store, repo, uuid, name, "prune"):
        return await prune_domain(
            store,
            repo.domain_dir(uuid),
            policy.retention,
            policy.max_incrementals,
            config.runtime_dir,
            dry_run=dry_run,
            libvirt=libvirt,
            domain=name,
        )


async def finish_interrupted(
    store: Store,
    domain_dir: Path,
    runtime_dir: Path,
    libvirt: Libvirt | None = None,
    step: StepHook | None = None,
    *,
    domain: str | None = None,
) -> tuple[str, ...] | None:
    """Replay an interrupted prune's journal, if there is one (None if
    not); returns the checkpoints it removed."""
    if Repository.of_domain(domain_dir).journal(domain_dir.name) is None:
        return None
    log.warning("finishing an interrupted prune", domain=domain, domain_uuid=domain_dir.name)
    return await _run_journal(store, domain_dir, runtime_dir, libvirt, step or (lambda _: None))


# --- planning inputs ---------------------------------------------------------------------


async def _check_space(domain_dir: Path, ops: Sequence[Op], manifests: dict[str, Manifest]) -> None:
    """Refuse, before anything changes, a plan whose merges could fill the
    backup file system (core.merge_plan.space_needed)."""
    usage = {i: _usage(domain_dir / i) for i in manifests}
    whole: dict[str, int] = {}
    for op in ops:
        if isinstance(op, Consolidate):
            into = manifests[op.into]
            whole[op.heir] = sum(
                [
                    await qemu_img.measure(domain_dir / op.heir / d.path)
                    for d in manifests[op.heir].disks
                    if into.disk(d.disk) is not None
                ]
            )
    peak, at = space_needed(ops, usage, whole)
    st = os.statvfs(domain_dir)
    free = st.f_bavail * st.f_frsize
    if peak and peak + MERGE_RESERVE > free:
        raise PruneError(
            f"not enough space in {domain_dir} to prune: the merges need up to "
            f"{_mib(peak + MERGE_RESERVE)} free (at: {describe(at) if at else '?'}), "
            f"{_mib(free)} are free; nothing was changed. Free space there and prune again"
        )


def _usage(folder: Path) -> int:
    """Bytes the files of a backup folder take on disk (sparse images count
    what they hold, not their size)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _layer(m: Manifest) -> Layer:
    return Layer(m.id, m.parent, {d.disk: tuple(d.ranges) for d in m.disks})


async def _run_journal(
    store: Store,
    domain_dir: Path,
    runtime_dir: Path,
    libvirt: Libvirt | None,
    hook: StepHook,
) -> tuple[str, ...]:
    repo = Repository.of_domain(domain_dir)
    journal = repo.journal(domain_dir.name)
    assert journal is not None
    ops = list(journal.ops)
    removed_ids = {op.id for op in ops if isinstance(op, Remove)}
    for op in ops:
        if isinstance(op, Remove):
            remove_backup(domain_dir, op.id, hook)
            continue
        subject = op.child if isinstance(op, Rebase) else op.heir
        if subject in removed_ids and not (domain_dir / subject).is_dir():
            continue  # a replay: a later operation of this journal already removed it
        if isinstance(op, Rebase):
            await _rebase(domain_dir, op, runtime_dir, hook)
        else:
            await _consolidate(domain_dir, op, runtime_dir, hook)
    await _repair_leaks(domain_dir, hook)
    await _sync_store(store, domain_dir, ops)
    hook("store updated")
    removed = await _drop_checkpoints(
        store, domain_dir.name, libvirt, [c for c in journal.checkpoints.values() if c]
    )
    repo.drop_journal(domain_dir.name)
    hook("journal dropped")
    return removed


# --- the operations, each idempotent -----------------------------------------------------


def _done(m: Manifest, parent: str | None, absorbed: str) -> bool:
    return m.parent == parent and absorbed in m.absorbed


async def _rebase(domain_dir: Path, op: Rebase, runtime_dir: Path, hook: StepHook) -> None:
    folder = domain_dir / op.child
    m = read_manifest(folder)
    if _done(m, op.parent, op.absorbed):
        return
    disks, pieces = await merged_disks(domain_dir, folder, m, op.ranges, runtime_dir)
    jobs: list[tuple[Path, Maker, str]] = []
    standalone = set()
    for d in m.disks:
        image = folder / d.path
        want = backing_of(op.parent, d.disk)
        backing = (await qemu_img.info(image)).backing_filename
        if backing is None and None in allowed_backings(m, d):
            # Stored standalone (a disk copied whole): it reads no parent,
            # and stays so (a rebase never passes through "no backing file").
            standalone.add(d.disk)
        elif backing != want:
            # Safe mode (the copy receives every byte where the old and new
            # backing chains differ) on a copy, never in place: qemu-img
            # rebase killed in place can leave the new backing file
            # recorded while the bytes it wrote are not (its metadata cache
            # was never written), and the view changed.
            async def rebased(whole: Path, image: Path = image, want: str = want) -> None:
                await asyncio.to_thread(shutil.copyfile, image, whole)
                await qemu_img.rebase(whole, want)

            jobs.append((image, rebased, f"{op.child} disk {d.disk}"))
    if jobs:
        await _replace(jobs)
        hook(f"rebased {op.child}")
    disks = tuple(replace(d, standalone=d.disk in standalone) for d in disks)
    new = replace(m, parent=op.parent, disks=disks, absorbed=(*m.absorbed, op.absorbed))
    write_manifest(folder, new, pieces)
    hook(f"manifest {op.child}")


async def _consolidate(
    domain_dir: Path, op: Consolidate, runtime_dir: Path, hook: StepHook
) -> None:
    folder, base_folder = domain_dir / op.heir, domain_dir / op.into
    m = read_manifest(folder)
    if _done(m, None, op.into):
        return
    disks, pieces = await merged_disks(domain_dir, folder, m, op.ranges, runtime_dir)
    jobs: list[tuple[Path, Maker, str]] = []
    for d in m.disks:
        image, base = folder / d.path, base_folder / d.path
        backing = (await qemu_img.info(image)).backing_filename
        if backing == backing_of(op.into, d.disk) and base.is_file():
            # The heir's view, written whole into a new standalone image;
            # `into`'s image is only read.
            async def converted(whole: Path, image: Path = image) -> None:
                await qemu_img.convert(image, whole, src_fmt="qcow2")

            jobs.append((image, converted, f"{op.heir} disk {d.disk}"))
        elif backing is not None:
            raise PruneError(
                f"{image}: backing file {backing!r} is not {op.into}'s image, or that image is "
                "gone; the prune journal cannot be finished (see docs/restore.md)"
            )
    if jobs:
        await _replace(jobs)
        hook(f"moved {op.heir}")
    disks = tuple(replace(d, standalone=True) for d in disks)
    new = replace(m, parent=None, disks=disks, absorbed=(*m.absorbed, op.into))
    write_manifest(folder, new, pieces)
    hook(f"manifest {op.heir}")


async def _repair_leaks(domain_dir: Path, hook: StepHook) -> None:
    """A merge killed inside qemu-img (SIGKILL, power cut) can leave
    clusters allocated and used by nothing in an image it wrote: no data
    is at risk (restore and verify accept them), but the space is lost
    until `qemu-img check -r leaks` frees it. Done for every backup of the
    domain (a check reads only metadata) once the journal's operations are
    all carried out, a replay included; held backups are in use and left
    alone."""
    repo = Repository.of_domain(domain_dir)
    try:
        held = repo.held(domain_dir.name)
    except VirtBackupError as exc:
        # A hold that cannot be read may keep any backup in use: repair
        # none (leaks are only lost space), and let the journal finish.
        log.warning("leaked clusters not repaired", error=str(exc))
        return
    for stored in repo.backups(domain_dir.name, problems=[]):  # unreadable ones: verify's
        if stored.manifest.id in held:
            continue
        for d in stored.manifest.disks:
            image = stored.folder / d.path
            try:
                found = await qemu_img.check(image)
                if found.leaks:
                    await qemu_img.while_locked(partial(_repair, image))
            except VirtBackupError as exc:
                # Damage is verify's and restore's to report; it must not
                # keep this journal (and so every later prune) from finishing.
                log.warning("leaked clusters not freed", image=str(image), error=str(exc))
                continue
            if found.leaks:
                log.info("freed leaked clusters", image=str(image), clusters=found.leaks)
                hook(f"repaired {stored.manifest.id}/{d.disk}")


async def _repair(image: Path) -> None:
    await qemu_img.check(image, repair_leaks=True)


async def _stage(image: Path, make: Maker, what: str) -> Path:
    """A new image to replace `image`, written by `make` beside it, showing
    the same view. It has a hidden name no backing chain refers to, so no
    backup's view reads it until :func:`_replace` renames it over `image`
    (atomic) once complete and synced: a merge killed or out of space at
    any byte leaves every view as it was, and the replay starts again."""
    whole = image.with_name(f".{image.name}.whole")
    whole.unlink(missing_ok=True)  # a dead prune's
    try:
        # A replay may meet the dead prune's helpers still holding a file
        # for a moment.
        await qemu_img.while_locked(partial(make, whole))
        host_folders.set_owner(whole, mode=0o600)
        fsync_path(whole)
    except (VirtBackupError, OSError) as exc:
        whole.unlink(missing_ok=True)  # nothing half-written stays
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise PruneError(
            f"{what}: could not write its merged image ({reason}); every backup is as it "
            "was, the next prune finishes this one"
        ) from exc
    return whole


async def _replace(jobs: Sequence[tuple[Path, Maker, str]]) -> None:
    """Stage a new image for every (image, maker, what), then put them all
    in place at once, so that the images and the manifest written next
    disagree for as short a time as can be."""
    staged: dict[Path, Path] = {}
    try:
        for image, make, what in jobs:
            staged[image] = await _stage(image, make, what)
    except BaseException:
        for whole in staged.values():
            whole.unlink(missing_ok=True)
        raise
    for image, whole in staged.items():
        whole.replace(image)
    for folder in {image.parent for image in staged}:
        fsync_path(folder)


async def _sync_store(store: Store, domain_dir: Path, ops: Sequence[Op]) -> None:
    """Make the store say what the manifests say (children before removals:
    a row's parent must exist)."""
    changed = {op.child for op in ops if isinstance(op, Rebase)}
    changed |= {op.heir for op in ops if isinstance(op, Consolidate)}
    removed = [op.id for op in ops if isinstance(op, Remove)]
    for backup_id in sorted(changed - set(removed)):
        folder = domain_dir / backup_id
        if not folder.is_dir() or await store.backup(backup_id) is None:
            continue
        m = read_manifest(folder)
        await store.rechain_backup(backup_id, m.parent, m.disks)
    for backup_id in removed:
        await store.delete_backup(backup_id)


async def _drop_checkpoints(
    store: Store, uuid: str, libvirt: Libvirt | None, names: Sequence[str]
) -> tuple[str, ...]:
    """The checkpoints of pruned backups are of no further use; removing
    them with their bitmaps keeps QEMU from tracking writes for nothing and
    `checkpoints` from listing them as live. A running domain's go through
    libvirt, bitmaps and all. A shut-off domain's images are held against a
    start (engine.vm_starts) while libvirt drops the metadata and qemu-img
    removes the bitmaps from the images. Checkpoints an earlier prune could
    not remove (a start under way, libvirt unreachable, an older version
    that left a shut-off domain's alone) go too: their backups are gone
    from the store while the store still calls them active. Each bitmap is
    a record of writes since its own checkpoint (libvirt keeps them all
    enabled), so removing one changes no other."""
    if libvirt is None:
        return ()
    domain = uuid  # its name once libvirt has answered
    try:
        ref = await libvirt.domain(uuid)
        domain = ref.name
        names = sorted(set(names) | await _left_by_earlier_prunes(store, uuid))
        if not names:
            return ()
        async with vm_starts.running_or_held(libvirt, ref) as running:
            known = {cp.name for cp in await libvirt.checkpoints(ref)}
            for name in names:
                if name not in known:
                    continue
                if running:
                    await libvirt.delete_checkpoint(ref, name)
                else:
                    await own_checkpoints.delete_checkpoint(libvirt, ref, name)
            if not running:
                xml = await libvirt.xml(ref, inactive=True)
                info = parse_domain(xml, f"domain XML of {ref.name}")
                for image in own_checkpoints.qcow2_images(info):
                    for name in names:
                        await own_checkpoints.remove_bitmap(image, name)
        for name in names:
            await store.set_checkpoint_status(uuid, name, CheckpointStatus.PRUNED)
    except VirtBackupError as exc:
        log.warning(
            "could not remove checkpoints of pruned backups (the next prune tries again)",
            domain=domain,
            domain_uuid=uuid,
            error=str(exc),
        )
        return ()
    return tuple(names)


async def _left_by_earlier_prunes(store: Store, uuid: str) -> set[str]:
    """Our checkpoints the store calls active whose backup it no longer
    has: a prune removed the backup but not the checkpoint. (A running
    backup's checkpoint has its backup's row from the start; the caller
    holds the domain's lock anyway.)"""
    backed = {b.checkpoint for b in await store.backups(uuid) if b.checkpoint}
    return {
        cp.name
        for cp in await store.checkpoints(uuid)
        if cp.status is CheckpointStatus.ACTIVE
        and is_own_checkpoint(cp.name)
        and cp.name not in backed
    }


__all__ = ["PruneResult", "describe", "finish_interrupted", "prune_domain", "prune_under_policy"]
