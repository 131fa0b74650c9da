"""Retention decisions and merge plans, as tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from virtbackupd.core.extents import Kind, Range
from virtbackupd.core.merge_plan import Consolidate, Layer, Rebase, Remove, depth, plan_merges
from virtbackupd.core.policy import Retention
from virtbackupd.core.retention import Point, decide

T0 = datetime(2026, 11, 2, 0, 30, tzinfo=UTC)  # a Monday


def pts(*times: str) -> list[Point]:
    return [Point(t, datetime.fromisoformat(t).replace(tzinfo=UTC)) for t in times]


def kept(points: list[Point], r: Retention) -> dict[str, tuple[str, ...]]:
    return {v.id: v.reasons for v in decide(points, r) if v.keep}


HOURLY = pts("2026-11-02T10:05", "2026-11-02T10:40", "2026-11-02T11:10", "2026-11-02T13:00")


@pytest.mark.parametrize(
    ("points", "retention", "expected"),
    [
        # No rule: everything stays.
        (HOURLY, Retention(), {p.id: ("no retention rule",) for p in HOURLY}),
        # keep_last
        (
            HOURLY,
            Retention(keep_last=2),
            {"2026-11-02T11:10": ("last",), "2026-11-02T13:00": ("last",)},
        ),
        # keep_hourly 2: newest of 13h and of 11h; 10h is a third hour.
        (
            HOURLY,
            Retention(keep_hourly=2),
            {
                "2026-11-02T13:00": ("hourly 2026-11-02T13",),
                "2026-11-02T11:10": ("hourly 2026-11-02T11",),
            },
        ),
        # keep_hourly 3 keeps the newest of 10h (10:40), not 10:05.
        (
            HOURLY,
            Retention(keep_hourly=3),
            {
                "2026-11-02T13:00": ("hourly 2026-11-02T13",),
                "2026-11-02T11:10": ("hourly 2026-11-02T11",),
                "2026-11-02T10:40": ("hourly 2026-11-02T10",),
            },
        ),
        # Rules add up; the reasons say which rule kept what.
        (
            pts("2026-10-30T23:00", "2026-10-31T22:00", "2026-11-01T01:00", "2026-11-02T09:00"),
            Retention(keep_last=1, keep_daily=2, keep_monthly=2),
            {
                "2026-11-02T09:00": ("last", "daily 2026-11-02", "monthly 2026-11"),
                "2026-11-01T01:00": ("daily 2026-11-01",),
                "2026-10-31T22:00": ("monthly 2026-10",),
            },
        ),
        # Weekly uses ISO weeks: Sunday 1 Nov is week 44, Monday 2 Nov week 45.
        (
            pts("2026-10-28T12:00", "2026-11-01T12:00", "2026-11-02T12:00"),
            Retention(keep_weekly=2),
            {
                "2026-11-02T12:00": ("weekly 2026-W45",),
                "2026-11-01T12:00": ("weekly 2026-W44",),
            },
        ),
        # Yearly: the newest of each year.
        (
            pts("2024-06-01T00:00", "2025-01-01T00:00", "2025-12-31T23:59", "2026-03-01T00:00"),
            Retention(keep_yearly=5),
            {
                "2026-03-01T00:00": ("yearly 2026",),
                "2025-12-31T23:59": ("yearly 2025",),
                "2024-06-01T00:00": ("yearly 2024",),
            },
        ),
        # Every rule starts from the newest, so the newest is always kept.
        (
            pts("2026-11-01T00:00", "2026-11-02T00:00"),
            Retention(keep_monthly=1),
            {"2026-11-02T00:00": ("monthly 2026-11",)},
        ),
        ([], Retention(keep_last=3), {}),
    ],
)
def test_retention_table(
    points: list[Point], retention: Retention, expected: dict[str, tuple[str, ...]]
) -> None:
    assert kept(points, retention) == expected


def test_verdicts_keep_the_input_order_and_name_pruned_ones() -> None:
    verdicts = decide(HOURLY, Retention(keep_last=1))
    assert [v.id for v in verdicts] == [p.id for p in HOURLY]
    assert [v.keep for v in verdicts] == [False, False, False, True]
    assert verdicts[0].reasons == ()


def test_time_zones_are_counted_in_utc() -> None:
    tz = timedelta(hours=5)
    from datetime import timezone

    local = timezone(tz)
    a = Point("a", datetime(2026, 11, 2, 3, 0, tzinfo=local))  # 2026-11-01 22:00 UTC
    b = Point("b", datetime(2026, 11, 2, 23, 0, tzinfo=UTC))
    assert kept([a, b], Retention(keep_daily=2)) == {
        "b": ("daily 2026-11-02",),
        "a": ("daily 2026-11-01",),
    }


# --- merge plans -------------------------------------------------------------------------


def R(lo: int, hi: int, kind: Kind = Kind.DATA) -> Range:  # noqa: N802
    return Range(lo, hi - lo, kind)


def chain(n: int) -> list[Layer]:
    """b0 (full) <- b1 <- ... ; layer i wrote [10i, 10i+5) of vda."""
    return [
        Layer(f"b{i}", f"b{i - 1}" if i else None, {"vda": (R(10 * i, 10 * i + 5),)})
        for i in range(n)
    ]


def test_pruning_a_middle_layer_rebases_its_child_which_absorbs_its_ranges() -> None:
    ops = plan_merges(chain(4), {"b1"})
    assert ops == [
        Rebase("b2", "b0", "b1", {"vda": (R(10, 15), R(20, 25))}),
        Remove("b1"),
    ]


def test_pruning_the_full_consolidates_its_child_into_it() -> None:
    ops = plan_merges(chain(3), {"b0", "b1"})
    assert ops == [
        Consolidate("b1", "b0", {"vda": (R(0, 5), R(10, 15))}),
        Remove("b0"),
        Consolidate("b2", "b1", {"vda": (R(0, 5), R(10, 15), R(20, 25))}),
        Remove("b1"),
    ]


def test_ranges_absorbed_from_the_backing_layer_keep_their_kind() -> None:
    """The backing layer's ranges describe the child's view where the child
    holds nothing: its zeroes stay zeroes (nothing to read or hash)."""
    layers = [
        Layer("f", None, {"vda": (R(0, 100),)}),
        Layer("i1", "f", {"vda": (R(0, 10, Kind.ZERO), R(10, 12))}),
        Layer("i2", "i1", {"vda": (R(5, 20, Kind.ZERO),)}),
    ]
    ops = plan_merges(layers, {"i1"})
    assert ops[0] == Rebase("i2", "f", "i1", {"vda": (R(0, 20, Kind.ZERO),)})


def test_ranges_absorbed_from_a_sibling_become_data() -> None:
    """A child rebased onto its sibling (the heir of a pruned full) shows
    the old parent's bytes there, not the sibling's: what it now answers
    for is hashed from its own view, as DATA."""
    layers = [
        Layer("f", None, {"vda": (R(0, 100),)}),
        Layer("a", "f", {"vda": (R(0, 10, Kind.ZERO),)}),
        Layer("b", "f", {"vda": (R(50, 60),)}),
    ]
    ops = plan_merges(layers, {"f"})
    assert ops[0] == Rebase("b", "a", "a", {"vda": (R(0, 10), R(50, 60))})


def test_a_full_with_two_children_keeps_both_views() -> None:
    layers = [*chain(3), Layer("b3", "b0", {"vda": (R(50, 55),)})]  # a side branch on b0
    ops = plan_merges(layers, {"b0"})
    assert ops == [
        Rebase("b3", "b1", "b1", {"vda": (R(10, 15), R(50, 55))}),
        Consolidate("b1", "b0", {"vda": (R(0, 5), R(10, 15))}),
        Remove("b0"),
    ]


def test_max_depth_shortens_the_newest_chain_by_skipping_layers() -> None:
    ops = plan_merges(chain(5), set(), max_depth=2)
    assert ops == [
        Rebase("b2", "b0", "b1", {"vda": (R(10, 15), R(20, 25))}),
        Rebase("b3", "b0", "b2", {"vda": (R(10, 15), R(20, 25), R(30, 35))}),
    ]
    parent = {"b0": None, "b1": "b0", "b2": "b0", "b3": "b0", "b4": "b3"}
    assert depth("b4", parent) == 2


def test_nothing_to_do_and_refusals() -> None:
    assert plan_merges(chain(3), set(), max_depth=5) == []
    with pytest.raises(ValueError, match="newest"):
        plan_merges(chain(3), {"b2"})
    with pytest.raises(ValueError, match="not in the repository"):
        plan_merges([Layer("x", "gone", {})], set())


def test_held_layers_are_neither_pruned_nor_rewritten() -> None:
    """A held backup's chain is frozen: pruning it is refused, and the
    chain limit does not rebase a frozen layer (it waits for the hold)."""
    with pytest.raises(ValueError, match="held backups cannot be pruned: b1"):
        plan_merges(chain(4), {"b1"}, frozen={"b0", "b1"})
    assert plan_merges(chain(4), set(), max_depth=1, frozen={"b0", "b1", "b2"}) == []
    ops = plan_merges(chain(4), set(), max_depth=2, frozen={"b0", "b1"})
    assert [(type(o).__name__, getattr(o, "child", None)) for o in ops] == [("Rebase", "b2")]
