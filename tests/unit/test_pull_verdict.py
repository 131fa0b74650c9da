"""When a live restore's pull that ended unfinished is started again
(core.live_move.pull_verdict): at once the first time, after a growing
pause, and never after PULL_ATTEMPTS failures in one QEMU run."""

from __future__ import annotations

import pytest

from virtbackupd.core.live_move import PULL_ATTEMPTS, PULL_BACKOFF_S, PullVerdict, pull_verdict


@pytest.mark.parametrize(
    ("failures", "since", "verdict"),
    [
        (0, None, PullVerdict.PULL),
        (0, 1.0, PullVerdict.PULL),
        (1, 1.0, PullVerdict.WAIT),
        (1, PULL_BACKOFF_S, PullVerdict.PULL),
        (2, PULL_BACKOFF_S, PullVerdict.WAIT),
        (2, 2 * PULL_BACKOFF_S, PullVerdict.PULL),
        (PULL_ATTEMPTS, 10_000.0, PullVerdict.STOP),
        (PULL_ATTEMPTS + 5, None, PullVerdict.STOP),
    ],
)
def test_pull_verdict(failures: int, since: float | None, verdict: PullVerdict) -> None:
    assert pull_verdict(failures, since) is verdict
