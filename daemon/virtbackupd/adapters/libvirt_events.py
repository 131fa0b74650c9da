"""libvirt domain events for the asyncio daemon, done safely.

libvirt-python's ``libvirtaio`` touches the event loop from whichever thread
makes a libvirt call, so it is unsafe together with blocking calls made in
worker threads. Instead: libvirt's *default* event implementation runs in
one dedicated thread; callbacks do nothing but hand an event object to the
loop (``call_soon_threadsafe``); blocking calls go through a small executor.
A keepalive detects a dead libvirtd, the close callback reports it, and
:class:`EventSource` reconnects with backoff and re-registers its callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import libvirt

from virtbackupd.adapters import libvirt_conn
from virtbackupd.adapters.libvirt_conn import Workers, bounded
from virtbackupd.errors import LibvirtError


class EventKind(StrEnum):
    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    STOPPED = "stopped"  # detail: shutdown, destroyed, crashed, failed, saved, ...
    CRASHED = "crashed"  # libvirt's own crash event (QEMU died)
    OTHER = "other"
    JOB_COMPLETED = "job-completed"
    CONNECTED = "connected"  # (re)connected: re-synchronise
    DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class DomainEvent:
    kind: EventKind
    name: str = ""
    uuid: str = ""
    detail: str = ""


def _lifecycle(event: int, detail: int) -> tuple[EventKind, str]:
    if event == libvirt.VIR_DOMAIN_EVENT_DEFINED:
        return EventKind.DEFINED, "defined"
    if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
        return EventKind.UNDEFINED, "undefined"
    if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
        return EventKind.STARTED, "started"
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        names = {
            libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from-snapshot",
        }
        # What a stop means (clean, or QEMU died) is the daemon's decision
        # (daemon.decisions.trigger_of): here only libvirt's numbers become names.
        return EventKind.STOPPED, names.get(detail, str(detail))
    if event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
        return EventKind.CRASHED, "crashed"
    return EventKind.OTHER, f"event {event} detail {detail}"


class EventSource:
    """Domain events of one libvirt URI as an async iterator, across
    libvirtd restarts (``DISCONNECTED`` ... ``CONNECTED`` in between)."""

    def __init__(
        self,
        uri: str,
        keepalive: tuple[int, int] = libvirt_conn.KEEPALIVE,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.uri = uri
        self.keepalive = keepalive
        self.backoff = backoff
        self._queue: asyncio.Queue[DomainEvent] = asyncio.Queue()
        self._executor = Workers(1, "libvirt-ev")
        self._conn: Any = None
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventSource:
        libvirt_conn.event_loop()
        self._task = asyncio.create_task(self._maintain())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._disconnect()
        self._executor.shutdown(wait=False)

    async def events(self) -> AsyncIterator[DomainEvent]:
        while True:
            yield await self._queue.get()

    async def next(self, timeout: float | None = None) -> DomainEvent:
        return await asyncio.wait_for(self._queue.get(), timeout)

    # --- callbacks: run in the libvirt event thread; hand over, nothing else ---
    def _emit(self, event: DomainEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _op: Any) -> None:
        kind, why = _lifecycle(event, detail)
        self._emit(DomainEvent(kind, dom.name(), dom.UUIDString(), why))

    def _on_job_completed(self, _conn: Any, dom: Any, params: dict[str, Any], _op: Any) -> None:
        self._emit(
            DomainEvent(
                EventKind.JOB_COMPLETED, dom.name(), dom.UUIDString(), str(params.get("errmsg", ""))
            )
        )

    def _on_close(self, _conn: Any, reason: int, _op: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed
            self._loop.call_soon_threadsafe(self._lost.set)

    # --- connection upkeep ---------------------------------------------------------
    async def _call(self, fn: Any, *args: Any, what: str, timeout: float | None = None) -> Any:
        """Bounded: a hung connect or close must not hold the daemon (its
        exit waits for this source's end)."""
        bound = libvirt_conn.CALL_TIMEOUT_S if timeout is None else timeout
        return await bounded(self._executor, lambda: fn(*args), what, bound)

    async def _connect(self) -> None:
        def open_and_register() -> Any:
            conn = libvirt.open(self.uri)
            try:
                conn.setKeepAlive(*self.keepalive)
                conn.registerCloseCallback(self._on_close, None)
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed, None
                )
            except libvirt.libvirtError:
                conn.close()
                raise
            return conn

        try:
            self._conn = await self._call(
                open_and_register,
                what=f"a connect to {self.uri}",
                timeout=min(libvirt_conn.CALL_TIMEOUT_S, libvirt_conn.CONNECT_TIMEOUT_S),
            )
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"cannot connect to {self.uri}: {exc.get_error_message()}") from exc

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError, LibvirtError):
                await self._call(conn.close, what="close", timeout=5)

    async def _maintain(self) -> None:
        delay = self.backoff[0]
        while not self._closed:
            try:
                await self._connect()
            except LibvirtError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            delay = self.backoff[0]
            self._lost.clear()
            self._queue.put_nowait(DomainEvent(EventKind.CONNECTED))
            await self._lost.wait()
            self._queue.put_nowait(DomainEvent(EventKind.DISCONNECTED))
            await self._disconnect()
