"""What a live restore does next, and which recorded pieces of the backup a
moved disk can be checked against. Pure: facts in, decisions out.

A live restore's disks move out of the repository through QEMU's block
stream (libvirt's block pull). QEMU 7.2 segfaults within seconds when
three streams of one domain run at once (seen 7 of 7 times with 3-5
disks, also with plain `virsh blockpull`): after the crash the images had
already dropped their backing file while their copied data was never
written, so they read as zeroes. So the move runs **one pull at a time**
(measured: sequential pulls of three and four disks never crashed), and a
disk counts as moved only once what the running QEMU shows for it was
checked against the backup's recorded piece hashes; "no backing file any
more" alone proves nothing.

The guest keeps writing while the disk moves: those writes are the guest's
and differ from the backup on purpose. A dirty bitmap in each new image,
created before QEMU first opens it (a libvirt checkpoint), records them;
QEMU's copy-on-read writes (the stream's) do not mark it. A piece the
guest wrote since the start is not compared.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from virtbackupd.core import xmldoc
from virtbackupd.core.chain_check import LayerPiece
from virtbackupd.core.extents import Kind

# The checkpoint (and bitmap) that records the guest's writes in a live
# restore's new images. Not virtbackupd's backup prefix: backups of the new
# domain must neither use nor remove it; it is removed when the move ends.
GUEST_WRITES_CHECKPOINT = "live-restore-guest-writes"


@dataclass(frozen=True)
class DiskFacts:
    disk: str
    verified: bool  # its content was checked against the backup
    backed: bool  # the running domain still reads a backing file for it
    pulling: bool  # a block job runs on it


class Step(StrEnum):
    WAIT = "wait"  # a pull runs: one at a time
    PULL = "pull"  # start the pull of `disks[0]`
    CHECK = "check"  # every pull ended: check `disks` against the backup
    FINISH = "finish"  # every disk checked: release the backup


@dataclass(frozen=True)
class Next:
    step: Step
    disks: tuple[str, ...] = ()


def next_step(facts: Sequence[DiskFacts]) -> Next:
    """The next thing to do for a running domain's move (disks in the
    hold's order). A pull running on any disk waits for it to end, whoever
    started it; no check runs beside a pull (libvirt's backup job and a
    block job on one domain)."""
    running = [f.disk for f in facts if f.pulling]
    if running:
        return Next(Step.WAIT, tuple(running))
    todo = [f for f in facts if not f.verified]
    if not todo:
        return Next(Step.FINISH)
    backed = [f.disk for f in todo if f.backed]
    if backed:
        return Next(Step.PULL, (backed[0],))
    return Next(Step.CHECK, tuple(f.disk for f in todo))


def merge_spans(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if hi <= lo:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def touches(spans: Sequence[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether [lo, hi) overlaps any of the merged, sorted `spans`."""
    i = bisect.bisect_right(spans, (lo, 1 << 63)) - 1
    return any(0 <= j < len(spans) and spans[j][0] < hi and lo < spans[j][1] for j in (i, i + 1))


def subtract_spans(
    spans: Sequence[tuple[int, int]], minus: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """`spans` without what the merged, sorted `minus` covers."""
    out: list[tuple[int, int]] = []
    for lo, hi in merge_spans(spans):
        pos = lo
        i = max(bisect.bisect_right(minus, (lo, 1 << 63)) - 1, 0)
        while i < len(minus) and minus[i][0] < hi:
            a, b = minus[i]
            if b > pos:
                if a > pos:
                    out.append((pos, min(a, hi)))
                pos = max(pos, b)
            i += 1
        if pos < hi:
            out.append((pos, hi))
    return out


@dataclass(frozen=True)
class Checkable:
    """The pieces one check compares, and what it leaves to the guest."""

    whole: tuple[LayerPiece, ...]  # compare with the recorded hash / as zeroes
    guest_bytes: int  # bytes of DATA pieces not compared: the guest wrote there


def checkable(pieces: Sequence[LayerPiece], written: Sequence[tuple[int, int]]) -> Checkable:
    """Of the backup's `pieces` (as the newest view shows them), those the
    guest did not write since the restore started (`written`: merged,
    sorted). A DATA piece touched by a guest write is left out whole (its
    hash covers the whole piece); a ZERO piece stays, and the caller checks
    it as zeroes outside `written`."""
    whole: list[LayerPiece] = []
    skipped = 0
    for p in pieces:
        if p.kind is Kind.DATA and touches(written, p.offset, p.end):
            skipped += p.length
        else:
            whole.append(p)
    return Checkable(tuple(whole), skipped)


def backed_targets(xml: str) -> set[str]:
    """Targets of the disks whose `<backingStore>` in a running domain's
    live XML names a source: libvirt updates it when a pull ends."""
    root = xmldoc.parse(xml, "live domain XML", "domain")
    out = set()
    for d in root.iterfind("./devices/disk"):
        target = d.find("target")
        if target is not None and d.find("backingStore/source") is not None:
            out.add(str(target.get("dev")))
    return out


# A pull that ends before its end (QEMU's block stream failed) is started
# again at most this many times in one run of the domain's QEMU, after a
# growing pause; one that failed for want of space is not started again
# until there is room (or the domain restarts).
PULL_ATTEMPTS = 3
PULL_BACKOFF_S = 30.0


class PullVerdict(StrEnum):
    PULL = "pull"  # start it (again)
    WAIT = "wait"  # failed before: the pause before the next attempt runs
    STOP = "stop"  # failed too often, or for want of space: the operator acts


def pull_verdict(failures: int, since_failure_s: float | None) -> PullVerdict:
    """Whether to start a disk's pull, given how many of its pulls ended
    unfinished in this QEMU run (PULL_ATTEMPTS: given up) and the seconds
    since the last did."""
    if failures <= 0:
        return PullVerdict.PULL
    if failures >= PULL_ATTEMPTS:
        return PullVerdict.STOP
    pause = PULL_BACKOFF_S * 2 ** (failures - 1)
    if since_failure_s is not None and since_failure_s < pause:
        return PullVerdict.WAIT
    return PullVerdict.PULL
