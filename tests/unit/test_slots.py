"""Each domain's place in the daemon's queue as one slot with an explicit
state (idle, queued, running, waiting to retry): every transition, what
the service is told to do after it, and the moves that are bugs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from virtbackupd.core.job_state import IllegalTransitionError
from virtbackupd.core.policy import Level
from virtbackupd.daemon.decisions import Outcome
from virtbackupd.daemon.slots import ALLOWED, After, Slot, SlotState

FULL, INC = Level.FULL, Level.INCREMENTAL
IDLE, QUEUED, RUNNING, WAITING = (
    SlotState.IDLE,
    SlotState.QUEUED,
    SlotState.RUNNING,
    SlotState.WAITING,
)
OK = Outcome(ok=True)
BUSY = Outcome(ok=False, retry=True, reason="busy")
FAILED = Outcome(ok=False, reason="broken")

Step = Callable[[Slot], object]


def ask(level: Level) -> Step:
    return lambda s: s.ask(level)


def take(s: Slot) -> object:
    return s.take()


def finish(outcome: Outcome) -> Step:
    return lambda s: s.finish(outcome, "2026-12-07T19:00:00+00:00")


def retry_due(s: Slot) -> object:
    return s.retry_due()


#: How to bring a fresh slot into each state (with an incremental).
REACH: dict[SlotState, list[Step]] = {
    IDLE: [],
    QUEUED: [ask(INC)],
    RUNNING: [ask(INC), take],
    WAITING: [ask(INC), take, finish(BUSY)],
}


@pytest.mark.parametrize(
    ("start", "step", "returned", "state", "queued", "level"),
    [
        # a request: queued once; merged (full wins) while queued or running
        (IDLE, ask(INC), After.ENQUEUE, QUEUED, INC, INC),
        (IDLE, ask(FULL), After.ENQUEUE, QUEUED, FULL, FULL),
        (QUEUED, ask(INC), After.NOTHING, QUEUED, INC, INC),
        (QUEUED, ask(FULL), After.NOTHING, QUEUED, FULL, FULL),
        (RUNNING, ask(FULL), After.NOTHING, RUNNING, FULL, INC),  # waits beside the run
        # while waiting to retry, a request runs at once and takes the retry along
        (WAITING, ask(FULL), After.ENQUEUE, QUEUED, FULL, FULL),
        (WAITING, ask(INC), After.ENQUEUE, QUEUED, INC, INC),
        # a worker takes what is queued; a stale queue entry is left alone
        (QUEUED, take, INC, RUNNING, None, INC),
        (IDLE, take, None, IDLE, None, None),
        (RUNNING, take, None, RUNNING, None, INC),
        (WAITING, take, None, WAITING, None, INC),
        # a run ends
        (RUNNING, finish(OK), After.NOTHING, IDLE, None, None),
        (RUNNING, finish(FAILED), After.NOTHING, IDLE, None, None),
        (RUNNING, finish(BUSY), After.RETRY_LATER, WAITING, None, INC),
        # the retry timer
        (WAITING, retry_due, After.ENQUEUE, QUEUED, INC, INC),
        (QUEUED, retry_due, After.NOTHING, QUEUED, INC, INC),  # a request took it along
        (IDLE, retry_due, After.NOTHING, IDLE, None, None),
    ],
)
def test_transitions(
    start: SlotState,
    step: Step,
    returned: object,
    state: SlotState,
    queued: Level | None,
    level: Level | None,
) -> None:
    slot = Slot()
    for s in REACH[start]:
        s(slot)
    assert slot.state is start
    assert step(slot) == returned
    assert (slot.state, slot.queued, slot.level) == (state, queued, level)


@pytest.mark.parametrize(
    ("outcome", "returned", "level"),
    [(OK, After.ENQUEUE, FULL), (FAILED, After.ENQUEUE, FULL), (BUSY, After.ENQUEUE, FULL)],
)
def test_a_request_made_while_running_is_queued_when_the_run_ends(
    outcome: Outcome, returned: After, level: Level
) -> None:
    """Asked again while it ran: queued once the run ends, whatever the end
    (busy: the retried level and the new request run at once, merged)."""
    slot = Slot()
    slot.ask(INC)
    slot.take()
    slot.ask(FULL)
    slot.ask(INC)
    assert slot.finish(outcome, "t") is returned
    assert (slot.state, slot.queued, slot.again) == (QUEUED, level, None)


def test_a_failure_is_shown_until_a_backup_succeeds() -> None:
    slot = Slot()
    for step in (ask(INC), take, finish(FAILED)):
        step(slot)
    assert slot.last_failure == ("2026-12-07T19:00:00+00:00", "broken")
    for step in (ask(INC), take, finish(BUSY), retry_due, take):
        step(slot)
    assert slot.last_failure is not None, "a busy retry is not a success"
    slot.succeeded()
    assert slot.last_failure is None


def test_the_retry_reason_is_kept_only_while_waiting() -> None:
    slot = Slot()
    for step in (ask(INC), take, finish(BUSY)):
        step(slot)
    assert (slot.state, slot.retry_reason) == (WAITING, "busy")
    slot.retry_due()
    assert (slot.state, slot.retry_reason) == (QUEUED, None)


@pytest.mark.parametrize("start", [IDLE, QUEUED, WAITING])
def test_only_a_running_slot_can_finish(start: SlotState) -> None:
    """Finishing what does not run is a bug, not a silent change of state."""
    slot = Slot()
    for s in REACH[start]:
        s(slot)
    with pytest.raises(IllegalTransitionError, match=f"a {start.value} domain slot has no run"):
        slot.finish(OK, "t")
    assert slot.state is start


def test_every_state_can_be_left_and_reached() -> None:
    reached = set().union(*ALLOWED.values())
    assert reached == set(SlotState)
    assert all(ALLOWED[s] for s in SlotState)
