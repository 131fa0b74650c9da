"""Which byte ranges a copy reads, zeroes or skips, and how they are cut
into requests. Pure: extent lists in, ranges and pieces out.

A copy sees the source as merged, maximal *ranges* of one kind:

- DATA: must be read and written;
- ZERO: reads as zeroes (written as WRITE_ZEROES on an overlay, skipped on
  a fresh image).

Ranges not listed (clean parts of an incremental) are not touched. DATA
ranges are cut at multiples of the grid (the request size), so the pieces,
and the content digest built over them, depend only on the ranges, not on
how the server happened to answer block-status requests.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, overload

import xxhash

# Block-status flags as NBD reports them (the values are the protocol's):
# base:allocation sets HOLE and ZERO, qemu:dirty-bitmap:NAME sets DIRTY.
STATE_HOLE = 1 << 0  # base:allocation: not allocated
STATE_ZERO = 1 << 1  # base:allocation: reads as zeroes
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:NAME: changed since the bitmap started


@dataclass(frozen=True)
class Extent:
    """One block-status extent: a byte range and its flags (STATE_*)."""

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class Kind(StrEnum):
    DATA = "data"
    ZERO = "zero"


@dataclass(frozen=True)
class Range:
    offset: int
    length: int
    kind: Kind

    @property
    def end(self) -> int:
        return self.offset + self.length


class LazyRanges(Sequence[Range]):
    """A stored range list parsed (and checked) only when first read: a
    listing of fragmented backups (100 000 ranges a disk) reads none of
    them. `parse` raises what a bad list deserves, at that first read."""

    __slots__ = ("_parse", "_ranges")

    def __init__(self, parse: Callable[[], tuple[Range, ...]]) -> None:
        self._parse: Callable[[], tuple[Range, ...]] | None = parse
        self._ranges: tuple[Range, ...] | None = None

    def _get(self) -> tuple[Range, ...]:
        if self._ranges is None:
            assert self._parse is not None
            self._ranges = self._parse()
            self._parse = None  # and what it held (the raw list) with it
        return self._ranges

    @property
    def parsed(self) -> bool:
        return self._ranges is not None

    @overload
    def __getitem__(self, index: int) -> Range: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Range]: ...
    def __getitem__(self, index: int | slice) -> Range | Sequence[Range]:
        return self._get()[index]

    def __len__(self) -> int:
        return len(self._get())

    def __iter__(self) -> Iterator[Range]:
        return iter(self._get())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return self._get() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._get())

    def __repr__(self) -> str:
        return f"LazyRanges({self._get()!r})" if self.parsed else "LazyRanges(<not read>)"


def ranges_from_status(
    allocation: Sequence[Extent], dirty: Sequence[Extent] | None = None
) -> tuple[list[Range], int]:
    """Ranges described by one block-status answer, and where it ends.

    `allocation` is base:allocation (ZERO flag: reads as zeroes; anything
    else is data, including a hole that does not read as zero). With
    `dirty` (a qemu:dirty-bitmap context) only dirty parts are kept.
    The answer covers up to the shorter of the two lists.
    """
    if not allocation:
        return [], 0
    end = allocation[-1].end
    if dirty is not None:
        if not dirty:
            return [], 0
        end = min(end, dirty[-1].end)
    out: list[Range] = []
    for a in allocation:
        kind = Kind.ZERO if a.flags & STATE_ZERO else Kind.DATA
        if dirty is None:
            _append(out, a.offset, min(a.end, end), kind)
            continue
        for d in dirty:
            if not d.flags & STATE_DIRTY:
                continue
            lo, hi = max(a.offset, d.offset), min(a.end, d.end, end)
            if lo < hi:
                _append(out, lo, hi, kind)
    return out, end


def _append(out: list[Range], lo: int, hi: int, kind: Kind) -> None:
    if lo >= hi:
        return
    if out and out[-1].end == lo and out[-1].kind is kind:
        last = out.pop()
        out.append(Range(last.offset, hi - last.offset, kind))
    else:
        out.append(Range(lo, hi - lo, kind))


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, adjacent ranges of the same kind joined; overlapping DATA
    ranges (from rounding at window edges) are united."""
    out: list[Range] = []
    for r in sorted(ranges, key=lambda r: r.offset):
        if out and r.offset < out[-1].end:
            last = out[-1]
            if r.kind is not Kind.DATA or last.kind is not Kind.DATA:
                raise ValueError(f"zero range overlaps another range at {r.offset}")
            out[-1] = Range(last.offset, max(last.end, r.end) - last.offset, Kind.DATA)
            continue
        _append(out, r.offset, r.end, r.kind)
    return out


