"""The daemon's supervised tasks stop within a bound: a task whose
clean-up outlasts it, or any task once a second signal forces the stop,
is cancelled again and named as left; tasks that end in time are not."""

from __future__ import annotations

import asyncio
import contextlib
import time

from virtbackupd.daemon.supervisor import Supervisor


async def _idle() -> None:
    await asyncio.Event().wait()


async def _slow_clean_up(seconds: float) -> None:
    """Cancelled, it still has `seconds` of clean-up to do (as a backup
    whose libvirt call hangs); a second cancel ends it."""
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.sleep(seconds)


def _supervisor() -> tuple[Supervisor, asyncio.Event, list[str]]:
    died: list[str] = []
    stopping = asyncio.Event()
    stopping.set()  # the daemon is stopping: cancelled tasks are not deaths
    return Supervisor(lambda: died.append("died"), stopping), asyncio.Event(), died


async def test_tasks_that_end_in_time_are_waited_for() -> None:
    sup, forced, died = _supervisor()
    sup.start("idle", _idle)
    sup.start("quick", lambda: _slow_clean_up(0.1))
    await asyncio.sleep(0.01)  # running
    assert await sup.stop(5.0, forced) == []
    assert all(t.done() for t in sup.tasks.values())
    assert died == []


async def test_a_clean_up_that_outlasts_the_bound_is_left() -> None:
    sup, forced, _ = _supervisor()
    sup.start("idle", _idle)
    sup.start("worker-0", lambda: _slow_clean_up(30))
    await asyncio.sleep(0.01)  # running
    started = time.monotonic()
    assert await sup.stop(0.3, forced) == ["worker-0"]
    assert 0.3 <= time.monotonic() - started < 5
    with contextlib.suppress(asyncio.CancelledError):
        await sup.tasks["worker-0"]  # cancelled once more: its clean-up is cut short
    assert sup.tasks["worker-0"].cancelled()


async def test_a_second_signal_ends_the_wait_at_once() -> None:
    sup, forced, _ = _supervisor()
    sup.start("worker-0", lambda: _slow_clean_up(30))
    await asyncio.sleep(0.01)  # running
    asyncio.get_running_loop().call_later(0.2, forced.set)
    started = time.monotonic()
    assert await sup.stop(60.0, forced) == ["worker-0"]
    assert time.monotonic() - started < 5


async def test_a_task_that_ends_on_its_own_stops_the_daemon() -> None:
    died: list[str] = []
    sup = Supervisor(lambda: died.append("died"), asyncio.Event())

    async def ends() -> None:
        return None

    sup.start("events", ends)
    await asyncio.sleep(0.05)
    assert died == ["died"]
