"""Each domain's place in the daemon's backup queue: one slot with an
explicit state, moved only through the transitions below (pure: the
service carries out what each returns: put the domain on the run queue,
or start a retry timer).

    idle --ask--> queued --take--> running --finish--> idle
                    ^                 |   (asked meanwhile: queued again)
                    |                 +--finish busy--> waiting
                    +---- retry_due / ask --------------+

A request for a domain that is running waits beside it (`again`) and
runs when it ends; a request while it waits to retry runs at once and
takes the retried level with it (the timer then finds nothing to do).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum

from virtbackupd.core.job_state import IllegalTransitionError
from virtbackupd.core.policy import Level
from virtbackupd.daemon.decisions import Outcome, merge


class SlotState(StrEnum):
    IDLE = "idle"
    QUEUED = "queued"  # on the run queue (exactly once)
    RUNNING = "running"
    WAITING = "waiting to retry"  # its domain was busy; a timer queues it again


class After(Enum):
    """What the service does after a transition."""

    NOTHING = "nothing"
    ENQUEUE = "enqueue"  # put the domain on the run queue
    RETRY_LATER = "retry later"  # start the retry timer


#: Which state may follow which: anything else is a bug.
ALLOWED: dict[SlotState, frozenset[SlotState]] = {
    SlotState.IDLE: frozenset({SlotState.QUEUED}),
    SlotState.QUEUED: frozenset({SlotState.RUNNING}),
    SlotState.RUNNING: frozenset({SlotState.IDLE, SlotState.QUEUED, SlotState.WAITING}),
    SlotState.WAITING: frozenset({SlotState.QUEUED}),
}


@dataclass
class Slot:
    """One domain's scheduling state. Only the transition methods change
    `state` (through `_to`)."""

    _state: SlotState = SlotState.IDLE
    # QUEUED: the level asked; RUNNING: the one running; WAITING: the one retried.
    level: Level | None = None
    again: Level | None = None  # RUNNING: asked meanwhile, queued when it ends
    retry_reason: str | None = None  # WAITING: why its domain was busy
    last_failure: tuple[str, str] | None = None  # (ISO time, reason) until a backup succeeds
    fired: tuple[datetime, Level] | None = None  # the last scheduled request: minute, level

    @property
    def state(self) -> SlotState:
        return self._state

    def _to(self, state: SlotState) -> None:
        if state not in ALLOWED[self._state]:
            raise IllegalTransitionError(
                f"a domain slot cannot go from {self._state.value} to {state.value}"
            )
        self._state = state

    @property
    def queued(self) -> Level | None:
        """The request that waits to run (what `status` shows as queued)."""
        if self._state is SlotState.QUEUED:
            return self.level
        return self.again if self._state is SlotState.RUNNING else None

    def ask(self, level: Level) -> After:
        """A backup is asked for (schedule, event, catch-up, retry)."""
        if self._state is SlotState.QUEUED:
            self.level = merge(self.level, level)
            return After.NOTHING
        if self._state is SlotState.RUNNING:
            self.again = merge(self.again, level)
            return After.NOTHING
        waited = self.level if self._state is SlotState.WAITING else None
        self._to(SlotState.QUEUED)
        self.level = merge(waited, level)
        self.retry_reason = None
        return After.ENQUEUE

    def take(self) -> Level | None:
        """A worker takes the domain off the run queue: the level to run,
        or None when nothing is queued (then it is left alone)."""
        if self._state is not SlotState.QUEUED:
            return None
        self._to(SlotState.RUNNING)
        return self.level

    def finish(self, outcome: Outcome, when: str) -> After:
        """The run ended; `when` is the ISO time a failure is shown with."""
        if self._state is not SlotState.RUNNING:
            raise IllegalTransitionError(f"a {self._state.value} domain slot has no run to finish")
        ran, again = self.level, self.again
        self.again = None
        if outcome.retry:
            if again is not None:  # asked meanwhile: run both at once, merged
                self._to(SlotState.QUEUED)
                self.level = merge(ran, again)
                return After.ENQUEUE
            self._to(SlotState.WAITING)
            self.retry_reason = outcome.reason
            return After.RETRY_LATER
        if not outcome.ok:
            self.last_failure = (when, outcome.reason)
        if again is not None:
            self._to(SlotState.QUEUED)
            self.level = again
            return After.ENQUEUE
        self._to(SlotState.IDLE)
        self.level = None
        return After.NOTHING

    def retry_due(self) -> After:
        """The retry timer fired: queue the retried level again, unless a
        request already took it along."""
        if self._state is not SlotState.WAITING:
            return After.NOTHING
        assert self.level is not None
        return self.ask(self.level)

    def succeeded(self) -> None:
        """A backup of the domain completed: its last failure is history."""
        self.last_failure = None
