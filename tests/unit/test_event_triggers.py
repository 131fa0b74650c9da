"""What a libvirt event (its kind and libvirt's detail) means to the
daemon, decided without libvirt: a clean stop asks for the on-shutdown
backup, QEMU dying is a crash, a save or a migration is neither."""

from __future__ import annotations

import pytest

from virtbackupd.adapters.libvirt_events import EventKind
from virtbackupd.daemon.decisions import Trigger, trigger_of


@pytest.mark.parametrize(
    ("kind", "detail", "trigger"),
    [
        (EventKind.CONNECTED, "", Trigger.CONNECTED),
        (EventKind.DISCONNECTED, "", Trigger.DISCONNECTED),
        (EventKind.DEFINED, "defined", Trigger.DEFINED),
        (EventKind.UNDEFINED, "undefined", Trigger.UNDEFINED),
        (EventKind.STOPPED, "shutdown", Trigger.STOPPED),
        (EventKind.STOPPED, "destroyed", Trigger.STOPPED),
        (EventKind.STOPPED, "crashed", Trigger.CRASHED),
        (EventKind.STOPPED, "failed", Trigger.CRASHED),
        (EventKind.STOPPED, "saved", Trigger.OTHER),
        (EventKind.STOPPED, "migrated", Trigger.OTHER),
        (EventKind.STOPPED, "from-snapshot", Trigger.OTHER),
        (EventKind.STOPPED, "9", Trigger.OTHER),  # a detail this libvirt-python has no name for
        (EventKind.CRASHED, "crashed", Trigger.CRASHED),
        (EventKind.STARTED, "started", Trigger.OTHER),
        (EventKind.JOB_COMPLETED, "Operation canceled", Trigger.OTHER),
        (EventKind.OTHER, "event 4 detail 0", Trigger.OTHER),
    ],
)
def test_what_an_event_means(kind: EventKind, detail: str, trigger: Trigger) -> None:
    assert trigger_of(kind, detail) is trigger


def test_every_event_kind_has_a_meaning() -> None:
    """No kind the adapter emits is forgotten (a new one is OTHER until decided)."""
    for kind in EventKind:
        assert isinstance(trigger_of(kind, ""), Trigger)
