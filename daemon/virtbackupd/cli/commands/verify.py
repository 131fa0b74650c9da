"""`virtbackup verify [DOMAIN] [--backup ID] [--filesystems]`: read the
backups' images back against their recorded digests, and optionally
check the filesystems in them read-only."""

from __future__ import annotations

import argparse
import json
from typing import Any

from virtbackupd.cli.commands import Command, Session
from virtbackupd.cli.domains import the_domain
from virtbackupd.core.records import BackupStatus
from virtbackupd.errors import UnknownRestorePointError, VirtBackupError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", nargs="?", help="only this domain (name or UUID)")
    p.add_argument("--backup", metavar="ID", help="only this backup")
    p.add_argument(
        "--filesystems",
        action="store_true",
        help="also check every filesystem found in the backups, read-only "
        "(e2fsck -n, xfs_repair -n, fsck.vfat -n)",
    )


async def run(args: argparse.Namespace, session: Session) -> int:
    from virtbackupd.engine.upkeep.verify import verify_filesystems, verify_recorded

    config, store = session.config, session.store
    uuid = (await the_domain(store, config, args.domain, args.backup)).uuid if args.domain else None
    backups = [
        b
        for b in await store.backups(uuid, status=BackupStatus.COMPLETE)
        if args.backup is None or b.id == args.backup
    ]
    if args.backup is not None and not backups:
        # As restore and mount say it: an id that names nothing is input (2).
        raise UnknownRestorePointError(
            f"no complete backup {args.backup}; `virtbackup list` shows the ids"
        )
    failed = False
    out = []
    async for b, v in verify_recorded(config, store, backups):
        row: dict[str, Any] = {"domain": b.domain_name, **v.as_json()}
        fs: list[Any] = []
        notes: list[str] = []
        if args.filesystems:
            try:
                fs, notes = await verify_filesystems(config, store, b)
            except VirtBackupError as exc:
                fs_error = f"filesystems not checked: {exc}"
                notes = [fs_error]
                row["filesystems_error"] = fs_error
            row["filesystems"] = [
                {"volume": f.label, "fstype": f.fstype, "ok": f.ok, "detail": f.detail} for f in fs
            ]
            row["filesystems_not_read"] = notes
        fs_ok = all(f.ok is not False for f in fs) and "filesystems_error" not in row
        failed = failed or not v.ok or not fs_ok
        out.append(row)
        if args.json:
            continue
        state = "ok" if v.ok and fs_ok else "FAILED"
        print(f"{b.domain_name} {b.id}: {state}")
        for p in (*v.problems, *v.ancestor_problems, *v.notes):
            print(f"  {p}")
        for d in v.disks:
            print(f"  {d.disk}: {'ok' if d.ok else 'FAILED'}")
            for p in d.problems:
                print(f"    {p}")
        for f in fs:
            word = {True: "ok", False: "DAMAGED", None: "-"}[f.ok]
            print(f"  {f.label} ({f.fstype or 'nothing known'}): {word}: {f.detail}")
        for n in notes:
            print(f"  {n}")
    if args.json:
        print(json.dumps(out, indent=2))
    return 1 if failed else 0


COMMAND = Command(
    "verify",
    "check backup images and their recorded digests",
    add_arguments,
    run,
    reconcile=True,
)