def align(ranges: Sequence[Range], alignment: int, size: int) -> list[Range]:
    """Make every boundary a multiple of `alignment` (or the disk end).

    Rounding always grows DATA: data ranges grow outward, zero ranges
    shrink inward and their cut-off edges become data, so no byte that must
    be copied is ever dropped (at worst a few zero bytes are copied as data).
    """
    if alignment <= 1:
        return list(ranges)

    def up(x: int) -> int:
        return min(size, -(-x // alignment) * alignment)

    def down(x: int) -> int:
        return x - x % alignment

    data: list[tuple[int, int]] = []
    zero: list[Range] = []
    for r in ranges:
        if r.kind is Kind.ZERO:
            zlo = up(r.offset)
            zhi = r.end if r.end == size else down(r.end)
            if zlo < zhi:
                zero.append(Range(zlo, zhi - zlo, Kind.ZERO))
                if r.offset < zlo:
                    data.append((down(r.offset), zlo))
                if zhi < r.end:
                    data.append((zhi, up(r.end)))
                continue
        data.append((down(r.offset), up(r.end)))
    data.sort()
    union: list[tuple[int, int]] = []
    for lo, hi in data:
        if union and lo <= union[-1][1]:
            union[-1] = (union[-1][0], max(hi, union[-1][1]))
        else:
            union.append((lo, hi))
    # A zero range only keeps whole aligned blocks no data range touches.
    return merge([Range(lo, hi - lo, Kind.DATA) for lo, hi in union] + zero)


def data_pieces(r: Range, grid: int) -> Iterator[tuple[int, int]]:
    """(offset, length) requests of a data range, cut at multiples of `grid`."""
    pos = r.offset
    while pos < r.end:
        nxt = min(r.end, (pos // grid + 1) * grid)
        yield pos, nxt - pos
        pos = nxt


def zero_pieces(r: Range, max_length: int) -> Iterator[tuple[int, int]]:
    """(offset, length) WRITE_ZEROES requests of a zero range."""
    pos = r.offset
    while pos < r.end:
        n = min(max_length, r.end - pos)
        yield pos, n
        pos += n


class Spanned(Protocol):
    @property
    def offset(self) -> int: ...

    @property
    def end(self) -> int: ...


def overlapping(items: Sequence[Spanned], starts: Sequence[int], lo: int, hi: int) -> list[int]:
    """Indices of the `items` that overlap [lo, hi): items sorted by offset,
    apart from each other, `starts` their offsets (so only the one item
    before `lo` can reach into it)."""
    i = max(bisect.bisect_right(starts, lo) - 1, 0)
    out = []
    while i < len(items) and items[i].offset < hi:
        if items[i].end > lo:
            out.append(i)
        i += 1
    return out


@dataclass(frozen=True)
class Read:
    """One read request of the copy: the data `pieces` (offset, length),
    all within [offset, offset + length); what lies between them reads as
    zeroes and is neither written nor checked as data."""

    offset: int
    length: int
    pieces: tuple[tuple[int, int], ...]


class ReadJoiner:
    """Joins data pieces, in offset order, into reads of at most `grid`
    bytes across zero ranges of at most `gap` bytes; never across a part
    not copied (in an incremental that is clean data: real reads)."""

    def __init__(self, grid: int, gap: int) -> None:
        self.grid = grid
        self.gap = gap
        self.pieces: list[tuple[int, int]] = []
        self.end = -1  # where the next piece must start to join the pending ones

    def add(self, offset: int, length: int) -> list[Read]:
        """A data piece; returns the reads it completes."""
        out = []
        if self.pieces and (offset != self.end or offset + length - self.pieces[0][0] > self.grid):
            out = self.flush()
        self.pieces.append((offset, length))
        self.end = offset + length
        return out

    def after(self, zero: Range) -> list[Read]:
        """A zero range follows the pieces so far."""
        if zero.offset == self.end and zero.length <= self.gap:
            self.end = zero.end
            return []
        return self.flush()

    def flush(self) -> list[Read]:
        if not self.pieces:
            return []
        first, (last, n) = self.pieces[0][0], self.pieces[-1]
        out = [Read(first, last + n - first, tuple(self.pieces))]
        self.pieces = []
        self.end = -1
        return out


class Frontier:
    """Turns block-status answers, window by window, into final ranges.

    A range that touches the end of what is known so far may still grow with
    the next answer; it is held back, so the emitted ranges are the same
    however the server cut its answers.
    """

    def __init__(self, size: int, grid: int, alignment: int) -> None:
        self.size = size
        self.grid = grid
        self.alignment = alignment
        self._tail: list[Range] = []

    def feed(self, ranges: Sequence[Range], known_end: int) -> list[Range]:
        """Ranges that are final once the source is known up to `known_end`."""
        combined = merge([*self._tail, *align(ranges, self.alignment, self.size)])
        self._tail = []
        if known_end >= self.size:
            return combined
        emit: list[Range] = []
        cut = known_end - known_end % self.grid
        for r in combined:
            if r.end < known_end:
                emit.append(r)
            elif r.kind is Kind.DATA and r.offset < cut:
                emit.append(Range(r.offset, cut - r.offset, Kind.DATA))
                if r.end > cut:
                    self._tail.append(Range(cut, r.end - cut, Kind.DATA))
            else:
                self._tail.append(r)
        return emit

    def finish(self) -> list[Range]:
        tail, self._tail = self._tail, []
        return tail


@dataclass(frozen=True)
class Piece:
    """One record of a disk's digest: a DATA piece with the XXH3-128 of its
    bytes, or a ZERO range (its place only)."""

    offset: int
    length: int
    kind: Kind
    content: bytes = b""

    @property
    def end(self) -> int:
        return self.offset + self.length


_ZEROS = bytes(4 * 1024 * 1024)


def is_zero(data: bytes | memoryview) -> bool:
    """Whether `data` is all zero bytes. Comparing a memoryview goes byte by
    byte in Python's C code (240 us for 64 KiB); a copy to bytes and a
    memcmp take 3 us. Data usually differs from zeroes in its first bytes:
    look there first."""
    if bytes(data[:16]) != _ZEROS[: min(16, len(data))]:
        return False
    view = memoryview(data)
    for pos in range(0, len(view), len(_ZEROS)):
        part = view[pos : pos + len(_ZEROS)]
        if bytes(part) != _ZEROS[: len(part)]:
            return False
    return True


def content_hash(data: bytes | memoryview) -> bytes:
    """XXH3-128 of a DATA piece: it detects corrupted bytes at ~25 GB/s,
    where SHA-256 (1.3 GB/s here) took 40 % of the copy's CPU. Backups are
    protected from tampering by the file system, not by this hash."""
    return xxhash.xxh3_128(data).digest()


def piece_record(offset: int, length: int, kind: Kind, content: bytes = b"") -> bytes:
    """One record of the content digest (see :func:`digest_of`)."""
    tag = b"D" if kind is Kind.DATA else b"Z"
    return struct.pack(">QQ", offset, length) + tag + content


def digest_of(records: Iterable[tuple[int, bytes]]) -> str:
    """The content digest of a copy: SHA-256 over its piece records in
    offset order (:func:`pieces_of`). A DATA piece's record holds the
    XXH3-128 of its bytes (:func:`content_hash`); a ZERO range's record
    only its place (its content is zeroes by definition).
    """
    return hashlib.sha256(pieces_of(records)).hexdigest()


def pieces_of(records: Iterable[tuple[int, bytes]]) -> bytes:
    """The piece records in offset order, back to back: the ``.pieces``
    file beside a backup image, whose SHA-256 is the digest."""
    return b"".join(rec for _, rec in sorted(records, key=lambda r: r[0]))


def ranges_to_json(ranges: Iterable[Range]) -> list[list[object]]:
    """The manifest's form of a range list: ``[[offset, length, kind], ...]``."""
    return [[r.offset, r.length, r.kind.value] for r in ranges]


_KINDS = {k.value: k for k in Kind}


def ranges_from_json(items: Iterable[Sequence[object]]) -> list[Range]:
    out: list[Range] = []
    canonical = True  # sorted, apart, neighbours of one kind joined: as written
    for item in items:
        offset, length, kind_name = item
        kind = _KINDS.get(kind_name) if isinstance(kind_name, str) else None
        if type(offset) is not int or type(length) is not int or length <= 0 or kind is None:
            raise ValueError(f"bad range {item!r}")
        if out:
            last = out[-1]
            if offset < last.end or (offset == last.end and kind is last.kind):
                canonical = False
        out.append(Range(offset, length, kind))
    # A manifest holds merged ranges (ranges_to_json of a merged list): a
    # fragmented disk's tens of thousands are taken as they are.
    return out if canonical else merge(out)


def subtract(
    intervals: Iterable[tuple[int, int]], ranges: Sequence[Range]
) -> list[tuple[int, int]]:
    """The parts of [start, end) `intervals` that no range covers."""
    cover = sorted((r.offset, r.end) for r in ranges)
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        pos = lo
        for clo, chi in cover:
            if chi <= pos or clo >= hi:
                continue
            if clo > pos:
                out.append((pos, clo))
            pos = max(pos, chi)
            if pos >= hi:
                break
        if pos < hi:
            out.append((pos, hi))
    return out


def covers(ranges: Sequence[Range], size: int) -> bool:
    """Whether `ranges` answer for every byte of [0, size)."""
    return not subtract([(0, size)], ranges)


def widen(own: Sequence[Range], added: Iterable[Range], keep_kinds: bool = False) -> list[Range]:
    """A layer's ranges after a merge gave it more to answer for: its own
    ranges keep their kind; the added parts it does not cover keep theirs
    with `keep_kinds` (`added` describes the layer's view there: it is the
    layer's own backing layer), and otherwise become DATA (whatever the
    layer shows there gets hashed: a kind another layer recorded need not
    hold for this one's view)."""
    extra: list[Range] = []
    for r in added:
        for lo, hi in subtract([(r.offset, r.end)], own):
            extra.append(Range(lo, hi - lo, r.kind if keep_kinds else Kind.DATA))
    return merge([*own, *extra])


def view_records(ranges: Sequence[Range], grid: int) -> Iterator[tuple[int, int, Kind]]:
    """The pieces a digest over `ranges` is built from: DATA cut at grid
    multiples, ZERO whole (the same cut the copy makes)."""
    for r in ranges:
        if r.kind is Kind.DATA:
            for off, n in data_pieces(r, grid):
                yield off, n, Kind.DATA
        else:
            yield r.offset, r.length, Kind.ZERO
