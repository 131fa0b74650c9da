"""libvirt domain events reach the asyncio loop from libvirt's own event
thread, and survive a libvirtd restart (reconnect, re-register)."""

from __future__ import annotations

import asyncio
import time

from testbed.domains import DomainFactory, MiB
from testbed.host import connect, ensure_libvirtd, stop_libvirtd
from virtbackupd.adapters.libvirt_events import DomainEvent, EventKind, EventSource

URI = "qemu:///system"


async def _until(
    src: EventSource, kind: EventKind, name: str = "", timeout: float = 30
) -> DomainEvent:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {kind} event for {name or 'the connection'}"
        ev = await src.next(timeout=left)
        if ev.kind is kind and (not name or ev.name == name):
            return ev


async def test_lifecycle_events_arrive(domains: DomainFactory) -> None:
    async with EventSource(URI) as src:
        await _until(src, EventKind.CONNECTED)
        td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB], start=False)
        ev = await _until(src, EventKind.DEFINED, td.name)
        assert ev.uuid == td.dom.UUIDString()
        await asyncio.to_thread(td.start)
        await _until(src, EventKind.STARTED, td.name)
        await asyncio.to_thread(td.dom.destroy)
        ev = await _until(src, EventKind.STOPPED, td.name)
        assert ev.detail == "destroyed"
        await asyncio.to_thread(td.dom.undefine)
        await _until(src, EventKind.UNDEFINED, td.name)


async def test_reconnects_after_libvirtd_restart(domains: DomainFactory) -> None:
    async with EventSource(URI, keepalive=(1, 2)) as src:
        await _until(src, EventKind.CONNECTED)
        await asyncio.to_thread(stop_libvirtd)
        await _until(src, EventKind.DISCONNECTED, timeout=30)
        await asyncio.to_thread(ensure_libvirtd)
        await _until(src, EventKind.CONNECTED, timeout=60)
        domains.conn = connect()  # the test bed's own connection died too
        # Callbacks were registered again: events flow on the new connection.
        td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB], start=False)
        await _until(src, EventKind.DEFINED, td.name)
