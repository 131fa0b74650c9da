"""`virtbackup list [DOMAIN] [--all]`: the backups, as cli.listing tells
them."""

from __future__ import annotations

import argparse
import json

from virtbackupd.cli import listing
from virtbackupd.cli.commands import Command, Session
from virtbackupd.cli.domains import describe_domains, domains_named, libvirt_domains_or_why
from virtbackupd.engine.locks import backup_owner_alive


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", nargs="?", help="only this domain (name or UUID)")
    p.add_argument("--all", action="store_true", help="failed attempts too, with their reasons")


async def run(args: argparse.Namespace, session: Session) -> int:
    """One domain's backups, or a name's: every domain that has borne it,
    each domain's backups together (oldest domain first), and in text a
    line where the UUID changes."""
    config, store = session.config, session.store
    doms = await domains_named(store, config, args.domain) if args.domain else [None]
    groups = []
    for dom in doms:
        found = listing.listing(
            await store.backups(dom.uuid if dom else None),
            show_failed=args.all,
            alive=lambda u: backup_owner_alive(config.runtime_dir, u),
        )
        groups.append((dom, found))
    if args.json:
        print(json.dumps([x.as_json() for _, found in groups for x in found], indent=2))
        return 0
    if len(groups) > 1:
        now, _ = await libvirt_domains_or_why(config.libvirt_uri)
    for dom, found in groups:
        if len(groups) > 1 and dom is not None:
            print(f"--- domain {describe_domains([dom], now)}: {len(found)} backups")
        for x in found:
            print(listing.line(x))
    return 0


COMMAND = Command("list", "list backups", add_arguments, run, reconcile=True)
