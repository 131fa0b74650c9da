"""core.stop_reason: when a running backup is stopped from outside, and why."""

from __future__ import annotations

import pytest

from virtbackupd.core.stop_reason import StopReason, stop_reason

OP, START = StopReason.OPERATOR, StopReason.DOMAIN_STARTED


@pytest.mark.parametrize(
    ("current", "cancel", "online", "starting", "expected"),
    [
        # nothing asked: the job goes on
        (None, False, False, False, None),
        (None, False, True, False, None),
        # the operator's `virtbackup cancel` stops any job
        (None, True, False, False, OP),
        (None, True, True, False, OP),
        # a VM start stops an offline job only
        (None, False, False, True, START),
        (None, False, True, True, None),
        # both at once: the operator's request is the reason shown
        (None, True, False, True, OP),
        # already stopping: decided once, a later request changes nothing
        (OP, True, False, True, None),
        (START, True, False, False, None),
        (START, False, False, True, None),
    ],
)
def test_stop_reason(
    current: StopReason | None,
    cancel: bool,
    online: bool,
    starting: bool,
    expected: StopReason | None,
) -> None:
    got = stop_reason(current, cancel_requested=cancel, online=online, domain_starting=starting)
    assert got is expected


def test_the_reasons_read_as_the_outcome_line_shows_them() -> None:
    assert OP.value == "cancelled by the operator"
    assert START.value.startswith("cancelled: the domain was started")
