"""Why a running backup job is stopped from outside, decided from what
its monitor read (engine.backup.driver). Pure: the reads are the
driver's; this says what they mean."""

from __future__ import annotations

from enum import StrEnum


class StopReason(StrEnum):
    """Why a job was cancelled from outside; the value is the reason shown."""

    OPERATOR = "cancelled by the operator"
    DOMAIN_STARTED = "cancelled: the domain was started (a VM start wins over an offline backup)"


def stop_reason(
    current: StopReason | None,
    *,
    cancel_requested: bool,
    online: bool,
    domain_starting: bool,
) -> StopReason | None:
    """The reason to stop the job now, or None: it goes on (or was
    stopped already: the outcome line says why once, so a second request
    changes nothing). The operator's request wins over a VM start; a VM
    start stops only an offline job (an online one shares the images
    with the running QEMU)."""
    if current is not None:
        return None
    if cancel_requested:
        return StopReason.OPERATOR
    if not online and domain_starting:
        return StopReason.DOMAIN_STARTED
    return None
