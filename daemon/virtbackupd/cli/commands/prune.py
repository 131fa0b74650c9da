"""`virtbackup prune [DOMAIN] [--dry-run]`: apply each governing policy's
retention and chain limit (engine.upkeep.prune), holds settled first."""

from __future__ import annotations

import argparse
import json
import sys

from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.cli.catalogue import policy_set
from virtbackupd.cli.commands import Command, Session
from virtbackupd.cli.domains import domain_of
from virtbackupd.core.policy import policy_for
from virtbackupd.errors import VirtBackupError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", nargs="?", help="only this domain (name or UUID)")
    p.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")


async def run(args: argparse.Namespace, session: Session) -> int:
    from virtbackupd.cli import recovery
    from virtbackupd.engine.upkeep.prune import describe, prune_under_policy

    config, store = session.config, session.store
    if args.domain:
        domains = [await domain_of(store, config, args.domain)]
    else:
        seen = {b.domain_uuid for b in await store.backups()}
        domains = [d for u in sorted(seen) if (d := await store.domain(u)) is not None]
    loaded = policy_set(config, quiet=True)
    governing = loaded.policies
    refused = False
    results = []
    try:
        lv: Libvirt | None = await Libvirt.open(config.libvirt_uri)
    except VirtBackupError as exc:
        print(f"virtbackup: warning: {exc}; checkpoints of pruned backups stay", file=sys.stderr)
        lv = None
    try:
        await recovery.settle_holds(recovery.repositories(config), lv, config)
        for dom in domains:
            refusal = loaded.refusal(dom.name, dom.uuid)
            if refusal is not None:
                print(f"virtbackup: error: {refusal}; nothing is pruned", file=sys.stderr)
                refused = True
                continue
            policy = policy_for(dom.name, dom.uuid, governing)
            if policy is None:
                print(
                    f"virtbackup: {dom.name}: no policy governs it; nothing is pruned",
                    file=sys.stderr,
                )
                continue
            result = await prune_under_policy(
                config, store, policy, dom.uuid, dom.name, dry_run=args.dry_run, libvirt=lv
            )
            results.append((dom, result))
    finally:
        if lv is not None:
            await lv.close()
    if args.json:
        print(json.dumps([{"domain": d.name, **r.as_json()} for d, r in results], indent=2))
        return 2 if refused else 0
    for dom, r in results:
        head = "would" if r.dry_run else "did"
        if r.replayed:
            print(f"{dom.name}: finished an interrupted prune first")
        for v in r.verdicts:
            why = ", ".join(v.reasons) if v.keep else "no rule keeps it"
            print(f"{dom.name} {v.id}: {'keep' if v.keep else 'prune'} ({why})")
        for op in r.ops:
            print(f"  {head}: {describe(op)}")
    return 2 if refused else 0


COMMAND = Command(
    "prune",
    "apply retention and the chain limit: remove and merge old backups",
    add_arguments,
    run,
    reconcile=True,
)
