"""Pruning one domain's backups: retention decides, core.merge_plan plans,
this module carries the plan out on the repository, crash-safe.

The plan is written to ``<domain>/.prune-journal.json`` (fsynced) before
anything changes, and removed only when everything, the state store
included, agrees with it. Every operation is idempotent and leaves each
kept backup's view unchanged at every instant (see core.merge_plan), so:

- a prune interrupted anywhere loses nothing that is kept;
- the next prune (or backup) replays the journal from the start, each
  operation noticing how far it had got, and only then plans anew.

Before the journal is written, every layer that will give or receive bytes
is verified against its recorded digest: a merge never launders a
corrupted backup into a fresh digest.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from virtbackupd.adapters import qemu_img
from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core import extents
from virtbackupd.core.extents import Range
from virtbackupd.core.merge_plan import Consolidate, Layer, Op, Rebase, Remove, plan_merges
from virtbackupd.core.policy import Policy, Retention
from virtbackupd.core.records import CheckpointStatus
from virtbackupd.core.retention import Point, Verdict, decide
from virtbackupd.engine import repository
from virtbackupd.engine.content import digest_image
from virtbackupd.engine.locks import domain_lock
from virtbackupd.errors import PruneError, VirtBackupError

log = structlog.get_logger("virtbackupd.prune")

StepHook = Callable[[str], None]  # called after every durable step (tests interrupt here)


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
        return f"commit {op.heir} into {op.into}, which becomes {op.heir} (standalone)"
    return f"remove {op.id}"


async def prune_domain(
    store: Store,
    domain_dir: Path,
    retention: Retention,
    max_depth: int | None,
    runtime_dir: Path,
    *,
    dry_run: bool = False,
    libvirt: Libvirt | None = None,
    step: StepHook | None = None,
) -> PruneResult:
    """Apply `retention` (and the chain limit `max_depth`) to the backups in
    `domain_dir`. The caller holds the domain's lock."""
    hook = step or (lambda _: None)
    uuid = domain_dir.name
    replayed = False
    earlier: tuple[str, ...] = ()
    if not dry_run and repository.read_journal(domain_dir) is not None:
        earlier = await finish_interrupted(store, domain_dir, runtime_dir, libvirt, hook) or ()
        replayed = True
    found = repository.list_backups(domain_dir)
    layers = [_layer(m) for _, m in found]
    points = [Point(str(m["id"]), datetime.fromisoformat(m["started"])) for _, m in found]
    verdicts = decide(points, retention)
    prune = {v.id for v in verdicts if not v.keep}
    ops = plan_merges(layers, prune, max_depth if max_depth and max_depth > 0 else None)
    result = PruneResult(uuid, tuple(verdicts), tuple(ops), dry_run, replayed, earlier)
    if dry_run or not ops:
        return result
    manifests = {str(m["id"]): m for _, m in found}
    await _verify_inputs(domain_dir, ops, manifests, runtime_dir)
    checkpoints = {
        op.id: manifests[op.id].get("checkpoint") for op in ops if isinstance(op, Remove)
    }
    repository.write_journal(
        domain_dir,
        {"ops": [_op_json(op) for op in ops], "checkpoints": checkpoints},
    )
    hook("journal written")
    removed = await _run_journal(store, domain_dir, runtime_dir, libvirt, hook)
    log.info(
        "pruned",
        domain_uuid=uuid,
        removed=[op.id for op in ops if isinstance(op, Remove)],
        merges=sum(not isinstance(op, Remove) for op in ops),
    )
    return PruneResult(uuid, tuple(verdicts), tuple(ops), False, replayed, earlier + removed)


