"""core.chain_check: which recorded pieces a restore of the newest view
checks from the copy, which it reads from their own layer, which it
skips; and the watcher's verdicts on bytes."""

from __future__ import annotations

import pytest

from virtbackupd.core.chain_check import (
    ChainCheck,
    ChainDamagedError,
    LayerPiece,
    Seen,
    classify,
)
from virtbackupd.core.extents import Kind, content_hash

D, Z = Kind.DATA, Kind.ZERO


def piece(layer: int, lo: int, hi: int, kind: Kind = D, fill: int = 1) -> LayerPiece:
    content = content_hash(bytes([fill]) * (hi - lo)) if kind is D else b""
    return LayerPiece(layer, lo, hi - lo, kind, content)


@pytest.mark.parametrize(
    ("newer", "older", "seen"),
    [
        ([], (0, 100), Seen.VISIBLE),
        ([(100, 200)], (0, 100), Seen.VISIBLE),  # touching is not overlapping
        ([(0, 100)], (0, 100), Seen.HIDDEN),
        ([(0, 60), (60, 100)], (0, 100), Seen.HIDDEN),  # hidden by two ranges together
        ([(50, 60)], (0, 100), Seen.PARTLY),
        ([(90, 200)], (0, 100), Seen.PARTLY),
    ],
)
def test_classify(newer: list[tuple[int, int]], older: tuple[int, int], seen: Seen) -> None:
    layers = [[piece(0, lo, hi) for lo, hi in newer], [piece(1, *older)]]
    got = classify(layers)
    assert [p.layer for p in got[seen]].count(1) == 1
    assert all(p.layer == 0 for p in got[Seen.VISIBLE] if seen is not Seen.VISIBLE)


def test_a_hidden_layer_hides_for_older_ones_too() -> None:
    layers = [[piece(0, 0, 10)], [piece(1, 0, 100)], [piece(2, 50, 60)]]
    got = classify(layers)
    assert [(p.layer, p.offset) for p in got[Seen.HIDDEN]] == [(2, 50)]
    assert [(p.layer, p.offset) for p in got[Seen.PARTLY]] == [(1, 0)]


def test_pieces_assembled_from_any_cut_of_reads_and_zeroes() -> None:
    data = bytes(range(256)) * 4  # 1024 bytes
    p = LayerPiece(0, 0, 2048, D, content_hash(data + bytes(1024)))
    check = ChainCheck([p])
    check.data(512, memoryview(data[512:]))
    check.zero(1024, 1024)
    assert not check.damage
    check.data(0, memoryview(data[:512]))
    assert not check.damage and check.checked == 2048 and not check.pending


def test_a_piece_the_copy_never_wrote_reads_as_zeroes() -> None:
    check = ChainCheck([LayerPiece(0, 0, 64, D, content_hash(bytes(64)))])
    check.finish()
    assert not check.damage and check.checked == 64


@pytest.mark.parametrize("stop", [True, False])
def test_damage_is_raised_or_collected(stop: bool) -> None:
    pieces = [piece(1, 0, 8, fill=7), LayerPiece(0, 8, 8, Z)]
    check = ChainCheck(pieces, stop_at_first=stop)
    bad = memoryview(bytes([7] * 7 + [8]) + bytes([0] * 7 + [1]))
    if stop:
        with pytest.raises(ChainDamagedError) as err:
            check.data(0, bad)
        assert err.value.damage.layer == 1
    else:
        check.data(0, bad)
        assert [(d.layer, d.offset) for d in check.damage] == [(1, 0), (0, 8)]
