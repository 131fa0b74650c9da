"""The copy of a backup: every included disk read concurrently from the
export that serves it (engine.backup.online or .offline) into its new
image in the partial folder, under one bandwidth budget for the domain,
with the progress of all disks together."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from virtbackupd.adapters import qcow2_writer
from virtbackupd.adapters.nbd.client import UnixAddress
from virtbackupd.core.plan import Plan
from virtbackupd.core.policy import Level
from virtbackupd.core.repository_format.names import backing_of, disk_file
from virtbackupd.engine.datapath.copy import (
    CopyOptions,
    CopyProgress,
    CopyResult,
    RateLimit,
    ZeroMode,
    copy_into,
)
from virtbackupd.errors import first_cause


@dataclass
class JobProgress:
    """What a running job has read of what it will read, over all disks."""

    backup_id: str
    domain: str
    started: float = field(default_factory=time.monotonic)
    disks: dict[str, CopyProgress] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return sum(p.bytes_read for p in self.disks.values())

    @property
    def total(self) -> int:
        """Exact once every disk's walk has ended; an estimate before."""
        return sum(p.total_estimate for p in self.disks.values())

    def rate(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else time.monotonic()) - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float | None:
        rate = self.rate(now)
        if rate <= 0 or self.total < self.done:
            return None
        return (self.total - self.done) / rate


ProgressFn = Callable[[JobProgress], None]


@dataclass(frozen=True)
class Source:
    """Where a disk is read from: an NBD export, with the dirty bitmap of
    an incremental's parent checkpoint (None: the whole disk)."""

    address: UnixAddress
    export: str
    bitmap: str | None


@dataclass(frozen=True)
class Exported:
    """What an export (engine.backup.online, .offline) opened: each disk's
    source for the copy, and its size."""

    sources: dict[str, Source]
    sizes: dict[str, int]


@dataclass(frozen=True)
class Target:
    """A disk's new image: its path, size and backing file."""

    image: Path
    size: int
    backing: str | None


def targets(plan: Plan, sizes: Mapping[str, int], partial: Path) -> dict[str, Target]:
    """Each included disk's image in the partial folder. Of the disk's
    size now: a disk grown since the parent gets an overlay larger than
    its backing file (reads zeroes there)."""
    out: dict[str, Target] = {}
    for c in plan.choices:
        if not c.included:
            continue
        backing = None
        if plan.level is Level.INCREMENTAL and c.checkpoint:
            assert plan.parent_backup is not None
            backing = backing_of(plan.parent_backup, c.target)
        out[c.target] = Target(partial / disk_file(c.target), sizes[c.target], backing)
    return out


async def copy_all(
    sources: Mapping[str, Source],
    images: Mapping[str, Target],
    progress: JobProgress,
    *,
    bandwidth: int | None,
    on_progress: ProgressFn | None,
) -> dict[str, CopyResult]:
    """Copy every disk concurrently from its source into its target image."""
    results: dict[str, CopyResult] = {}
    # One budget for the domain: a disk with little to copy leaves the
    # rest to the others.
    limit = RateLimit(bandwidth, CopyOptions().request_size) if bandwidth else None

    async def copy_one(target: str, source: Source) -> None:
        def seen(p: CopyProgress) -> None:
            progress.disks[target] = p
            if on_progress:
                on_progress(progress)

        image = images[target]
        # Written in our own process (adapters.qcow2_writer): a writing
        # qemu-nbd was the slowest part of a backup (docs/performance.md).
        # Durable at commit, which fsyncs every image before the rename.
        async with qcow2_writer.new_image(image.image, image.size, image.backing) as writer:
            results[target] = await copy_into(
                source.address,
                source.export,
                writer,
                dirty_bitmap=source.bitmap,
                connections=2,
                options=CopyOptions(
                    zero_mode=ZeroMode.WRITE_ZEROES if source.bitmap else ZeroMode.SKIP,
                    shared_limit=limit,
                ),
                progress=seen,
            )

    try:
        async with asyncio.TaskGroup() as tg:
            for target, source in sources.items():
                tg.create_task(copy_one(target, source))
    except BaseExceptionGroup as group:
        raise first_cause(group) from group
    return results
