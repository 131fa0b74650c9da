"""The states of one backup job, the moves between them, and what a
failure in each state must clean up. Pure: engine.backup.driver drives it,
the only code that moves it (through its one private mutator).

    planned ──> exporting ──> copying ──> committing ──> committed ──> complete
       │            │  ↺          │            │              │
       └────────────┴─────────────┴────────────┴──> failed    └──> (kept: see below)

- exporting ↺ exporting: libvirt refused the parent checkpoint (QEMU was
  killed, its bitmaps are broken): the incremental becomes a full and the
  export starts again.
- committed: the backup folder has its final name, the commit point
  (adapters.repository). A failure after it (the catalogue could not be
  written) takes nothing back: the backup is complete on disk, and the
  catalogue is told at the next start or command (engine.upkeep.catalogue).
"""

from __future__ import annotations

from enum import StrEnum

from virtbackupd.errors import InternalError


class JobState(StrEnum):
    PLANNED = "planned"
    EXPORTING = "exporting"
    COPYING = "copying"
    COMMITTING = "committing"
    COMMITTED = "committed"
    COMPLETE = "complete"
    FAILED = "failed"


class Cleanup(StrEnum):
    """What a failure in a state takes back."""

    NOTHING = "nothing"  # nothing was done yet but the plan
    UNDO = "undo"  # replay the undo log (engine.recovery.undo)
    KEEP = "keep"  # committed: keep it, the catalogue catches up


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PLANNED: frozenset({JobState.EXPORTING, JobState.FAILED}),
    JobState.EXPORTING: frozenset({JobState.EXPORTING, JobState.COPYING, JobState.FAILED}),
    JobState.COPYING: frozenset({JobState.COMMITTING, JobState.FAILED}),
    JobState.COMMITTING: frozenset({JobState.COMMITTED, JobState.FAILED}),
    JobState.COMMITTED: frozenset({JobState.COMPLETE, JobState.FAILED}),
    JobState.COMPLETE: frozenset(),
    JobState.FAILED: frozenset(),
}

CLEANUP: dict[JobState, Cleanup] = {
    JobState.PLANNED: Cleanup.NOTHING,
    JobState.EXPORTING: Cleanup.UNDO,
    JobState.COPYING: Cleanup.UNDO,
    JobState.COMMITTING: Cleanup.UNDO,
    JobState.COMMITTED: Cleanup.KEEP,
}


class IllegalTransitionError(InternalError):
    """A bug: the job tried a move the table does not allow (logged with
    its traceback, never shown as an operator's one-line error)."""


class JobMachine:
    """The state is read-only from outside: `advance` and `fail` are the
    only ways it moves, each checked against the table."""

    def __init__(self) -> None:
        self._state = JobState.PLANNED
        self.history: list[JobState] = [self._state]

    @property
    def state(self) -> JobState:
        return self._state

    def advance(self, to: JobState) -> None:
        if to not in TRANSITIONS[self._state]:
            raise IllegalTransitionError(
                f"backup job cannot go from {self._state.value} to {to.value}"
            )
        self._state = to
        self.history.append(to)

    def fail(self) -> Cleanup:
        """Enter FAILED; returns what the failure must clean up (decided by
        the state it failed in)."""
        cleanup = CLEANUP.get(self._state)
        if cleanup is None:
            raise IllegalTransitionError(f"a {self._state.value} backup job cannot fail")
        self.advance(JobState.FAILED)
        return cleanup
