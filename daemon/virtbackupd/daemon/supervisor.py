"""The daemon's long-lived tasks (workers, events, verifier, ...), watched:
one that ends on its own is a bug the daemon cannot keep its promises
through, so it stops (exit 1) for the service manager to restart it. The
watchdog pings only while every task is alive, and the stop is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from virtbackupd.adapters.sd_notify import Notifier

log = structlog.get_logger("virtbackupd.daemon")

WATCHDOG = "watchdog"


class Supervisor:
    def __init__(self, on_death: Callable[[], None], stopping: asyncio.Event) -> None:
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._on_death = on_death
        self._stopping = stopping

    def start(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a long-lived task. Jobs inside it are guarded on their own;
        if the task itself ends (a bug), the daemon cannot keep its
        promises: it logs why and stops with exit 1 so that systemd
        restarts it (Restart=on-failure)."""
        task = asyncio.create_task(factory(), name=name)
        self.tasks[name] = task

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or self._stopping.is_set():
                return
            exc = t.exception()
            log.error(
                "daemon task died; stopping so that the service manager restarts the daemon",
                task=name,
                error=repr(exc) if exc else "returned",
                exc_info=exc,
            )
            self._on_death()

        task.add_done_callback(done)

    async def watchdog(self, notifier: Notifier, interval: float) -> None:
        """WATCHDOG=1 only while every supervised task is alive: a ping
        proves the loops run, not merely this timer."""
        while True:
            if all(not t.done() for n, t in self.tasks.items() if n != WATCHDOG):
                notifier.watchdog()
            await asyncio.sleep(interval)

    async def stop(self, bound: float, forced: asyncio.Event) -> list[str]:
        """Cancel every task and wait for them to end: at most `bound`
        seconds, and not at all once `forced` is set. What still runs
        then is cancelled once more and left; its names are returned."""
        for t in self.tasks.values():
            t.cancel()
        if self.tasks and not forced.is_set():
            ended = asyncio.create_task(asyncio.wait(self.tasks.values()))
            forcing = asyncio.create_task(forced.wait())
            await asyncio.wait({ended, forcing}, timeout=bound, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            forcing.cancel()
        left = []
        for name, t in self.tasks.items():
            if not t.done():
                t.cancel()
                left.append(name)
            elif not t.cancelled() and t.exception() is not None:
                # Already logged by the supervisor when it died.
                log.debug("task ended with an error", task=name, error=repr(t.exception()))
        return left
