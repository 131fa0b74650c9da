"""core.piece_merge: a merged layer's piece hashes planned from recorded
ones equal the hashes read from its whole view, while only the cells the
merged layers share are read; and the pieces those reads must be checked
against are exactly the ones the view shows there."""

from __future__ import annotations

import itertools
import random

import pytest

from virtbackupd.core.extents import Kind, Piece, Range, content_hash, merge, view_records, widen
from virtbackupd.core.piece_merge import ChainLayer, Planned, plan_pieces, sources, zero_hash

D, Z = Kind.DATA, Kind.ZERO
GRID = 16


def pieces_of(view: bytes, ranges: list[Range], grid: int = GRID) -> list[Piece]:
    """What a copy records for `ranges` of `view`."""
    return [
        Piece(off, n, kind, content_hash(view[off : off + n]) if kind is D else b"")
        for off, n, kind in view_records(ranges, grid)
    ]


def filled(planned: list[Planned], view: bytes) -> list[Piece]:
    return [
        Piece(
            p.offset,
            p.length,
            p.kind,
            p.content if p.content is not None else content_hash(view[p.offset : p.end]),
        )
        for p in planned
    ]


def overlay(below: bytearray, ranges: list[Range], fill: int) -> bytes:
    view = bytearray(below)
    for r in ranges:
        view[r.offset : r.end] = bytes([fill if r.kind is D else 0]) * r.length
    return bytes(view)


def random_ranges(rng: random.Random, size: int, whole: bool) -> list[Range]:
    """Ranges of random kinds; `whole`: they tile the disk (a full)."""
    cuts = sorted({0, size, *(rng.randrange(1, size) for _ in range(rng.randrange(1, 8)))})
    out = []
    for lo, hi in itertools.pairwise(cuts):
        if whole or rng.random() < 0.5:
            out.append(Range(lo, hi - lo, D if rng.random() < 0.6 else Z))
    return merge(out)


@pytest.mark.parametrize("keep_kinds", [True, False])
@pytest.mark.parametrize("seed", range(200))
def test_planned_hashes_equal_the_whole_views(seed: int, keep_kinds: bool) -> None:
    """keep_kinds: the merged layer is the backing layer (a commit, a rebase
    past it); without: ZERO becomes DATA (a rebase onto a sibling)."""
    rng = random.Random(seed)
    size = rng.choice([64, 100, 128, 160])
    full = random_ranges(rng, size, whole=True)
    parent_view = overlay(bytearray(size), full, 0x11)
    own = random_ranges(rng, size, whole=False)
    view = overlay(bytearray(parent_view), own, 0x22 + seed % 7)
    new = widen(own, full, keep_kinds=keep_kinds)

    planned = plan_pieces(pieces_of(view, own), own, pieces_of(parent_view, full), new, GRID)

    assert filled(planned, view) == pieces_of(view, new)
    # Only cells the overlay touches can need reading.
    for p in planned if keep_kinds else ():
        if p.content is None:
            cell = p.offset // GRID * GRID
            assert any(r.offset < cell + GRID and r.end > cell for r in own), (p, own)


def test_cells_of_one_layer_are_reused_and_shared_cells_read() -> None:
    size = 64
    full = [Range(0, 48, D), Range(48, 16, Z)]
    parent_view = overlay(bytearray(size), full, 0x11)
    own = [Range(16, 16, D), Range(36, 4, D)]  # one whole cell, part of another
    view = overlay(bytearray(parent_view), own, 0x22)
    new = widen(own, full, keep_kinds=True)
    planned = plan_pieces(pieces_of(view, own), own, pieces_of(parent_view, full), new, GRID)
    to_read = [(p.offset, p.length) for p in planned if p.content is None]
    assert to_read == [(32, 16)]  # the cell both hold bytes in
    # The parent's ZERO range stays ZERO: nothing to read.
    assert planned[-1] == Planned(48, 16, Z, b"")
    # Merged as DATA (onto a sibling), it hashes as zeroes, still unread.
    new = widen(own, full, keep_kinds=False)
    planned = plan_pieces(pieces_of(view, own), own, pieces_of(parent_view, full), new, GRID)
    assert planned[-1] == Planned(48, 16, D, zero_hash(16))


def test_without_the_parents_pieces_everything_added_is_read() -> None:
    own = [Range(0, 16, D)]
    new = [Range(0, 48, D)]
    view = bytes(range(48))
    planned = plan_pieces(pieces_of(view, own), own, None, new, GRID)
    assert [p.content is None for p in planned] == [False, True, True]


def test_sources_are_the_pieces_the_view_shows_in_the_span() -> None:
    view_full = bytes(64)
    top = ChainLayer("i1", [Range(16, 8, D)], pieces_of(bytes(64), [Range(16, 8, D)]))
    middle = ChainLayer("i0", [Range(0, 32, D)], pieces_of(view_full, [Range(0, 32, D)]))
    f_ranges = [Range(0, 32, D), Range(32, 32, Z)]
    base = ChainLayer("f", f_ranges, pieces_of(view_full, f_ranges))
    got = sources([top, middle, base], [(16, 32)])
    # i1's piece shows; i0's cell [16, 32) shows around it; f is hidden there.
    assert [(layer, p.offset, p.length) for layer, p in got] == [("i1", 16, 8), ("i0", 16, 16)]
    # A span over f's ZERO range: only the span's part of it is to be checked.
    got = sources([top, middle, base], [(40, 48)])
    assert [(layer, p.offset, p.length, p.kind) for layer, p in got] == [("f", 40, 8, Z)]
