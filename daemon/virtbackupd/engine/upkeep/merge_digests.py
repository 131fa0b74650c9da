"""The digests of the layers a prune merges, at a cost that follows the
merge, not the disk.

A merge gives a layer more ranges to answer for while its view stays the
same. Its new piece hashes are planned from the hashes it and its parent
already recorded (core.piece_merge); only the grid cells the merged
layers share are read back from the view. Before a prune's journal is
written, :func:`check_inputs` plays the whole plan through on the
recorded pieces alone, and checks every recorded piece whose bytes those
reads will see, each in its own layer's view: a merge never turns damaged
bytes into a fresh hash. It also checks every piece of each pruned layer
whose bytes move into a kept one: their hashes are carried over, and damage
in them, found only after the merge, would be blamed on the kept backup
while the damaged original is gone.

Backups of repository format 1 (no piece files) are read whole, as before.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from virtbackupd.adapters.repository import read_manifest, read_pieces
from virtbackupd.core import extents
from virtbackupd.core.extents import Kind, Piece, Range
from virtbackupd.core.merge_plan import Consolidate, Op, Rebase, Remove
from virtbackupd.core.piece_merge import ChainLayer, plan_pieces, sources
from virtbackupd.core.records import DiskRecord
from virtbackupd.core.repository_format.codec import RepositoryFormatError
from virtbackupd.core.repository_format.manifest import Manifest, next_pieces_name
from virtbackupd.engine.datapath.content import digest_image, hashes_at, non_zero, open_view
from virtbackupd.errors import PruneError

Key = tuple[str, str]  # (backup id, disk)


def damaged(backup_id: str, disk: str) -> PruneError:
    return PruneError(
        f"backup {backup_id} disk {disk} does not match its recorded digest; nothing was "
        "pruned (a damaged layer is never merged). Run `virtbackup verify` and keep the "
        "damaged chain for inspection"
    )


# C901: one branch per input a merge refuses, each with its own message
async def check_inputs(  # noqa: C901 (see above)
    domain_dir: Path, ops: Sequence[Op], manifests: Mapping[str, Manifest], runtime_dir: Path
) -> None:
    """Every byte the merges of `ops` will hash anew still shows what its
    layer recorded (raises :class:`PruneError` naming the layer if not)."""
    if any(d.pieces is None for m in manifests.values() for d in m.disks):
        await _check_whole(domain_dir, ops, manifests, runtime_dir)
        return
    recorded: dict[Key, list[Piece]] = {}

    def pieces_of(backup_id: str, disk: DiskRecord) -> list[Piece]:
        key = (backup_id, disk.disk)
        if key not in recorded:
            try:
                recorded[key] = read_pieces(domain_dir / backup_id, disk)
            except RepositoryFormatError as exc:
                raise damaged(backup_id, disk.disk) from exc
        return recorded[key]

    reads = merge_reads(ops, manifests, pieces_of)
    # Check, in its own layer's view, every recorded piece those reads see.
    wanted: dict[Key, dict[int, Piece]] = defaultdict(dict)
    for (subject, disk), spans in reads.items():
        if spans:
            for layer_id, p in sources(_chain(subject, disk, manifests, pieces_of), spans):
                wanted[(layer_id, disk)][p.offset] = p
    # A pruned layer's bytes move into a kept one (safe rebase, or the heir's
    # standalone copy) under hashes carried over, not read: check all of
    # its pieces now, in its own view, or damage in it would be blamed on
    # the kept backup once it is gone.
    removed = {op.id for op in ops if isinstance(op, Remove)}
    for op in ops:
        if isinstance(op, Rebase):
            absorbed = op.absorbed
        elif isinstance(op, Consolidate):
            absorbed = op.into
        else:
            continue
        if absorbed in removed:
            for d in manifests[absorbed].disks:
                for p in pieces_of(absorbed, d):
                    wanted[(absorbed, d.disk)][p.offset] = p
    for (layer_id, disk), found in sorted(wanted.items()):
        record = manifests[layer_id].disk(disk)
        assert record is not None
        await _check_pieces(domain_dir / layer_id, record, list(found.values()), runtime_dir)


def merge_reads(
    ops: Sequence[Op],
    manifests: Mapping[str, Manifest],
    pieces_of: Callable[[str, DiskRecord], list[Piece]],
) -> dict[Key, list[tuple[int, int]]]:
    """What the merges of `ops` will read back, per (layer, disk): the plan
    played through on recorded pieces alone (no image is read)."""
    parent = {i: m.parent for i, m in manifests.items()}
    ranges = {i: {d.disk: d.ranges for d in m.disks} for i, m in manifests.items()}
    current: dict[Key, list[Piece]] = {}
    reads: dict[Key, list[tuple[int, int]]] = defaultdict(list)
    for op in ops:
        if not isinstance(op, Rebase | Consolidate):
            continue
        subject = op.child if isinstance(op, Rebase) else op.heir
        below = parent[subject]
        for d in manifests[subject].disks:
            own = current.get((subject, d.disk))
            if own is None:
                own = pieces_of(subject, d)
            pd = manifests[below].disk(d.disk) if below is not None else None
            par = None
            if below is not None and pd is not None:
                par = current.get((below, d.disk))
                if par is None:
                    par = pieces_of(below, pd)
            new = op.ranges.get(d.disk, ranges[subject][d.disk])
            planned = plan_pieces(own, ranges[subject][d.disk], par, new, d.grid)
            reads[(subject, d.disk)] += [(p.offset, p.end) for p in planned if p.content is None]
            # What is read gets a real hash at run time; here only places count.
            current[(subject, d.disk)] = [
                Piece(p.offset, p.length, p.kind, p.content or b"") for p in planned
            ]
            ranges[subject][d.disk] = tuple(new)
        parent[subject] = op.parent if isinstance(op, Rebase) else None

    return {key: spans for key, spans in reads.items() if spans}


def _chain(
    subject: str,
    disk: str,
    manifests: Mapping[str, Manifest],
    pieces_of: Callable[[str, DiskRecord], list[Piece]],
) -> list[ChainLayer]:
    """The layers `subject`'s view of `disk` is made of, newest first, as
    the repository holds them before the prune."""
    out: list[ChainLayer] = []
    cur: str | None = subject
    while cur is not None:
        record = manifests[cur].disk(disk)
        if record is None:
            break  # the disk is new above here: its image stands alone
        out.append(ChainLayer(cur, record.ranges, pieces_of(cur, record)))
        cur = manifests[cur].parent
    return out


async def _check_pieces(
    folder: Path, disk: DiskRecord, pieces: Sequence[Piece], runtime_dir: Path
) -> None:
    data = [p for p in pieces if p.kind is Kind.DATA]
    async with open_view(folder / disk.path, runtime_dir) as view:
        got = await hashes_at(view, [(p.offset, p.length) for p in data])
        if any(got[p.offset] != p.content for p in data):
            raise damaged(folder.name, disk.disk)
        for p in pieces:
            if p.kind is Kind.ZERO and await non_zero(view, p.offset, p.length):
                raise damaged(folder.name, disk.disk)


async def _check_whole(
    domain_dir: Path, ops: Sequence[Op], manifests: Mapping[str, Manifest], runtime_dir: Path
) -> None:
    """Format 1 backups record no pieces: every layer a merge reads from or
    writes into is read whole and compared with its digest."""
    touched: set[str] = set()
    for op in ops:
        if isinstance(op, Rebase):
            touched |= {op.child, op.absorbed}
        elif isinstance(op, Consolidate):
            touched |= {op.heir, op.into}
    for backup_id in sorted(touched):
        folder = domain_dir / backup_id
        for d in manifests[backup_id].disks:
            try:
                if d.pieces is not None:
                    read_pieces(folder, d)
                got = await digest_image(folder / d.path, list(d.ranges), d.grid, runtime_dir)
                good = got.digest == d.digest and not got.not_zero
            except RepositoryFormatError:
                good = False
            if not good:
                raise damaged(backup_id, d.disk)


async def merged_disks(
    domain_dir: Path,
    folder: Path,
    m: Manifest,
    ranges: Mapping[str, Sequence[Range]],
    runtime_dir: Path,
) -> tuple[tuple[DiskRecord, ...], dict[str, bytes]]:
    """The disks' entries of the layer in `folder` once it answers for
    `ranges`: digest and piece file, planned from the recorded pieces, the
    rest read from the layer's (unchanged) view. Called before the merge
    changes any file, and again by a replay at any point of it."""
    parent = _manifest_or_none(domain_dir / m.parent) if m.parent else None
    out, blobs = [], {}
    for d in m.disks:
        new = list(ranges.get(d.disk, d.ranges))
        blob = await _planned_blob(domain_dir, folder, d, m.parent, parent, new, runtime_dir)
        if blob is None:
            got = await digest_image(folder / d.path, new, d.grid, runtime_dir)
            blob, digest = got.pieces, got.digest
        else:
            digest = hashlib.sha256(blob).hexdigest()
        name = next_pieces_name(d)
        out.append(replace(d, ranges=tuple(new), digest=digest, pieces=name))
        blobs[d.disk] = blob
    return tuple(out), blobs


# PLR0913: private: one disk's inputs, from its caller's loop
async def _planned_blob(  # noqa: PLR0913 (see above)
    domain_dir: Path,
    folder: Path,
    d: DiskRecord,
    parent_id: str | None,
    parent: Manifest | None,
    new: Sequence[Range],
    runtime_dir: Path,
) -> bytes | None:
    """The new piece file, or None where no recorded pieces can be used."""
    if d.pieces is None:
        return None
    try:
        own = read_pieces(folder, d)
    except RepositoryFormatError:
        return None
    below = None
    pd = parent.disk(d.disk) if parent is not None else None
    if parent_id is not None and pd is not None and pd.pieces is not None:
        try:
            below = read_pieces(domain_dir / parent_id, pd)
        except RepositoryFormatError:
            below = None  # those cells are read from the view instead
    planned = plan_pieces(own, d.ranges, below, new, d.grid)
    todo = [(p.offset, p.length) for p in planned if p.content is None]
    got: dict[int, bytes] = {}
    if todo:
        async with open_view(folder / d.path, runtime_dir) as view:
            got = await hashes_at(view, todo)
    return b"".join(
        extents.piece_record(
            p.offset, p.length, p.kind, p.content if p.content is not None else got[p.offset]
        )
        for p in planned
    )


def _manifest_or_none(folder: Path) -> Manifest | None:
    try:
        return read_manifest(folder)
    except (RepositoryFormatError, OSError):
        return None


__all__ = ["check_inputs", "damaged", "merge_reads", "merged_disks"]
