"""The space a prune's merges need, bounded before anything changes
(core.merge_plan.space_needed): every merge writes a new image beside the
one it replaces, so the peak is the largest running total of writes less
what earlier steps freed."""

from __future__ import annotations

import pytest

from virtbackupd.core.merge_plan import Consolidate, Op, Rebase, Remove, space_needed

USAGE = {"a": 100, "b": 10, "c": 5, "d": 7}


@pytest.mark.parametrize(
    ("ops", "whole", "peak", "at"),
    [
        ([], {}, 0, None),
        ([Remove("a")], {}, 0, None),
        # the heir's whole view is written, then its overlay and the base go
        ([Consolidate("b", "a", {}), Remove("a")], {"b": 105}, 105, 0),
        # a rebase copies the child and adds at most the absorbed layer
        ([Rebase("c", "a", "b", {}), Remove("b")], {}, 15, 0),
        # frees of earlier steps count: the second merge starts from less
        (
            [Consolidate("b", "a", {}), Remove("a"), Consolidate("c", "b", {}), Remove("b")],
            {"b": 105, "c": 120},
            105 - 10 - 100 + 120,
            2,
        ),
        # a child grown by one rebase is copied at its grown size by the next
        (
            [Rebase("d", "a", "c", {}), Rebase("d", "a", "b", {})],
            {},
            (7 + 5) + (7 + 5 + 10) - 7,
            1,
        ),
    ],
)
def test_space_needed_is_the_peak_of_writes_less_frees(
    ops: list[Op], whole: dict[str, int], peak: int, at: int | None
) -> None:
    got, where = space_needed(ops, USAGE, whole)
    assert got == peak
    assert where == (ops[at] if at is not None else None)
