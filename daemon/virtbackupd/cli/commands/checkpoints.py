"""`virtbackup checkpoints DOMAIN`: the checkpoint lineage as libvirt
and the catalogue each see it, as one tree."""

from __future__ import annotations

import argparse
import json

from virtbackupd.cli.commands import Command, Needs, Session
from virtbackupd.core.records import CheckpointStatus


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain")


async def run(args: argparse.Namespace, session: Session) -> int:
    store, lv = session.store, session.libvirt
    ref = await lv.domain(args.domain)
    libvirt_cps = {c.name: c.parent for c in await lv.checkpoints(ref)}
    stored = {c.name: c for c in await store.checkpoints(ref.uuid)}
    names = sorted(set(libvirt_cps) | set(stored), key=lambda n: (n not in stored, n))
    rows = []
    for n in names:
        s = stored.get(n)
        rows.append(
            {
                "name": n,
                "libvirt": n in libvirt_cps,
                "libvirt_parent": libvirt_cps.get(n),
                "store": s.status.value if s else None,
                "store_parent": s.parent if s else None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    children: dict[str | None, list[str]] = {}
    for r in rows:
        parent = r["libvirt_parent"] if r["libvirt"] else r["store_parent"]
        children.setdefault(parent if parent in names else None, []).append(str(r["name"]))
    by_name = {r["name"]: r for r in rows}
    print(f"{'checkpoint':50} {'libvirt':8} {'store':8}")

    def walk(parent: str | None, depth: int) -> None:
        for n in children.get(parent, []):
            r = by_name[n]
            print(f"{'  ' * depth + n:50} {_in_libvirt(r):8} {r['store'] or 'unknown':8}")
            walk(n, depth + 1)

    walk(None, 0)
    return 0


def _in_libvirt(row: dict[str, object]) -> str:
    """MISSING only where the store expects libvirt to have it: one removed
    on purpose (pruned, restored over, forgotten) is simply gone."""
    if row["libvirt"]:
        return "yes"
    return "MISSING" if row["store"] in (None, CheckpointStatus.ACTIVE.value) else "no"


COMMAND = Command(
    "checkpoints",
    "checkpoint lineage: libvirt's view and the store's",
    add_arguments,
    run,
    needs=Needs.LIBVIRT,
)
