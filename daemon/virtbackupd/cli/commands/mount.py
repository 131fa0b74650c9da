"""`virtbackup mount DOMAIN MOUNTPOINT`: a backup's filesystems shown
read-only below MOUNTPOINT (engine.guest_view), held until `umount`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from virtbackupd.cli.commands import Command, Session, backup_and_disks
from virtbackupd.engine.domain_job import domain_job


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="the backed-up domain (name or UUID)")
    p.add_argument("mountpoint", type=Path, help="an empty folder")
    backup_and_disks(p)


async def run(args: argparse.Namespace, session: Session) -> int:
    from virtbackupd.cli.recovery import chosen_backup
    from virtbackupd.engine import guest_view

    config, store = session.config, session.store
    c = await chosen_backup(args, config, store)
    started = time.monotonic()
    async with domain_job(config, store, c.repo, c.dom.uuid, c.dom.name, "mount"):
        result = await guest_view.mount_backup(
            c.repo, c.folder, c.disks, args.mountpoint, config.runtime_dir
        )
    took = time.monotonic() - started
    if args.json:
        print(
            json.dumps(
                {
                    "backup": c.record.id,
                    "mountpoint": result.hold.directory,
                    "seconds": round(took, 2),
                    "mounted": [
                        {"volume": m.label, "fstype": m.fstype, "path": str(m.path)}
                        for m in result.mounted
                    ],
                    "not_mounted": list(result.notes),
                },
                indent=2,
            )
        )
        return 0
    print(f"backup {c.record.id} of {c.dom.name} mounted read-only on {result.hold.directory}")
    for m in result.mounted:
        print(f"  {m.path}  ({m.label}, {m.fstype})")
    for n in result.notes:
        print(f"  {n}")
    return 0


COMMAND = Command(
    "mount",
    "show a backup's files read-only below MOUNTPOINT (until `umount`)",
    add_arguments,
    run,
    reconcile=True,
)
