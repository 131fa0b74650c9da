"""What pruning costs: merging away the oldest backups of a chain.

Chains built without libvirt (tests/testbed/repo_builder: a qcow2 source,
qemu-io writes, the product's copy and commit), a 4 GiB disk: a full of
F MiB of data, then incrementals of 16 MiB of new data each, D backups
deep. `keep_last: D-2` then merges the two oldest away (the product's own
prune_domain, page cache dropped first). Varying F and D separately shows
what the cost follows. Every kept backup is verified afterwards.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from testbed.repo_builder import BuiltDomain  # noqa: E402
from virtbackupd.adapters.store import Store  # noqa: E402
from virtbackupd.core.policy import Retention  # noqa: E402
from virtbackupd.engine.upkeep.prune import prune_domain  # noqa: E402
from virtbackupd.engine.upkeep.verify import verify_backup  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
INCREMENT = 16 * MiB


async def _one(work: Path, full: int, depth: int, drop: Callable[[], bool]) -> float:
    b = BuiltDomain(work, {"vda": 4 * GiB}, keep_references=False)
    async with Store.open(b.state_db) as store:
        for offset in range(0, full, 512 * MiB):  # qemu-io writes under 2 GiB at a time
            b.write("vda", offset, min(512 * MiB, full - offset), 0x41)
        await b.backup(store)
        for i in range(depth - 1):
            # New data beyond the full's, a different place each time.
            b.write("vda", 3 * GiB + (i % 60) * INCREMENT, INCREMENT, 0x50 + i % 100)
            await b.backup(store)
        drop()
        t0 = time.monotonic()
        await prune_domain(
            store, b.repo.domain_dir(b.uuid), Retention(keep_last=depth - 2), None, b.runtime
        )
        seconds = time.monotonic() - t0
        kept = [r.id for r in await store.backups(b.uuid)]
    assert len(kept) == depth - 2, kept
    for backup_id in kept[:1] + kept[-1:]:
        assert (await verify_backup(b.folder(backup_id), b.runtime)).ok, backup_id
    return seconds


def prune_costs(work: Path, drop: Callable[[], bool]) -> str:
    out = [
        "### Prune: merging the two oldest backups of a chain away",
        "",
        "A 4 GiB disk; the full holds F of data, each incremental 16 MiB of new data; "
        "`keep_last` two fewer than the chain is deep. Page cache dropped first.",
        "",
        "| full's data | chain depth | seconds |",
        "| ---: | ---: | ---: |",
    ]
    for full, depth in ((256 * MiB, 30), (1024 * MiB, 30), (2048 * MiB, 30), (1024 * MiB, 10)):
        d = work / f"prune-{full // MiB}-{depth}"
        d.mkdir()
        try:
            secs = asyncio.run(_one(d, full, depth, drop))
        finally:
            shutil.rmtree(d)
        print(f"  prune full={full // MiB} MiB depth={depth}: {secs:.2f}s", file=sys.stderr)
        out.append(f"| {full // MiB} MiB | {depth} | {secs:.2f} |")
    return "\n".join(out) + "\n"
