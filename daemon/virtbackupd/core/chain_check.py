"""Checking a backup chain's recorded piece hashes while a restore reads it,
with no pass of its own. Pure: pieces and bytes in, findings out.

A restore copies the newest layer's *view* (the image with its backing
chain). Every layer recorded the pieces its digest covers (offset,
length, kind, and for DATA the XXH3-128 of the bytes). In the view, a
layer's piece shows unchanged unless a newer layer recorded a range that
overlaps it; so each piece of each layer is

- *visible*: no newer layer overlaps it; checked against what the copy
  produces there (its reads, and zeroes where it writes nothing);
- *hidden*: newer layers cover all of it; the restore does not read it;
- *partly hidden*: checked by the caller from that layer's own view
  (a bounded read: at most a piece per edge of a newer range).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from virtbackupd.core.extents import Kind, content_hash, is_zero, overlapping


@dataclass(frozen=True)
class LayerPiece:
    layer: int  # index into the chain, 0 = the newest
    offset: int
    length: int
    kind: Kind
    content: bytes = b""  # XXH3-128 for DATA

    @property
    def end(self) -> int:
        return self.offset + self.length


class Seen(StrEnum):
    VISIBLE = "visible"
    HIDDEN = "hidden"
    PARTLY = "partly hidden"


@dataclass(frozen=True)
class Damage:
    layer: int
    offset: int
    length: int
    what: str


def classify(layers: Sequence[Sequence[LayerPiece]]) -> dict[Seen, list[LayerPiece]]:
    """Sort every layer's pieces (layers newest first) by how the newest
    view shows them."""
    out: dict[Seen, list[LayerPiece]] = {s: [] for s in Seen}
    cover: list[tuple[int, int]] = []  # merged extents of the newer layers
    for pieces in layers:
        for p in pieces:
            covered = _covered(cover, p.offset, p.end)
            if covered == 0:
                out[Seen.VISIBLE].append(p)
            elif covered >= p.length:
                out[Seen.HIDDEN].append(p)
            else:
                out[Seen.PARTLY].append(p)
        cover = _merge(cover + [(p.offset, p.end) for p in pieces])
    out[Seen.VISIBLE].sort(key=lambda p: p.offset)
    return out


def _covered(cover: list[tuple[int, int]], lo: int, hi: int) -> int:
    i = bisect.bisect_right(cover, (lo, 1 << 63)) - 1
    total = 0
    i = max(i, 0)
    while i < len(cover) and cover[i][0] < hi:
        a, b = max(cover[i][0], lo), min(cover[i][1], hi)
        if b > a:
            total += b - a
        i += 1
    return total


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


@dataclass
class _Pending:
    piece: LayerPiece
    buf: bytearray | None = None
    filled: int = 0


@dataclass
class ChainCheck:
    """A copy watcher (engine.datapath.copy.CopyWatch) over the visible pieces.
    `stop_at_first`: raise :class:`ChainDamagedError` on the first damage (a
    refused restore); otherwise collect every finding."""

    visible: list[LayerPiece]
    stop_at_first: bool = True
    damage: list[Damage] = field(default_factory=list)
    checked: int = 0  # bytes compared with a recorded hash or as zeroes

    def __post_init__(self) -> None:
        self.starts = [p.offset for p in self.visible]
        self.pending: dict[int, _Pending] = {}
        self.finished: set[int] = set()

    def _overlapping(self, lo: int, hi: int) -> list[int]:
        return overlapping(self.visible, self.starts, lo, hi)

    def data(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        for i in self._overlapping(offset, end):
            p = self.visible[i]
            lo, hi = max(p.offset, offset), min(p.end, end)
            part = data[lo - offset : hi - offset]
            if p.kind is Kind.ZERO:
                self.checked += hi - lo
                if not is_zero(part):
                    self._found(Damage(p.layer, lo, hi - lo, "should read as zeroes but does not"))
                continue
            if lo == p.offset and hi == p.end and i not in self.pending:
                self._check(p, part)  # the usual case: the read is the piece
                self.finished.add(i)
                continue
            self._fill(i, lo, part)

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        for i in self._overlapping(offset, end):
            p = self.visible[i]
            lo, hi = max(p.offset, offset), min(p.end, end)
            if p.kind is Kind.DATA:
                self._fill(i, lo, None, hi - lo)
            else:
                self.checked += hi - lo

    def finish(self) -> None:
        """Whatever the copy never produced reads as zeroes in the result
        (a fresh image): check the DATA pieces still open as such."""
        for i, p in enumerate(self.visible):
            if p.kind is Kind.DATA and i not in self.finished:
                state = self.pending.pop(i, None)
                buf = state.buf if state is not None and state.buf is not None else None
                self._check(p, bytes(buf) if buf is not None else bytes(p.length))
                self.finished.add(i)

    def _fill(self, i: int, lo: int, part: memoryview | None, n: int = 0) -> None:
        p = self.visible[i]
        state = self.pending.get(i)
        if state is None:
            state = self.pending[i] = _Pending(p)
        length = len(part) if part is not None else n
        if part is not None:
            if state.buf is None:
                state.buf = bytearray(p.length)
            state.buf[lo - p.offset : lo - p.offset + length] = part
        state.filled += length
        if state.filled >= p.length:
            self._check(p, bytes(state.buf) if state.buf is not None else bytes(p.length))
            del self.pending[i]
            self.finished.add(i)

    def _check(self, p: LayerPiece, data: bytes | memoryview) -> None:
        self.checked += p.length
        if content_hash(data) != p.content:
            self._found(Damage(p.layer, p.offset, p.length, "reads differently than recorded"))

    def _found(self, d: Damage) -> None:
        self.damage.append(d)
        if self.stop_at_first:
            raise ChainDamagedError(d)


class ChainDamagedError(Exception):
    """Raised from inside a copy; the restore turns it into an error that
    names the backup and disk."""

    def __init__(self, damage: Damage) -> None:
        self.damage = damage
        super().__init__(damage.what)
