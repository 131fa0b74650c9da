"""core.job_state: the backup job's moves, and the clean-up each state's
failure gets."""

from __future__ import annotations

import pytest

from virtbackupd.core.job_state import (
    CLEANUP,
    TRANSITIONS,
    Cleanup,
    IllegalTransitionError,
    JobMachine,
    JobState,
)

S = JobState


def machine_in(state: JobState) -> JobMachine:
    """A machine already in `state`, for a test only: the job reaches a
    state by its moves, and the state is read-only outside the machine."""
    m = JobMachine()
    m._state = state
    return m


@pytest.mark.parametrize(
    "path",
    [
        [S.EXPORTING, S.COPYING, S.COMMITTING, S.COMMITTED, S.COMPLETE],
        [S.EXPORTING, S.EXPORTING, S.COPYING, S.COMMITTING, S.COMMITTED, S.COMPLETE],
    ],
)
def test_the_ways_to_complete(path: list[JobState]) -> None:
    m = JobMachine()
    for to in path:
        m.advance(to)
    assert m.history == [S.PLANNED, *path]


@pytest.mark.parametrize(
    ("start", "to"),
    [
        (S.PLANNED, S.COPYING),
        (S.PLANNED, S.COMPLETE),
        (S.EXPORTING, S.COMMITTING),
        (S.COPYING, S.EXPORTING),
        (S.COMMITTING, S.COMPLETE),  # never complete without the commit point
        (S.COMPLETE, S.FAILED),
        (S.FAILED, S.EXPORTING),
    ],
)
def test_illegal_moves_are_refused(start: JobState, to: JobState) -> None:
    m = machine_in(start)
    with pytest.raises(IllegalTransitionError, match=f"from {start.value} to {to.value}"):
        m.advance(to)


@pytest.mark.parametrize(
    ("state", "cleanup"),
    [
        (S.PLANNED, Cleanup.NOTHING),
        (S.EXPORTING, Cleanup.UNDO),
        (S.COPYING, Cleanup.UNDO),
        (S.COMMITTING, Cleanup.UNDO),
        (S.COMMITTED, Cleanup.KEEP),
    ],
)
def test_the_state_decides_the_cleanup(state: JobState, cleanup: Cleanup) -> None:
    m = machine_in(state)
    assert m.fail() is cleanup
    assert m.state is S.FAILED


def test_every_state_that_can_fail_has_a_cleanup() -> None:
    can_fail = {s for s, nxt in TRANSITIONS.items() if S.FAILED in nxt}
    assert can_fail == set(CLEANUP)
    m = machine_in(S.COMPLETE)
    with pytest.raises(IllegalTransitionError):
        m.fail()
