"""The live restore's decisions (core.live_move): one pull at a time, a
disk is released only after its check, and the guest's writes are left
out of the check piece by piece."""

from __future__ import annotations

import pytest

from virtbackupd.core.chain_check import LayerPiece
from virtbackupd.core.extents import Kind
from virtbackupd.core.live_move import (
    DiskFacts,
    Next,
    Step,
    backed_targets,
    checkable,
    merge_spans,
    next_step,
    subtract_spans,
)


def f(disk: str, verified: bool = False, backed: bool = True, pulling: bool = False) -> DiskFacts:
    return DiskFacts(disk, verified, backed, pulling)


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        # Nothing started: the first pull only, never one per disk at once.
        ([f("vda"), f("vdb"), f("vdc")], Next(Step.PULL, ("vda",))),
        # A pull runs: wait, whatever the other disks need.
        ([f("vda", pulling=True), f("vdb"), f("vdc")], Next(Step.WAIT, ("vda",))),
        ([f("vda", backed=False), f("vdb", pulling=True), f("vdc")], Next(Step.WAIT, ("vdb",))),
        # A pull ended: the next one, the check waits until every pull ended.
        ([f("vda", backed=False), f("vdb"), f("vdc")], Next(Step.PULL, ("vdb",))),
        # Every pull ended: check what is not checked yet.
        (
            [f("vda", verified=True, backed=False), f("vdb", backed=False), f("vdc", backed=False)],
            Next(Step.CHECK, ("vdb", "vdc")),
        ),
        # No backing file alone is not "moved": checked first.
        ([f("vda", backed=False)], Next(Step.CHECK, ("vda",))),
        # A disk pulled again after a restart (backed again) is pulled first.
        ([f("vda", backed=False), f("vdb", backed=True)], Next(Step.PULL, ("vdb",))),
        (
            [f("vda", verified=True, backed=False), f("vdb", verified=True, backed=False)],
            Next(Step.FINISH),
        ),
    ],
)
def test_next_step_runs_one_pull_at_a_time_and_checks_before_finishing(
    facts: list[DiskFacts], expected: Next
) -> None:
    assert next_step(facts) == expected


def p(offset: int, length: int, kind: Kind = Kind.DATA) -> LayerPiece:
    return LayerPiece(0, offset, length, kind, b"h" * 16 if kind is Kind.DATA else b"")


def test_a_data_piece_the_guest_wrote_is_left_out_whole_and_counted() -> None:
    pieces = [p(0, 100), p(100, 100), p(200, 100), p(300, 700, Kind.ZERO)]
    got = checkable(pieces, [(150, 160), (500, 600)])
    # The written DATA piece goes; a ZERO piece stays (checked outside the writes).
    assert got.whole == (pieces[0], pieces[2], pieces[3])
    assert got.guest_bytes == 100
    assert checkable(pieces, []).whole == tuple(pieces)
    # Touching only at an edge is no overlap.
    assert checkable(pieces, [(100, 100), (200, 200)]).whole == tuple(pieces)
    assert checkable(pieces, [(199, 201)]).guest_bytes == 200


@pytest.mark.parametrize(
    ("spans", "minus", "expected"),
    [
        ([(0, 100)], [], [(0, 100)]),
        ([(0, 100)], [(10, 20), (50, 60)], [(0, 10), (20, 50), (60, 100)]),
        ([(0, 100)], [(0, 100)], []),
        ([(10, 20)], [(0, 15)], [(15, 20)]),
        ([(10, 20), (30, 40)], [(15, 35)], [(10, 15), (35, 40)]),
        ([(10, 20)], [(20, 30)], [(10, 20)]),
    ],
)
def test_subtract_spans(
    spans: list[tuple[int, int]], minus: list[tuple[int, int]], expected: list[tuple[int, int]]
) -> None:
    assert subtract_spans(spans, merge_spans(minus)) == expected


def test_backed_targets_reads_the_live_xml_not_the_image_header() -> None:
    xml = """<domain type='qemu'><name>n</name><devices>
      <disk type='file' device='disk'><source file='/a.qcow2'/>
        <backingStore type='file'><format type='qcow2'/><source file='/r/vda.qcow2'/>
        <backingStore/></backingStore><target dev='vda' bus='virtio'/></disk>
      <disk type='file' device='disk'><source file='/b.qcow2'/><backingStore/>
        <target dev='vdb' bus='virtio'/></disk>
      <disk type='file' device='disk'><source file='/c.qcow2'/><target dev='vdc'/></disk>
    </devices></domain>"""
    assert backed_targets(xml) == {"vda"}
