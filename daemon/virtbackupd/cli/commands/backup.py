"""`virtbackup backup DOMAIN [--full]`: back up one domain now, under the
policy that governs it (or a full-disk one of its own), with progress on
a terminal."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from virtbackupd.cli import listing
from virtbackupd.cli.catalogue import policy_set
from virtbackupd.cli.commands import Command, Needs, Session
from virtbackupd.cli.progress import ProgressLine, progress_text
from virtbackupd.core.policy import Level, Policy, policy_for
from virtbackupd.engine.backup import BackupContext, JobProgress, backup_domain
from virtbackupd.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="domain name or UUID")
    p.add_argument("--full", action="store_true", help="take a full backup, whatever the plan says")


async def run(args: argparse.Namespace, session: Session) -> int:
    config, store, lv = session.config, session.store, session.libvirt
    ref = await lv.domain(args.domain)
    loaded = policy_set(config, quiet=True)
    refusal = loaded.refusal(ref.name, ref.uuid)
    if refusal is not None:
        raise ConfigError(refusal)
    policy = policy_for(ref.name, ref.uuid, loaded.policies) or Policy(
        source=Path("<command line>"), domains=(ref.name,)
    )
    line = ProgressLine(sys.stderr.isatty() and not args.json)

    def progress(p: JobProgress) -> None:
        line.show(progress_text(p.domain, p.done, p.total, p.rate(), p.eta()))

    try:
        record = await backup_domain(
            BackupContext(config, store, lv, policy),
            ref.uuid,
            want=Level.FULL if args.full else None,
            progress=progress,
        )
    finally:
        line.end()
    if args.json:
        print(json.dumps(record.as_json(), indent=2))
    else:
        print(listing.line(listing.listing([record], show_failed=True)[0]))
    return 0


COMMAND = Command("backup", "back up one domain now", add_arguments, run, needs=Needs.LIBVIRT)
