"""`virtbackup status`: gathers what cli.status renders: the daemon's
status file (or libvirt, asked directly, when no daemon runs), the
catalogue, the policy files on disk, running jobs and the holds."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.cli.catalogue import policy_set
from virtbackupd.cli.commands import Command, Session, no_arguments
from virtbackupd.cli.domains import libvirt_domains_or_why
from virtbackupd.config.policy import file_digests, policy_files
from virtbackupd.core.records import BackupRecord
from virtbackupd.engine.locks import backup_owner_alive
from virtbackupd.engine.upkeep.catalogue import Standing, standing
from virtbackupd.errors import VirtBackupError


async def run(args: argparse.Namespace, session: Session) -> int:
    from virtbackupd.cli import recovery
    from virtbackupd.cli import status as status_view
    from virtbackupd.daemon.status_file import probe_status

    config, store = session.config, session.store
    daemon, daemon_unknown = probe_status(config.runtime_dir)
    # The daemon's view of libvirt's domains when it runs; else ask libvirt.
    domains, libvirt_error = (
        (None, None) if daemon is not None else await libvirt_domains_or_why(config.libvirt_uri)
    )
    seen: dict[Path, Standing] = {}

    def unrestorable(b: BackupRecord) -> str | None:
        s = standing(Path(b.path), seen) if b.path else None
        return None if s is None or s.restorable else s.why()

    on_disk = policy_set(config, quiet=True)
    notes = status_view.policy_file_notes(
        daemon.policy_files if daemon is not None else None,
        file_digests(policy_files(config.policy_dirs)),
        {str(r.source): r.problem for r in on_disk.rejected},
    )
    rows, unmanaged = status_view.build_rows(
        datetime.now(UTC),
        await store.backups(),
        on_disk,
        domains,
        daemon,
        unrestorable,
        notes,
    )
    reach = status_view.Reach(config.libvirt_uri, libvirt_error, daemon_unknown, notes)
    running = [
        replace(j, interrupted=not backup_owner_alive(config.runtime_dir, j.domain_uuid))
        for j in await store.running_progress()
    ]
    try:
        lv: Libvirt | None = await Libvirt.open(config.libvirt_uri)
    except VirtBackupError:
        lv = None  # live restores are then shown without their progress
    try:
        holds = await recovery.hold_lines(config, lv)
    finally:
        if lv is not None:
            await lv.close()
    text = status_view.render(daemon, rows, unmanaged, running, args.json, reach)
    if args.json:
        data = json.loads(text)
        data["holds"] = holds
        print(json.dumps(data, indent=2))
    else:
        print("\n".join([text, *recovery.render_holds(holds)]))
    return 0


COMMAND = Command(
    "status",
    "the daemon, each domain's last good backup, running jobs",
    no_arguments,
    run,
    reconcile=True,
)
