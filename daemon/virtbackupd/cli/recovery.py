"""The backup a restore or a mount names (`DOMAIN [--backup ID | --at
TIME] [--disk T]`), and the holds the CLI's ways back leave behind them
(live restores, mounts): settled before `prune`, shown by `status`."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.cli.catalogue import policies, roots
from virtbackupd.cli.domains import the_domain
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.points import parse_time, pick_backup
from virtbackupd.core.records import BackupRecord, BackupStatus, DomainRecord
from virtbackupd.core.repository_format.holds import Hold, HoldKind
from virtbackupd.engine import guest_view, restore
from virtbackupd.engine.restore import live as live_restore
from virtbackupd.engine.upkeep.catalogue import Standing, standing
from virtbackupd.errors import RestoreError, VirtBackupError


@dataclass(frozen=True)
class Chosen:
    dom: DomainRecord
    record: BackupRecord
    folder: Path
    repo: Repository
    disks: list[str]


async def chosen_backup(args: argparse.Namespace, config: DaemonConfig, store: Store) -> Chosen:
    """The backup and disks `DOMAIN [--backup ID | --at TIME] [--disk T]` name."""
    dom = await the_domain(store, config, args.domain, args.backup)
    at = parse_time(args.at) if args.at else None
    backups = await store.backups(dom.uuid)
    record = pick_backup(backups, args.backup, at)
    if args.backup is None:
        _restorable_or_refuse(record, backups)
    if record.path is None:
        raise RestoreError(f"backup {record.id} has no folder recorded")
    folder = Path(record.path)
    repo = Repository.of_backup(folder)
    if record.id in repo.being_removed(folder.parent.name):
        raise RestoreError(
            f"backup {record.id} is being pruned (an interrupted prune); "
            "`virtbackup prune` finishes it; choose another backup"
        )
    manifest = repo.backup(folder.parent.name, record.id).manifest
    return Chosen(dom, record, folder, repo, restore.disks_of(manifest, args.disk))


def _restorable_or_refuse(record: BackupRecord, backups: list[BackupRecord]) -> None:
    """Without --backup, the newest backup (at --at) is restored only if
    its folders can be: otherwise refuse, naming why and the newest one
    that can, rather than quietly restore older data than the operator
    asked for (docs/restore.md)."""
    if record.path is None:
        return
    seen: dict[Path, Standing] = {}
    picked = standing(Path(record.path), seen)
    if picked.restorable:
        return
    older = [
        b
        for b in backups
        if b.status is BackupStatus.COMPLETE and b.path and b.started <= record.started
    ]
    instead = next(
        (
            b
            for b in reversed(older)
            if b.id != record.id and standing(Path(b.path or ""), seen).restorable
        ),
        None,
    )
    if picked.problem is not None:
        head = f"the newest backup {record.id} is unreadable ({picked.problem})"
    else:
        head = (
            f"the newest backup {record.id} is on an unreadable chain "
            f"(backup {picked.through}: {picked.through_problem})"
        )
    if instead is None:
        raise RestoreError(f"{head}; no older backup of this domain is restorable either")
    raise RestoreError(
        f"{head}; nothing was restored. The newest restorable one is {instead.id} "
        f"(started {instead.started.isoformat(timespec='seconds')}): "
        f"`--backup {instead.id}` restores it"
    )


def repositories(config: DaemonConfig) -> list[Repository]:
    return [Repository(r) for r in sorted(roots(config, policies(config, quiet=True)))]


# --- holds in `status` -----------------------------------------------------------------


async def settle_holds(
    repos: list[Repository], lv: Libvirt | None, config: DaemonConfig
) -> dict[str, live_restore.MoveState]:
    """Release finished moves and vanished mounts, restart stopped moves
    (what the daemon does when it runs); the moves' states by hold id."""
    await guest_view.settle_mounts(repos)
    moves: dict[str, live_restore.MoveState] = {}
    if lv is not None:
        for repo in repos:
            with contextlib.suppress(VirtBackupError):
                for m in await live_restore.settle(lv, repo, config):
                    moves[m.hold.id] = m
    return moves


async def hold_lines(config: DaemonConfig, lv: Libvirt | None) -> list[dict[str, object]]:
    """Every hold, settled first, as status rows."""
    repos = repositories(config)
    moves = await settle_holds(repos, lv, config)
    rows: list[dict[str, object]] = []
    for repo in repos:
        for h in repo.holds():
            rows.append(_hold_row(h, moves.get(h.id)))
    return rows


def _hold_row(h: Hold, move: live_restore.MoveState | None) -> dict[str, object]:
    row: dict[str, object] = {
        "kind": h.kind.value,
        "backup": h.backup_id,
        "domain_uuid": h.domain_uuid,
        "since": h.created.isoformat(),
        "what": h.detail,
    }
    if h.kind is HoldKind.MOUNT:
        row["mountpoint"] = h.directory
    elif move is not None:
        row.update(move.as_json())
    return row


def render_holds(rows: list[dict[str, object]]) -> list[str]:
    lines = []
    for r in rows:
        head = f"held: backup {r['backup']}: {r['what']}"
        if r["kind"] == HoldKind.LIVE_RESTORE.value and "state" in r:
            parts = []
            for d in r.get("disks", []):  # type: ignore[attr-defined]
                if d["moved"]:
                    parts.append(f"{d['disk']} moved")
                elif d.get("pulled"):
                    parts.append(f"{d['disk']} pulled, not yet checked")
                elif d["total"]:
                    parts.append(f"{d['disk']} {100 * d['done'] // d['total']}%")
                else:
                    parts.append(f"{d['disk']} waiting")
            head += f" ({r['state']}: {', '.join(parts)})"
            if r.get("trouble"):
                head += f"\n  {r['trouble']}"
        lines.append(head)
    return lines
