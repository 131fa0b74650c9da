"""The virtbackupd service loop: policies -> schedules and event triggers
-> a fair queue of backups run by the engine, under systemd.

Lifecycle in three phases (`run`, as uvicorn's server): start-up (config,
policies, store, clean up what a dead process left, schedules, catch-up
of missed runs, the supervised tasks), the main loop (SIGHUP reloads),
shutdown (running backups are cancelled and cleaned up by the engine,
waited for at most SHUTDOWN_BOUND_S; exit 0, or 1 when a supervised task
died, the state database was replaced under us, or something still ran
at the bound). A second SIGTERM/SIGINT stops at once, in any phase: what
still runs is abandoned, logged, and cleaned up by the next start.

What each event, schedule tick or missed run asks for, and how requests
merge, is decided in :mod:`virtbackupd.daemon.decisions`; each domain's
place in the queue is a :class:`~virtbackupd.daemon.slots.Slot`; this
module carries the decisions out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from virtbackupd import logs
from virtbackupd.adapters import host_folders, libvirt_conn, priority
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.libvirt_events import DomainEvent, EventSource
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.scheduler import Schedules
from virtbackupd.adapters.sd_notify import Notifier, watchdog_interval
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig, load_config, zone_name
from virtbackupd.core.policy import Level, Policy
from virtbackupd.core.repository_format.holds import HoldKind
from virtbackupd.daemon import decisions, recovery
from virtbackupd.daemon.decisions import Trigger
from virtbackupd.daemon.policies import PolicyBook
from virtbackupd.daemon.single import hold_daemon_lock
from virtbackupd.daemon.slots import After, Slot, SlotState
from virtbackupd.daemon.status_file import (
    DaemonStatus,
    DomainState,
    remove_status,
    write_status,
)
from virtbackupd.daemon.supervisor import WATCHDOG, Supervisor
from virtbackupd.daemon.verifier import VERIFY, VERIFY_FS, verify_loop
from virtbackupd.engine import guest_view, vm_starts
from virtbackupd.engine.backup import BackupContext, backup_domain
from virtbackupd.engine.recovery.leftovers import sweep_runtime
from virtbackupd.engine.restore import live as live_restore
from virtbackupd.engine.upkeep import catalogue
from virtbackupd.engine.upkeep.prune import prune_under_policy
from virtbackupd.errors import BackupFailedError, ConfigError, LibvirtError, VirtBackupError

#: How long a stop waits for running backups to be cancelled and cleaned
#: up before it abandons them (below the unit's TimeoutStopSec=90s, so the
#: daemon says what it left rather than being killed). docs/operations.md.
SHUTDOWN_BOUND_S = 60.0
HOLDS_INTERVAL_S = 5.0  # how often live restores and mounts are looked after
STORE_CHECK_S = 5.0  # how often the daemon checks its database file is still the one it opened

log = structlog.get_logger("virtbackupd.daemon")


class Service:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: DaemonConfig = load_config(config_path)
        self.book = PolicyBook()
        self.notifier = Notifier()
        self.notify_dropped_said = False
        self.slots: dict[str, Slot] = {}  # domain uuid -> its place in the queue
        self.queue: asyncio.Queue[str] = asyncio.Queue()  # uuids of QUEUED slots
        self.verify_queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.stop = asyncio.Event()  # the first SIGTERM/SIGINT, or a fatal error
        self.forced = asyncio.Event()  # a second signal: stop at once
        self.signals = 0
        self.reload_requested = asyncio.Event()  # SIGHUP
        # Tasks (and lifecycle phases) the shutdown left running: the
        # process ends without waiting for them (daemon/main.py).
        self.abandoned: list[str] = []
        self.exit_code = 0
        self.schedules = Schedules(
            self._scheduled,
            jitter=self.config.schedule_jitter,
            zone=self.config.schedule_timezone,
        )
        self.names: dict[str, str] = {}  # uuid -> name, every domain libvirt has
        self.governing: dict[str, str] = {}  # uuid -> policy file
        self.started_at = datetime.now(UTC)
        self.libvirt_connected = False
        self.levels: dict[str, list[str]] = {}  # uuid -> scheduled levels
        self.supervisor = Supervisor(self._fatal, self.stop)
        self.schedules_by_domain: dict[str, dict[str, str]] = {}  # uuid -> level -> cron
        # Start-up work that needs libvirt, left for when it answers.
        self.catch_up_pending = False
        self.retry_handles: set[asyncio.TimerHandle] = set()

    # --- policies and schedules -------------------------------------------------
    def _in_force(self) -> dict[str, list[str]]:
        return self.book.in_force([self.names.get(u, u) for u in self.governing])

    async def _resync(self, store: Store, catch_up: bool) -> None:
        """Schedules for every domain a policy governs; at start, catch up
        runs that were missed while the daemon was down."""
        async with await Libvirt.open(self.config.libvirt_uri) as lv:
            domains = await lv.domains()
        wanted: dict[tuple[str, str], str] = {}
        now = datetime.now(UTC)
        self.names = {d.uuid: d.name for d in domains}
        self.governing = {}
        self.schedules_by_domain = {}
        for d in domains:
            policy = self.book.for_domain(d.name, d.uuid)
            if policy is None:
                continue
            self.governing[d.uuid] = str(policy.source)
            # Keeps the catalogue's name current: `virtbackup list NEWNAME`
            # finds a renamed domain's backups at once.
            await store.see_domain(d.uuid, d.name, now)
            if policy.verify_schedule is not None:
                wanted[(d.uuid, VERIFY)] = policy.verify_schedule
            if policy.verify_filesystems_schedule is not None:
                wanted[(d.uuid, VERIFY_FS)] = policy.verify_filesystems_schedule
            schedules = decisions.schedules_of(policy)
            self.schedules_by_domain[d.uuid] = schedules
            for level_name, cron in schedules.items():
                wanted[(d.uuid, level_name)] = cron
            if catch_up:
                missed = decisions.missed_request(
                    schedules, await store.backups(d.uuid), now, self.config.schedule_timezone
                )
                if missed is not None:
                    log.info(
                        "catching up a missed backup", domain=d.name, backup_level=missed.value
                    )
                    self.request(d.uuid, missed)
        self.schedules.sync(wanted)
        self.levels = {}
        for uuid, level_name in wanted:
            self.levels.setdefault(uuid, []).append(level_name)
        self._publish()

    def _scheduled(self, uuid: str, level: str) -> None:
        if level in (VERIFY, VERIFY_FS):
            self.verify_queue.put_nowait((uuid, level))
            return
        # The jitter is under a minute: the minute now is the one that fired.
        minute = datetime.now(UTC).replace(second=0, microsecond=0)
        asked = decisions.scheduled_request(
            Level(level),
            minute,
            self.schedules_by_domain.get(uuid, {}),
            self._slot(uuid).fired,
            self.config.schedule_timezone,
        )
        if asked is None:
            return  # the other schedule of this minute already asked for it
        self._slot(uuid).fired = (minute, asked)
        self.request(uuid, asked)

    def _slot(self, uuid: str) -> Slot:
        return self.slots.setdefault(uuid, Slot())

    def _running(self) -> list[str]:
        return [u for u, s in self.slots.items() if s.state is SlotState.RUNNING]

    def request(self, uuid: str, level: Level) -> None:
        """Queue a backup: one waits per domain (full wins); a domain that
        runs now gets its request queued again when it ends."""
        self._carry_out(uuid, self._slot(uuid).ask(level))
        self._status()

    def _carry_out(self, uuid: str, after: After) -> None:
        if after is After.ENQUEUE:
            self.queue.put_nowait(uuid)
        elif after is After.RETRY_LATER:

            def due() -> None:
                self.retry_handles.discard(handle)
                self._carry_out(uuid, self._slot(uuid).retry_due())
                self._status()

            handle = asyncio.get_running_loop().call_later(self.config.busy_retry, due)
            self.retry_handles.add(handle)
            self._publish()

    # --- supervised tasks -----------------------------------------------------------
    def _fatal(self) -> None:
        self.exit_code = 1
        self.stop.set()

    async def _worker(self, store: Store) -> None:
        while True:
            uuid = await self.queue.get()
            slot = self._slot(uuid)
            level = slot.take()
            if level is None:
                continue
            self._status()
            name = self.names.get(uuid, uuid)
            error: BaseException | None = None
            try:
                await self._backup(store, uuid, level)
            except VirtBackupError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 (a bug: logs.failure gives its traceback; the worker lives on)
                logs.failure(log, "backup crashed", exc, domain=name, backup_level=level.value)
                error = exc
            except asyncio.CancelledError:
                # The daemon stops: the engine cleaned up (or the stop's bound
                # cut that short); the domain's slot is not running any more.
                slot.finish(decisions.Outcome(ok=False, reason="cancelled"), _now())
                raise
            outcome = decisions.outcome_of(error)
            if outcome.retry:
                log.info(
                    "domain busy; the backup waits and is retried",
                    domain=name,
                    backup_level=level.value,
                    retry_in_s=self.config.busy_retry,
                    reason=outcome.reason,
                )
            # A backup that got as far as its id logged its own outcome line
            # (with BACKUP_ID); one that failed before is said here.
            elif isinstance(error, VirtBackupError) and not (
                isinstance(error, BackupFailedError) and error.backup_id
            ):
                logs.failure(log, "backup failed", error, domain=name, error=outcome.reason)
            self._carry_out(uuid, slot.finish(outcome, _now()))
            self._status()

    async def _backup(self, store: Store, uuid: str, level: Level) -> None:
        async with await Libvirt.open(self.config.libvirt_uri) as lv:
            ref = await lv.domain(uuid)
            policy = self.book.for_domain(ref.name, ref.uuid)
            if policy is None:
                log.info("no policy governs the domain now; request dropped", domain=ref.name)
                return
            await backup_domain(
                BackupContext(self.config, store, lv, policy),
                uuid,
                want=Level.FULL if level is Level.FULL else None,
            )
            self._slot(uuid).succeeded()  # the engine logged "backup complete"
            await self._prune(store, lv, policy, ref)

    async def _prune(self, store: Store, lv: Libvirt, policy: Policy, ref: DomainRef) -> None:
        """Retention and the chain limit after every successful backup; a
        failed prune is logged and retried after the next one."""
        try:  # the engine logs "prune done" with what went
            await prune_under_policy(self.config, store, policy, ref.uuid, ref.name, libvirt=lv)
        except (VirtBackupError, OSError) as exc:
            log.error("prune failed", domain=ref.name, error=str(exc))

    async def _holds(self) -> None:
        """Live restores and mounts: every few seconds while any exists,
        restart a move that is not running (its domain or libvirtd
        restarted), release the holds of finished moves and vanished
        mounts. Nothing to do costs one folder listing per repository."""
        while True:
            repos = self._repositories()
            try:
                guest_view.forget_vanished_mounts(repos)
                if any(h.kind is HoldKind.LIVE_RESTORE for r in repos for h in r.holds()):
                    async with await Libvirt.open(self.config.libvirt_uri) as lv:
                        for repo in repos:
                            await live_restore.settle(lv, repo, self.config)
            except VirtBackupError as exc:
                log.warning("settling live restores and mounts failed", error=str(exc))
            except Exception as exc:  # a bug: logged, tried again next round
                log.error("settling live restores and mounts crashed", exc_info=exc)
            await asyncio.sleep(HOLDS_INTERVAL_S)

    async def _events(self, store: Store, source: EventSource) -> None:
        async for ev in source.events():
            try:
                await self._on_event(store, ev)
            except VirtBackupError as exc:
                # libvirtd went away while we asked it something: the
                # reconnect's CONNECTED event resynchronises.
                say = log.warning if self._governed(ev) else log.debug
                say(
                    "handling a libvirt event failed",
                    libvirt_event=ev.kind.value,
                    domain=ev.name or None,
                    error=str(exc),
                )
            except Exception as exc:  # a bug: logged, events keep flowing
                log.error(
                    "handling a libvirt event crashed",
                    libvirt_event=ev.kind.value,
                    domain=ev.name or None,
                    exc_info=exc,
                )

    def _governed(self, ev: DomainEvent) -> bool:
        """Whether a policy governed the event's domain at the last look:
        nothing about other domains is worth more than a debug line."""
        return bool(ev.uuid) and ev.uuid in self.governing

    async def _on_event(self, store: Store, ev: DomainEvent) -> None:
        trigger = decisions.trigger_of(ev.kind, ev.detail)
        if trigger is Trigger.CONNECTED:
            self.libvirt_connected = True
            if self.catch_up_pending:  # libvirtd was not there at start
                await self._recover(store)
            await self._resync(store, catch_up=self.catch_up_pending)
            self.catch_up_pending = False
        elif trigger is Trigger.DISCONNECTED:
            self.libvirt_connected = False
            log.warning("lost the connection to libvirtd; reconnecting")
            self._publish()
        elif trigger in (Trigger.DEFINED, Trigger.UNDEFINED):
            await self._resync(store, catch_up=False)
            if trigger is Trigger.DEFINED:
                asked = decisions.event_request(
                    trigger,
                    self.book.for_domain(ev.name, ev.uuid),
                    bool(await store.backups(ev.uuid)),
                )
                if asked is not None:
                    log.info("new domain: first backup", domain=ev.name, backup_level=asked.value)
                    self.request(ev.uuid, asked)
        elif trigger is Trigger.STOPPED:
            asked = decisions.event_request(trigger, self.book.for_domain(ev.name, ev.uuid), True)
            if asked is not None:
                log.info("domain stopped: backup", domain=ev.name, reason=ev.detail)
                self.request(ev.uuid, asked)
        elif trigger is Trigger.CRASHED:
            say = log.warning if self._governed(ev) else log.debug
            say(
                "domain crashed; its next backup will be checked for broken bitmaps", domain=ev.name
            )

    async def _watch_store(self, store: Store) -> None:
        """A state.db deleted or replaced under the daemon would take its
        writes into a file nobody reads: stop, and let the restart open
        what is at the path now."""
        while True:
            await asyncio.sleep(STORE_CHECK_S)
            if store.replaced():
                log.error(
                    "the state database was removed or replaced while the daemon ran; "
                    "stopping (a restart opens the file now at that path; `virtbackup "
                    "reindex` rebuilds a lost one from the repository)",
                    path=str(store.path),
                )
                self._fatal()
                return

    # --- status ----------------------------------------------------------------------
    def _status(self) -> None:
        names = sorted(self.names.get(u, u) for u in self._running())
        text = f"backing up {', '.join(names)}" if names else "idle"
        queued = sum(s.queued is not None for s in self.slots.values())
        sent = self.notifier.status(f"{text}; {queued} queued")
        if not sent and self.notifier.enabled and not self.notify_dropped_said:
            self.notify_dropped_said = True
            log.warning(
                "the service manager does not read our notifications ($NOTIFY_SOCKET); "
                "dropping them rather than waiting",
                socket=self.notifier.address,
            )
        self._publish()

    def _publish(self) -> None:
        """The daemon's own state for `virtbackup status`, replaced atomically."""
        now = datetime.now(UTC)
        domains = {}
        noted = {u for u, s in self.slots.items() if s.queued or s.last_failure}
        for uuid in sorted(set(self.names) | noted):
            runs = {}
            for level in self.levels.get(uuid, []):
                when = self.schedules.next_run(uuid, level, now)
                if when is not None:
                    runs[level] = when.isoformat()
            slot = self.slots.get(uuid, Slot())
            domains[uuid] = DomainState(
                name=self.names.get(uuid, uuid),
                policy=self.governing.get(uuid),
                next_runs=runs,
                queued=slot.queued.value if slot.queued else None,
                retrying=slot.retry_reason if slot.state is SlotState.WAITING else None,
                last_failure=slot.last_failure,
            )
        try:
            write_status(
                self.config.runtime_dir,
                DaemonStatus(
                    pid=os.getpid(),
                    started=self.started_at.isoformat(),
                    libvirt_uri=self.config.libvirt_uri,
                    libvirt_connected=self.libvirt_connected,
                    running=tuple(sorted(self._running())),
                    domains=domains,
                    schedule_timezone=zone_name(self.config.schedule_timezone),
                    policy_files=self.book.enforced,
                ),
            )
        except OSError as exc:
            log.warning("cannot write the status file", error=str(exc))

    # --- lifecycle: start-up, main loop, shutdown -------------------------------
    async def run(self) -> int:
        # QEMU passes through these to its job folders (UMask=0077 would
        # make them 0700); an existing one keeps its mode.
        host_folders.make_passable(self.config.runtime_dir)
        # First of all, before a clean-up, a status file or a schedule: a
        # second daemon on this config stops here (held until we exit).
        lock = hold_daemon_lock(self.config.runtime_dir)
        try:
            return await self._run()
        finally:
            os.close(lock)

    async def _run(self) -> int:
        self._prepare()
        async with contextlib.AsyncExitStack() as held:
            store = await held.enter_async_context(Store.open(self.config.state_db))
            source = await held.enter_async_context(EventSource(self.config.libvirt_uri))
            if await self._unless_forced("start-up", self._startup(store, source)):
                await self._unless_forced("main loop", self._main_loop(store))
            await self._shutdown()
            if self.abandoned:
                # Closing the store or the event source could wait on what
                # was abandoned: the process ends without (daemon/main.py).
                held.pop_all()
        remove_status(self.config.runtime_dir)
        log.info("virtbackupd stopped", exit_code=self.exit_code)
        return self.exit_code

    def _prepare(self) -> None:
        logs.configure(self.config.log_level, logs.daemon_format(self.config.log_format))
        host_folders.make_passable(self.config.scratch_dir)
        priority.apply(self.config.priority)
        libvirt_conn.configure(self.config.libvirt_timeout)
        self.book.load(self.config, at_start=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)

    def _signalled(self, sig: signal.Signals) -> None:
        """The first SIGTERM/SIGINT stops gracefully; the next forces."""
        self.signals += 1
        if self.signals == 1:
            self.stop.set()
        elif not self.forced.is_set():
            log.warning("second signal: stopping at once", signal=sig.name)
            self.forced.set()

    async def _unless_forced(self, phase: str, work: Coroutine[Any, Any, None]) -> bool:
        """Run a phase of the lifecycle to its end, unless a second signal
        comes first: then it is cancelled and left (False)."""
        task = asyncio.create_task(work, name=phase)
        forced = asyncio.create_task(self.forced.wait())
        try:
            await asyncio.wait({task, forced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        if not task.done():
            task.cancel()
            self.abandoned.append(phase)
            return False
        task.result()  # its error, if it failed (a refused catalogue, ...)
        return True

    async def _startup(self, store: Store, source: EventSource) -> None:
        # A catalogue of another repository is refused (the daemon
        # exits naming it): its rows would be acted on here.
        await catalogue.check_identity(store, self._repositories())
        await recovery.reconcile_catalogue(store, self._repositories())
        await sweep_runtime(self.config.runtime_dir)
        # The hook acts only where this folder exists (tmpfiles makes it
        # at boot; an install without tmpfiles gets it here).
        host_folders.make_folder(vm_starts.HOOK_DIR)
        if not vm_starts.hook_installed():
            log.warning(
                "the libvirt hook is not installed: a VM started during an offline "
                "backup fails with 'Failed to get \"write\" lock' until the backup ends; "
                "install it as docs/operations.md says",
                hook=str(vm_starts.HOOK_INSTALLED),
            )
        self.schedules.start()
        try:
            await self._recover(store)
            await self._resync(store, catch_up=True)
            self.libvirt_connected = True
        except LibvirtError as exc:
            # libvirtd not (yet) there: at boot, or restarting. Wait for
            # it instead of exiting; the event source reconnects with
            # backoff and its CONNECTED event finishes the start-up.
            log.warning(
                "libvirtd is not reachable; starting without it and waiting for it",
                error=str(exc),
            )
            self.catch_up_pending = True
        self._start_tasks(store, source)
        self.notifier.ready("idle")
        self._status()
        log.info("virtbackupd started", **self._in_force())

    async def _recover(self, store: Store) -> None:
        """What a dead daemon or command left, put right before anything new starts."""
        repos = self._repositories()
        await recovery.clean_interrupted(self.config, store, repos, self.book.for_domain)
        await recovery.tidy_shut_off(self.config, store, self.book.for_domain)

    def _start_tasks(self, store: Store, source: EventSource) -> None:
        for i in range(self.config.max_concurrent_backups):
            self.supervisor.start(f"worker-{i}", lambda: self._worker(store))
        self.supervisor.start("events", lambda: self._events(store, source))
        self.supervisor.start(
            "verifier",
            lambda: verify_loop(
                store, self.verify_queue, lambda: self.config, lambda u: self.names.get(u, u)
            ),
        )
        self.supervisor.start("store-watch", lambda: self._watch_store(store))
        self.supervisor.start("holds", self._holds)
        interval = watchdog_interval()
        if interval is not None:  # WatchdogSec= set in the unit
            self.supervisor.start(
                WATCHDOG, lambda: self.supervisor.watchdog(self.notifier, interval)
            )

    async def _main_loop(self, store: Store) -> None:
        """Until a stop: SIGHUP reloads."""
        while not self.stop.is_set():
            waiter = asyncio.create_task(self.reload_requested.wait())
            stopper = asyncio.create_task(self.stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if self.reload_requested.is_set() and not self.stop.is_set():
                self.reload_requested.clear()
                await self._reload(store)

    async def _reload(self, store: Store) -> None:
        try:
            self.config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config rejected; keeping the previous one", error=str(exc))
        self.schedules.set_zone(self.config.schedule_timezone)
        adopted = self.book.load(self.config, at_start=False)
        self.notifier.reloading()
        try:
            await self._resync(store, catch_up=False)
        except VirtBackupError as exc:
            log.warning("resynchronising after reload failed", error=str(exc))
        # The reload's one outcome line: what is in force now.
        if adopted:
            log.info("policies reloaded", **self._in_force())
        else:
            log.warning("reload rejected; the previous policies stay", **self._in_force())
        self.notifier.ready("reloaded")

    async def _shutdown(self) -> None:
        """Cancel every task (a running backup is cleaned up by the engine)
        and wait for them: at most SHUTDOWN_BOUND_S, or until a second
        signal. What still runs then is cancelled again, named in the log
        and left: the process ends without it (exit 1), and the next start
        cleans up what it left, as after a crash."""
        self.notifier.stopping()
        log.info("stopping: cancelling running backups", running=len(self._running()))
        self.schedules.shutdown()
        for handle in self.retry_handles:
            handle.cancel()
        self.abandoned += await self.supervisor.stop(SHUTDOWN_BOUND_S, self.forced)
        if self.abandoned:
            self.exit_code = 1
            log.error(
                "stopping without waiting for what still runs; the next start cleans up after it",
                why="a second signal" if self.forced.is_set() else "the shutdown bound",
                bound_s=SHUTDOWN_BOUND_S,
                abandoned=self.abandoned,
                domains=sorted(self.names.get(u, u) for u in self._running()),
            )

    def _repositories(self) -> list[Repository]:
        roots = {self.config.backup_root} | {p.target for p in self.book.policies if p.target}
        return [Repository(r) for r in sorted(roots)]


def _now() -> str:
    return datetime.now(UTC).isoformat()
