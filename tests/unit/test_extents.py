"""Planning what a copy reads: ranges from block status, alignment,
cutting into pieces, and a digest independent of the server's answers."""

from __future__ import annotations

import random

import pytest

from virtbackupd.adapters.nbd.protocol import STATE_DIRTY, STATE_HOLE, STATE_ZERO, Extent
from virtbackupd.core.extents import (
    Frontier,
    Kind,
    Range,
    Read,
    ReadJoiner,
    align,
    data_pieces,
    is_zero,
    merge,
    overlapping,
    ranges_from_json,
    ranges_from_status,
    ranges_to_json,
)

D, Z = Kind.DATA, Kind.ZERO
K = 1024


def test_full_copy_ranges_from_allocation() -> None:
    alloc = [
        Extent(0, 64 * K, 0),
        Extent(64 * K, 64 * K, STATE_HOLE | STATE_ZERO),
        Extent(128 * K, 64 * K, STATE_ZERO),  # allocated zeroes
        Extent(192 * K, 64 * K, STATE_HOLE),  # hole that does not read as zero
    ]
    ranges, end = ranges_from_status(alloc)
    assert end == 256 * K
    assert ranges == [Range(0, 64 * K, D), Range(64 * K, 128 * K, Z), Range(192 * K, 64 * K, D)]


def test_incremental_keeps_only_dirty_parts() -> None:
    alloc = [Extent(0, 128 * K, 0), Extent(128 * K, 128 * K, STATE_HOLE | STATE_ZERO)]
    dirty = [Extent(0, 64 * K, 0), Extent(64 * K, 128 * K, STATE_DIRTY), Extent(192 * K, 32 * K, 0)]
    ranges, end = ranges_from_status(alloc, dirty)
    assert end == 224 * K, "the answer covers up to the shorter context"
    assert ranges == [Range(64 * K, 64 * K, D), Range(128 * K, 64 * K, Z)]


@pytest.mark.parametrize(
    ("ranges", "expected"),
    [
        # Misaligned data grows outward.
        ([Range(100, 200, D)], [Range(0, 512, D)]),
        # A zero range shrinks inward; its edges become data.
        ([Range(100, 2000, Z)], [Range(0, 512, D), Range(512, 1536, Z), Range(2048, 512, D)]),
        # Too small to hold an aligned block: all data.
        ([Range(100, 300, Z)], [Range(0, 512, D)]),
        # Zero to the (unaligned) disk end keeps its end.
        ([Range(3072, 1000, Z)], [Range(3072, 1000, Z)]),
        # Data/zero boundary inside a block: data wins.
        ([Range(0, 700, D), Range(700, 1348, Z)], [Range(0, 1024, D), Range(1024, 1024, Z)]),
    ],
)
def test_alignment_only_grows_data(ranges: list[Range], expected: list[Range]) -> None:
    assert align(ranges, 512, 4072) == merge(expected)


def test_merge_unites_overlapping_data_but_refuses_zero_overlaps() -> None:
    assert merge([Range(0, 10, D), Range(5, 10, D)]) == [Range(0, 15, D)]
    with pytest.raises(ValueError, match="zero range overlaps"):
        merge([Range(0, 10, D), Range(5, 10, Z)])


def test_data_pieces_follow_the_grid() -> None:
    assert list(data_pieces(Range(3 * K, 10 * K, D), 4 * K)) == [
        (3 * K, K),
        (4 * K, 4 * K),
        (8 * K, 4 * K),
        (12 * K, K),
    ]


def _random_disk(rng: random.Random, size: int, unit: int) -> list[Range]:
    out, pos = [], 0
    while pos < size:
        n = min(size - pos, rng.randint(1, 40) * unit)
        out.append(Range(pos, n, rng.choice([D, Z])))
        pos += n
    return merge(out)


@pytest.mark.parametrize("seed", range(20))
def test_frontier_output_does_not_depend_on_windows(seed: int) -> None:
    """However the server cuts its answers, the emitted DATA pieces and the
    merged ranges are the same."""
    rng = random.Random(seed)
    size, grid = 4 * 1024 * K, 256 * K
    disk = _random_disk(rng, size, 4 * K)

    def run(cuts: list[int]) -> tuple[list[tuple[int, int]], list[Range]]:
        frontier = Frontier(size, grid, 4 * K)
        emitted: list[Range] = []
        prev = 0
        for cut in [*cuts, size]:
            window = [
                Range(max(r.offset, prev), min(r.end, cut) - max(r.offset, prev), r.kind)
                for r in disk
                if r.offset < cut and r.end > prev
            ]
            emitted += frontier.feed(window, cut)
            prev = cut
        emitted += frontier.finish()
        pieces = [p for r in emitted if r.kind is D for p in data_pieces(r, grid)]
        return pieces, merge(emitted)

    reference = run([])
    for _ in range(5):
        cuts = sorted(rng.sample(range(4 * K, size, 4 * K), rng.randint(1, 30)))
        assert run(cuts) == reference
    assert reference[1] == disk