async def prune_under_policy(
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
    root = policy.target or config.backup_root
    with domain_lock(config.runtime_dir, uuid, name, "prune"):
        return await prune_domain(
            store,
            root / uuid,
            policy.retention,
            policy.max_incrementals,
            config.runtime_dir,
            dry_run=dry_run,
            libvirt=libvirt,
        )


async def finish_interrupted(
    store: Store,
    domain_dir: Path,
    runtime_dir: Path,
    libvirt: Libvirt | None = None,
    step: StepHook | None = None,
) -> tuple[str, ...] | None:
    """Replay an interrupted prune's journal, if there is one (None if
    not); returns the checkpoints it removed."""
    if repository.read_journal(domain_dir) is None:
        return None
    log.warning("finishing an interrupted prune", domain_uuid=domain_dir.name)
    return await _run_journal(store, domain_dir, runtime_dir, libvirt, step or (lambda _: None))


# --- planning inputs ---------------------------------------------------------------------


def _layer(m: Mapping[str, Any]) -> Layer:
    return Layer(
        str(m["id"]),
        m.get("parent"),
        {str(d["name"]): tuple(extents.ranges_from_json(d["ranges"])) for d in m["disks"]},
    )


async def _verify_inputs(
    domain_dir: Path, ops: Sequence[Op], manifests: Mapping[str, Any], runtime_dir: Path
) -> None:
    """Every layer a merge reads from or writes into still shows what its
    digest recorded."""
    touched: set[str] = set()
    for op in ops:
        if isinstance(op, Rebase):
            touched |= {op.child, op.absorbed}
        elif isinstance(op, Consolidate):
            touched |= {op.heir, op.into}
    for backup_id in sorted(touched):
        folder = domain_dir / backup_id
        for d in manifests[backup_id]["disks"]:
            ranges = extents.ranges_from_json(d["ranges"])
            got = await digest_image(folder / str(d["file"]), ranges, int(d["grid"]), runtime_dir)
            if got.digest != d["digest"] or got.not_zero:
                raise PruneError(
                    f"backup {backup_id} disk {d['name']} does not match its recorded digest; "
                    "nothing was pruned. Run `virtbackup verify` and keep the damaged chain "
                    "for inspection"
                )


# --- the journal -------------------------------------------------------------------------


def _op_json(op: Op) -> dict[str, Any]:
    if isinstance(op, Rebase):
        return {
            "op": "rebase",
            "child": op.child,
            "parent": op.parent,
            "absorbed": op.absorbed,
            "ranges": _ranges_json(op.ranges),
        }
    if isinstance(op, Consolidate):
        return {
            "op": "consolidate",
            "heir": op.heir,
            "into": op.into,
            "ranges": _ranges_json(op.ranges),
        }
    return {"op": "remove", "id": op.id}


def _ranges_json(ranges: Mapping[str, Sequence[Range]]) -> dict[str, Any]:
    return {disk: extents.ranges_to_json(r) for disk, r in ranges.items()}


def _op_from_json(data: Mapping[str, Any]) -> Op:
    def ranges() -> dict[str, tuple[Range, ...]]:
        return {disk: tuple(extents.ranges_from_json(r)) for disk, r in data["ranges"].items()}

    if data["op"] == "rebase":
        return Rebase(data["child"], data["parent"], data["absorbed"], ranges())
    if data["op"] == "consolidate":
        return Consolidate(data["heir"], data["into"], ranges())
    if data["op"] == "remove":
        return Remove(data["id"])
    raise PruneError(f"unknown operation {data['op']!r} in the prune journal")


async def _run_journal(
    store: Store,
    domain_dir: Path,
    runtime_dir: Path,
    libvirt: Libvirt | None,
    hook: StepHook,
) -> tuple[str, ...]:
    journal = repository.read_journal(domain_dir)
    assert journal is not None
    ops = [_op_from_json(o) for o in journal["ops"]]
    removed_ids = {op.id for op in ops if isinstance(op, Remove)}
    for op in ops:
        if isinstance(op, Remove):
            _remove(domain_dir, op.id, hook)
            continue
        subject = op.child if isinstance(op, Rebase) else op.heir
        if subject in removed_ids and not (domain_dir / subject).is_dir():
            continue  # a replay: a later operation of this journal already removed it
        if isinstance(op, Rebase):
            await _rebase(domain_dir, op, runtime_dir, hook)
        else:
            await _consolidate(domain_dir, op, runtime_dir, hook)
    await _sync_store(store, domain_dir, ops)
    hook("store updated")
    removed = await _drop_checkpoints(
        store, domain_dir.name, libvirt, [c for c in journal.get("checkpoints", {}).values() if c]
    )
    repository.drop_journal(domain_dir)
    hook("journal dropped")
    return removed


# --- the operations, each idempotent -----------------------------------------------------


async def _new_digests(
    folder: Path,
    disks: Sequence[Mapping[str, Any]],
    ranges: Mapping[str, Sequence[Range]],
    runtime_dir: Path,
) -> list[dict[str, Any]]:
    """The disks' entries with the merged ranges and their digest, read
    from the layer's view (which no merge step changes)."""
    out = []
    for d in disks:
        name = str(d["name"])
        new_ranges = list(ranges.get(name, extents.ranges_from_json(d["ranges"])))
        got = await digest_image(folder / str(d["file"]), new_ranges, int(d["grid"]), runtime_dir)
        out.append({**d, "ranges": extents.ranges_to_json(new_ranges), "digest": got.digest})
    return out


def _done(m: Mapping[str, Any], parent: str | None, absorbed: str) -> bool:
    return m.get("parent") == parent and absorbed in m.get("absorbed", [])


async def _rebase(domain_dir: Path, op: Rebase, runtime_dir: Path, hook: StepHook) -> None:
    folder = domain_dir / op.child
    m = repository.read_manifest(folder)
    if _done(m, op.parent, op.absorbed):
        return
    disks = await _new_digests(folder, m["disks"], op.ranges, runtime_dir)
    for d in m["disks"]:
        image = folder / str(d["file"])
        want = repository.backing_of(op.parent, str(d["name"]))
        if (await qemu_img.info(image)).backing_filename != want:
            await qemu_img.rebase(image, want)  # safe mode: the view stays the same
            hook(f"rebased {op.child}/{d['name']}")
    repository.write_manifest(
        folder,
        {
            **m,
            "parent": op.parent,
            "disks": disks,
            "absorbed": [*m.get("absorbed", []), op.absorbed],
        },
    )
    hook(f"manifest {op.child}")


async def _consolidate(
    domain_dir: Path, op: Consolidate, runtime_dir: Path, hook: StepHook
) -> None:
    folder, base_folder = domain_dir / op.heir, domain_dir / op.into
    m = repository.read_manifest(folder)
    if _done(m, None, op.into):
        return
    disks = await _new_digests(folder, m["disks"], op.ranges, runtime_dir)
    for d in m["disks"]:
        name = str(d["name"])
        image, base = folder / str(d["file"]), base_folder / str(d["file"])
        backing = (await qemu_img.info(image)).backing_filename
        if backing == repository.backing_of(op.into, name) and base.is_file():
            # The heir's view is unchanged while its bytes go down into the
            # base (they shadow it); the base's own point is being pruned.
            await qemu_img.commit(image, keep_overlay=True)
            hook(f"committed {op.heir}/{name}")
            base.chmod(0o600)
            base.replace(image)  # atomically: the standalone image takes the overlay's place
            repository.fsync_path(folder)
            hook(f"moved {op.into}/{name}")
        elif backing is not None:
            raise PruneError(
                f"{image}: backing file {backing!r} is not {op.into}'s image, or that image is "
                "gone; the prune journal cannot be finished (see docs/restore.md)"
            )
    repository.write_manifest(
        folder,
        {
            **m,
            "parent": None,
            "disks": disks,
            "absorbed": [*m.get("absorbed", []), op.into],
        },
    )
    hook(f"manifest {op.heir}")


def _remove(domain_dir: Path, backup_id: str, hook: StepHook) -> None:
    folder, doomed = domain_dir / backup_id, domain_dir / f".{backup_id}.removing"
    if folder.exists():
        folder.rename(doomed)
        repository.fsync_path(domain_dir)
        hook(f"hid {backup_id}")
    if doomed.exists():
        shutil.rmtree(doomed)
        repository.fsync_path(domain_dir)
        hook(f"removed {backup_id}")


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
        m = repository.read_manifest(folder)
        await store.rechain_backup(backup_id, m.get("parent"), repository.disks_from_manifest(m))
    for backup_id in removed:
        await store.delete_backup(backup_id)


async def _drop_checkpoints(
    store: Store, uuid: str, libvirt: Libvirt | None, names: Sequence[str]
) -> tuple[str, ...]:
    """The checkpoints of pruned backups are of no further use; removing
    them (with their bitmaps) keeps QEMU from tracking writes for nothing.
    Only while the domain runs: an inactive domain's are left for later."""
    if libvirt is None or not names:
        return ()
    try:
        ref = await libvirt.domain(uuid)
        if not await libvirt.is_running(ref):
            return ()
        for name in names:
            await libvirt.delete_checkpoint(ref, name)
            await store.set_checkpoint_status(uuid, name, CheckpointStatus.DELETED)
    except VirtBackupError as exc:
        log.warning("could not remove checkpoints of pruned backups", error=str(exc))
        return ()
    return tuple(names)


__all__ = ["PruneResult", "describe", "finish_interrupted", "prune_domain", "prune_under_policy"]
