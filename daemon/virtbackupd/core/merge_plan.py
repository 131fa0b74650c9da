"""Planning the merges that prune backups and keep chains short. Pure:
the repository's layers in, an ordered list of operations out.

Every backup is one *layer* per disk: a standalone image, or an overlay on
its parent's. Taking a layer out of a chain must leave what every other
layer *shows* (its view, with its backing chain) unchanged, byte for byte:

- ``Rebase(child, parent)``: the child's backing file becomes `parent`
  (`qemu-img rebase`, safe mode: the child first receives every byte where
  the old and the new backing chain differ). Used when a pruned layer has
  a parent, and to shorten a chain that outgrew the policy's limit (the
  child skips a layer that stays, as a side branch).
- ``Consolidate(heir, into)``: a pruned standalone layer with a child:
  the child becomes standalone, its image replaced by one of its whole
  view (it takes over the pruned layer's bytes). Other children of the
  pruned layer are first rebased onto the heir.

The engine carries out both on a new image beside the old one and
switches them by a rename (engine.upkeep.prune), so the bound on the space they
need (:func:`space_needed`) counts each merged image twice.
- ``Remove(id)``: the folder of a layer nothing depends on any more.

A layer that receives bytes from another must answer for them: its
recorded ranges grow by the other's (see core.extents.widen; where the
other is its own backing layer, the other's kinds hold for its view and are
kept, so zero stays zero), and its digest is recomputed over them from its
(unchanged) view, reusing recorded piece hashes (core.piece_merge).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

from virtbackupd.core.extents import Range, widen

Ranges = Mapping[str, tuple[Range, ...]]  # disk -> ranges


@dataclass(frozen=True)
class Layer:
    id: str
    parent: str | None
    ranges: Ranges


@dataclass(frozen=True)
class Rebase:
    child: str
    parent: str
    absorbed: str  # the layer whose ranges the child now answers for
    ranges: Ranges  # the child's ranges afterwards


@dataclass(frozen=True)
class Consolidate:
    heir: str
    into: str  # the pruned standalone layer whose bytes the heir takes over
    ranges: Ranges


@dataclass(frozen=True)
class Remove:
    id: str


Op = Rebase | Consolidate | Remove


# C901: the merge rules side by side read better than split (docs/repository-format.md)
def plan_merges(  # noqa: C901 (see above)
    layers: Sequence[Layer],
    prune: Set[str],
    max_depth: int | None = None,
    frozen: Set[str] = frozenset(),
) -> list[Op]:
    """`layers` oldest first; `prune` the ids to take out (never the newest).
    With `max_depth`, the newest layer ends at most that many overlays above
    its standalone base. `frozen`: layers whose files must not change (a
    held backup and its chain, read by a running domain or a mount); they
    are neither pruned nor rewritten, so the chain limit waits for them."""
    held = sorted(prune & frozen)
    if held:
        raise ValueError(f"held backups cannot be pruned: {', '.join(held)}")
    if layers and layers[-1].id in prune:
        raise ValueError(f"the newest backup {layers[-1].id} cannot be pruned")
    order = [layer.id for layer in layers]
    parent = {layer.id: layer.parent for layer in layers}
    ranges = {layer.id: dict(layer.ranges) for layer in layers}
    unknown = sorted(p for p in parent.values() if p is not None and p not in parent)
    if unknown:
        raise ValueError(f"backups build on {', '.join(unknown)}, which is not in the repository")
    ops: list[Op] = []

    def absorb(child: str, other: str) -> Ranges:
        new = {
            disk: tuple(widen(own, ranges[other].get(disk, ()), keep_kinds=parent[child] == other))
            for disk, own in ranges[child].items()
        }
        ranges[child] = new
        return new

    def rebase(child: str, new_parent: str, absorbed: str) -> None:
        ops.append(Rebase(child, new_parent, absorbed, absorb(child, absorbed)))
        parent[child] = new_parent

    for pid in [i for i in order if i in prune]:
        children = [c for c in order if parent.get(c) == pid]
        grand = parent[pid]
        if grand is not None:
            for c in children:
                rebase(c, grand, pid)
        elif children:
            heir, *others = children
            for c in others:
                rebase(c, heir, heir)
            ops.append(Consolidate(heir, pid, absorb(heir, pid)))
            parent[heir] = None
        ops.append(Remove(pid))
        del parent[pid]
        order.remove(pid)

    if max_depth is not None and order:
        while len(chain := _chain(order[-1], parent)) - 1 > max_depth:
            if chain[2] in frozen:
                break
            rebase(chain[2], chain[0], chain[1])
    return ops


def space_needed(
    ops: Sequence[Op], usage: Mapping[str, int], whole: Mapping[str, int]
) -> tuple[int, Op | None]:
    """The most the backup file system must hold beyond what it holds now
    while `ops` run in order, and the operation at which that peak falls.
    `usage`: each layer's bytes on disk now; `whole`: for each heir of a
    Consolidate, the size of a standalone copy of its view.

    Every merge writes a new image beside the one it replaces (the engine
    switches them by a rename): a Rebase copies the child and adds at most
    what the absorbed layer holds (safe mode copies only where the chains
    differ), then frees the old child; a Consolidate writes the heir's
    whole view, then frees the overlay; a Remove frees its layer. Bounds,
    never estimates: a prune let through never runs short (other writers
    aside); one refused might have fitted."""
    size = dict(usage)
    used = peak = 0
    at: Op | None = None
    for op in ops:
        if isinstance(op, Rebase):
            grown = size.get(op.child, 0) + size.get(op.absorbed, 0)
            writes, frees, subject = grown, size.get(op.child, 0), op.child
        elif isinstance(op, Consolidate):
            grown = whole.get(op.heir, 0)
            writes, frees, subject = grown, size.get(op.heir, 0), op.heir
        else:
            writes, frees, subject, grown = 0, size.get(op.id, 0), op.id, 0
        if used + writes > peak:
            peak, at = used + writes, op
        used += writes - frees
        size[subject] = grown
    return peak, at


def _chain(leaf: str, parent: Mapping[str, str | None]) -> list[str]:
    """[root, ..., leaf]."""
    out = [leaf]
    while (p := parent[out[-1]]) is not None:
        out.append(p)
        if len(out) > len(parent):
            raise ValueError(f"the backups above {leaf} form a loop")
    return out[::-1]


def depth(leaf: str, parent: Mapping[str, str | None]) -> int:
    return len(_chain(leaf, parent)) - 1