@pytest.mark.parametrize("length", [0, 1, 15, 16, 64 * K, 4 * K * K, 4 * K * K + 3, 9 * K * K])
@pytest.mark.parametrize("where", [None, 0, 15, -1])
def test_is_zero(length: int, where: int | None) -> None:
    """Zeroes of any length, and one non-zero byte anywhere (first bytes,
    the end, past the first 4 MiB), as bytes and as memoryviews."""
    data = bytearray(length)
    if where is not None and length:
        data[where % length] = 7
    want = where is None or not length
    assert is_zero(bytes(data)) is want
    assert is_zero(memoryview(data)) is want


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        # as a manifest holds them: taken as they are
        (
            [[0, 8, "data"], [8, 8, "zero"], [32, 8, "data"]],
            [Range(0, 8, D), Range(8, 8, Z), Range(32, 8, D)],
        ),
        # out of order, or neighbours of one kind apart: merged
        ([[8, 8, "zero"], [0, 8, "data"]], [Range(0, 8, D), Range(8, 8, Z)]),
        ([[0, 8, "data"], [8, 8, "data"]], [Range(0, 16, D)]),
        ([[0, 16, "data"], [8, 16, "data"]], [Range(0, 24, D)]),
        ([], []),
    ],
)
def test_ranges_from_json(items: list[list[object]], expected: list[Range]) -> None:
    assert ranges_from_json(items) == expected
    assert ranges_from_json(ranges_to_json(expected)) == expected


@pytest.mark.parametrize(
    "item",
    [
        [0, 0, "data"],
        [0, -1, "zero"],
        ["0", 8, "data"],
        [0, 8, "hole"],
        [0, 8, ["data"]],
        [True, 8, "data"],
        [0, 8.0, "data"],
    ],
)
def test_ranges_from_json_refuses_bad_items(item: list[object]) -> None:
    with pytest.raises(ValueError, match="bad range"):
        ranges_from_json([item])


def test_ranges_from_json_refuses_overlapping_zero() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        ranges_from_json([[0, 16, "zero"], [8, 16, "data"]])


def _joined(ranges: list[Range], grid: int = 8 * K, gap: int = 2 * K) -> list[Read]:
    """What the copy does with a window's ranges (engine.datapath.copy._enqueue)."""
    joiner, out = ReadJoiner(grid, gap), []
    for r in ranges:
        if r.kind is D:
            for off, n in data_pieces(r, grid):
                out += joiner.add(off, n)
        else:
            out += joiner.after(r)
    return out + joiner.flush()


@pytest.mark.parametrize(
    ("ranges", "expected"),
    [
        # short zero ranges between data: one read
        (
            [Range(0, K, D), Range(K, 2 * K, Z), Range(3 * K, K, D)],
            [Read(0, 4 * K, ((0, K), (3 * K, K)))],
        ),
        # a zero range longer than the gap: two reads
        (
            [Range(0, K, D), Range(K, 3 * K, Z), Range(4 * K, K, D)],
            [Read(0, K, ((0, K),)), Read(4 * K, K, ((4 * K, K),))],
        ),
        # a part not copied (clean, in an incremental): never joined across
        (
            [Range(0, K, D), Range(2 * K, K, D)],
            [Read(0, K, ((0, K),)), Read(2 * K, K, ((2 * K, K),))],
        ),
        # no read beyond the grid (pieces stay cut at its multiples)
        (
            [Range(4 * K, 6 * K, D), Range(10 * K, K, Z), Range(11 * K, 2 * K, D)],
            [
                Read(4 * K, 6 * K, ((4 * K, 4 * K), (8 * K, 2 * K))),
                Read(11 * K, 2 * K, ((11 * K, 2 * K),)),
            ],
        ),
        # zero ranges alone: nothing to read
        ([Range(0, K, Z), Range(K, 8 * K, Z)], []),
    ],
)
def test_reads_join_data_across_short_zero_ranges(
    ranges: list[Range], expected: list[Read]
) -> None:
    assert _joined(ranges) == expected


@pytest.mark.parametrize("seed", range(20))
def test_joined_reads_cover_every_data_byte_once_and_stay_in_the_grid(seed: int) -> None:
    rnd = random.Random(seed)
    ranges: list[Range] = []
    pos = 0
    for _ in range(60):
        n = rnd.choice([1, 1, 2, 3, 9]) * K
        kind = rnd.choice([D, Z])
        if ranges and ranges[-1].kind is kind and ranges[-1].end == pos:
            kind = D if kind is Z else Z
        ranges.append(Range(pos, n, kind))
        pos += n + rnd.choice([0, 0, 0, K])  # sometimes a part not copied
    reads = _joined(ranges)
    pieces = [p for r in reads for p in r.pieces]
    assert pieces == [p for r in ranges if r.kind is D for p in data_pieces(r, 8 * K)]
    for r in reads:
        assert r.length <= 8 * K
        assert r.offset == r.pieces[0][0] and r.offset + r.length == sum(r.pieces[-1])
        # between pieces only zero ranges, none longer than the gap
        for (a, n), (b, _) in zip(r.pieces, r.pieces[1:], strict=False):
            between = [x for x in ranges if a + n <= x.offset < b]
            assert sum(x.length for x in between) == b - (a + n)
            assert all(x.kind is Z and x.length <= 2 * K for x in between)


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0, 1, [0]),
        (0, 9 * K, [0, 1]),
        (3 * K, 4 * K, []),
        (5 * K, 11 * K, [1, 2]),
        (20 * K, 30 * K, []),
    ],
)
def test_overlapping_finds_the_items_a_span_touches(lo: int, hi: int, expected: list[int]) -> None:
    items = [Range(0, 3 * K, D), Range(4 * K, 4 * K, Z), Range(10 * K, 2 * K, D)]
    assert overlapping(items, [r.offset for r in items], lo, hi) == expected
