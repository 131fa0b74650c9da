"""A layer's piece hashes after a prune merge, from the hashes it and its
parent already recorded. Pure: pieces and ranges in, planned pieces out.

A merge (core.merge_plan) gives a layer S more ranges to answer for; its
*view* (the image with its backing chain) does not change. Its new pieces
are cut from the new ranges exactly as a copy cuts them
(core.extents.view_records), and most of them are pieces already recorded:

- a piece S itself recorded with the same place and kind shows the same
  bytes (S's view is unchanged): its hash is reused;
- where S holds no range, S's view is its parent P's view, so a piece P
  recorded with the same place and kind, touching none of S's ranges, is
  reused too;
- a DATA piece inside a ZERO piece of P (again away from S's ranges) reads
  as zeroes: its hash is the hash of zeroes.

Only the rest (a grid cell where S and P both hold bytes, or where ranges
of different kinds now join) must be read from S's view. So a merge reads
in proportion to the cells the merged layers share, not to the disk or to
the data of the full backup underneath. Reused hashes are carried, not
re-derived: damage under them stays detectable by verify and restore, and
nothing is laundered into a fresh hash. What is read is first checked
against the pieces it comes from (:func:`sources`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from virtbackupd.core.extents import (
    Kind,
    Piece,
    Range,
    content_hash,
    overlapping,
    subtract,
    view_records,
)


@dataclass(frozen=True)
class Planned:
    """One piece of the merged layer: its hash known (`content`; empty for
    ZERO) or to be read from the layer's view (`content` None)."""

    offset: int
    length: int
    kind: Kind
    content: bytes | None

    @property
    def end(self) -> int:
        return self.offset + self.length


@cache
def zero_hash(length: int) -> bytes:
    return content_hash(bytes(length))


class _Index:
    """Pieces sorted by offset, looked up by place or by overlap."""

    def __init__(self, pieces: Sequence[Piece]) -> None:
        self.pieces = sorted(pieces, key=lambda p: p.offset)
        self.starts = [p.offset for p in self.pieces]
        self.exact = {(p.offset, p.length, p.kind): p for p in self.pieces}

    def overlapping(self, lo: int, hi: int) -> list[Piece]:
        return [self.pieces[i] for i in overlapping(self.pieces, self.starts, lo, hi)]

    def containing(self, lo: int, hi: int) -> Piece | None:
        i = bisect.bisect_right(self.starts, lo) - 1
        if i >= 0 and self.pieces[i].end >= hi:
            return self.pieces[i]
        return None


class _Spans:
    """Merged [start, end) spans, tested for overlap."""

    def __init__(self, ranges: Sequence[Range]) -> None:
        self.spans = sorted((r.offset, r.end) for r in ranges)
        self.starts = [lo for lo, _ in self.spans]

    def touches(self, lo: int, hi: int) -> bool:
        # Sorted and disjoint: only the last span starting before `hi` can
        # reach past `lo`, unless it starts inside [lo, hi) anyway.
        i = bisect.bisect_left(self.starts, hi) - 1
        return i >= 0 and self.spans[i][1] > lo


def plan_pieces(
    own: Sequence[Piece],
    own_ranges: Sequence[Range],
    parent: Sequence[Piece] | None,
    new_ranges: Sequence[Range],
    grid: int,
) -> list[Planned]:
    """The pieces of a layer whose ranges become `new_ranges` (a superset
    of `own_ranges`), given the pieces it recorded (`own`) and those of its
    backing layer (`parent`, None if unknown or if it has none)."""
    mine = _Index(own)
    below = _Index(parent or ())
    covered = _Spans(own_ranges)
    out: list[Planned] = []
    for off, n, kind in view_records(new_ranges, grid):
        key = (off, n, kind)
        known = mine.exact.get(key)
        if known is None and not covered.touches(off, off + n):
            known = below.exact.get(key)
            if known is None and kind is Kind.DATA:
                zero = below.containing(off, off + n)
                if zero is not None and zero.kind is Kind.ZERO:
                    out.append(Planned(off, n, kind, zero_hash(n)))
                    continue
        if known is not None:
            out.append(Planned(off, n, kind, known.content))
        elif kind is Kind.ZERO:
            # Made of the layer's own ZERO ranges and its backing layer's
            # (kept as such only where they describe this view): a ZERO
            # record is its place alone, nothing to read.
            out.append(Planned(off, n, kind, b""))
        else:
            out.append(Planned(off, n, kind, None))
    return out


class ChainLayer:
    """One layer of a view's chain for :func:`sources`: what it answers for
    and the pieces it recorded."""

    def __init__(self, layer_id: str, ranges: Sequence[Range], pieces: Sequence[Piece]) -> None:
        self.id = layer_id
        self.ranges = ranges
        self.index = _Index(pieces)


def sources(
    chain: Sequence[ChainLayer], spans: Sequence[tuple[int, int]]
) -> list[tuple[str, Piece]]:
    """The recorded pieces whose bytes the view of ``chain[0]`` (chain
    newest first) shows somewhere in `spans` ([start, end) pairs): checking
    each against its hash, in its own layer's view, proves the bytes read
    there. Each piece once, in chain order; a ZERO piece cut to the span
    (its place is all it records)."""
    out: list[tuple[str, Piece]] = []
    for lo, hi in sorted(spans):
        remaining = [(lo, hi)]
        for layer in chain:
            if not remaining:
                break
            for p in layer.index.overlapping(lo, hi):
                if any(a < p.end and b > p.offset for a, b in remaining):
                    if p.kind is Kind.ZERO:  # may span gigabytes: only this part matters
                        a, b = max(p.offset, lo), min(p.end, hi)
                        p = Piece(a, b - a, Kind.ZERO)
                    out.append((layer.id, p))
            remaining = subtract(remaining, layer.ranges)
    seen: set[tuple[str, int]] = set()
    unique = []
    for layer_id, p in out:
        if (layer_id, p.offset) not in seen:
            seen.add((layer_id, p.offset))
            unique.append((layer_id, p))
    return unique


__all__ = ["ChainLayer", "Planned", "plan_pieces", "sources", "zero_hash"]
