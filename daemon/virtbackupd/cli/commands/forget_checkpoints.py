"""`virtbackup forget-checkpoints DOMAIN`: remove this project's
checkpoints and bitmaps from a domain, e.g. before `virsh snapshot-revert`
(QEMU 7.2 quits when it loads an internal snapshot while dirty bitmaps are
active). Backups stay; the next backup is full."""

from __future__ import annotations

import argparse
import json

from virtbackupd.cli.commands import Command, Needs, Session
from virtbackupd.core.domain_xml import parse_domain
from virtbackupd.engine import vm_starts
from virtbackupd.engine.locks import domain_lock
from virtbackupd.engine.recovery import own_checkpoints


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="domain name or UUID")


async def run(args: argparse.Namespace, session: Session) -> int:
    config, store, lv = session.config, session.store, session.libvirt
    ref = await lv.domain(args.domain)
    with domain_lock(config.runtime_dir, ref.uuid, ref.name, "forget-checkpoints"):
        async with vm_starts.running_or_held(lv, ref) as running:
            info = parse_domain(
                await lv.xml(ref, inactive=not running), f"domain XML of {ref.name}"
            )
            removed = await own_checkpoints.forget_all(lv, store, ref, info, running=running)
    if args.json:
        print(json.dumps({"domain": ref.name, "removed": removed}, indent=2))
    elif removed:
        print(f"{ref.name}: removed {len(removed)} checkpoint(s) of virtbackupd and their bitmaps")
        for name in removed:
            print(f"  {name}")
        print("the backups stay; the next backup is full")
    else:
        print(f"{ref.name}: no checkpoint of virtbackupd")
    return 0


COMMAND = Command(
    "forget-checkpoints",
    "remove virtbackupd's checkpoints and bitmaps from a domain (e.g. before "
    "`virsh snapshot-revert`); backups stay, the next backup is full",
    add_arguments,
    run,
    needs=Needs.LIBVIRT,
)
