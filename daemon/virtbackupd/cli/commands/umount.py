"""`virtbackup umount MOUNTPOINT`: release what `mount` holds (mounts,
devices, helper) and its hold on the backup."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from virtbackupd.cli.commands import Command, Session


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", type=Path)


async def run(args: argparse.Namespace, session: Session) -> int:
    from virtbackupd.cli.recovery import repositories
    from virtbackupd.engine import guest_view

    hold = await guest_view.umount(repositories(session.config), args.mountpoint)
    if args.json:
        print(json.dumps({"mountpoint": hold.directory, "backup": hold.backup_id}))
    else:
        print(f"released {hold.directory} (backup {hold.backup_id})")
    return 0


COMMAND = Command(
    "umount", "release a `virtbackup mount`: mounts, devices, helper", add_arguments, run
)
