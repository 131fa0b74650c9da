"""The virtbackupd service loop: policies -> schedules and event triggers
-> a fair queue of backups run by the engine, under systemd.

Lifecycle in three parts (`run`): startup (config, policies, store, clean
up what a dead process left, schedules, catch-up of missed runs), the main
loop (supervised tasks; SIGHUP reloads), shutdown (running backups are
cancelled and cleaned up by the engine; exit 0, or 1 when a supervised
task died or the state database was replaced under us).

What each event, schedule tick or missed run asks for, and how requests
merge, is decided in :mod:`virtbackupd.daemon.decisions`; this module
carries the decisions out.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from virtbackupd import logs
from virtbackupd.adapters import host_folders, libvirt_conn, priority
from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.libvirt_events import DomainEvent, EventKind, EventSource
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.scheduler import Schedules
from virtbackupd.adapters.sd_notify import Notifier, watchdog_interval
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig, load_config, zone_name
from virtbackupd.config.policy import (
    LoadedPolicies,
    file_digests,
    load_policies,
    missing_dirs,
    policy_files,
)
from virtbackupd.core.domain_xml import parse_domain
from virtbackupd.core.policy import Level, Policy, policy_for
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.core.repository_format.holds import HoldKind
from virtbackupd.daemon import decisions
from virtbackupd.daemon.decisions import Trigger
from virtbackupd.daemon.single import hold_daemon_lock
from virtbackupd.daemon.status_file import (
    DaemonStatus,
    DomainState,
    EnforcedFile,
    remove_status,
    write_status,
)
from virtbackupd.engine import catalogue, guest_view, live_restore, own_checkpoints, vm_starts
from virtbackupd.engine.backup import BackupContext, backup_domain
from virtbackupd.engine.domain_job import domain_job
from virtbackupd.engine.leftovers import sweep_runtime
from virtbackupd.engine.locks import domain_lock
from virtbackupd.engine.prune import prune_under_policy
from virtbackupd.engine.verify import verify_filesystems, verify_recorded
from virtbackupd.errors import BackupFailedError, ConfigError, LibvirtError, VirtBackupError

VERIFY = "verify"  # the schedule kinds beside the backup levels
VERIFY_FS = "verify_filesystems"
HOLDS_INTERVAL_S = 5.0  # how often live restores and mounts are looked after
STORE_CHECK_S = 5.0  # how often the daemon checks its database file is still the one it opened

log = structlog.get_logger("virtbackupd.daemon")


class Service:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: DaemonConfig = load_config(config_path)
        self.policies: list[Policy] = []
        self.rejected: LoadedPolicies | None = None  # the files that did not load, when adopted
        self.enforced: dict[str, EnforcedFile] = {}  # what the adopted policies were read from
        self.last_rejected: list[str] = []  # files (and folders) the last reading refused
        self.notifier = Notifier()
        self.notify_dropped_said = False
        self.pending: dict[str, Level] = {}  # domain uuid -> level asked
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.verify_queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.running: set[str] = set()
        self.retrying: dict[str, str] = {}  # uuid -> why it waits
        self.failures: dict[str, tuple[str, str]] = {}  # uuid -> (time, reason)
        self.stop = asyncio.Event()
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
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.schedules_by_domain: dict[str, dict[str, str]] = {}  # uuid -> level -> cron
        self.fired: dict[str, tuple[datetime, Level]] = {}  # uuid -> last scheduled ask
        # Start-up work that needs libvirt, left for when it answers.
        self.catch_up_pending = False
        self.retry_handles: set[asyncio.TimerHandle] = set()

    # --- policies and schedules -------------------------------------------------
    def _load_policies(self, at_start: bool) -> bool:
        """Read the policy folders. At start a missing folder is an error
        (the daemon would silently back up nothing); at reload a broken
        set keeps the previous policies. Returns whether what was read is
        now in force."""
        missing = missing_dirs(self.config.policy_dirs)
        if missing and at_start:
            raise ConfigError(
                f"{self.config.source}: policy_dirs: {', '.join(map(str, missing))} does not "
                "exist; create it (and put policy files in it) or fix the path"
            )
        for d in missing:
            log.error("policy folder missing", folder=str(d))
        files = policy_files(self.config.policy_dirs)
        loaded = load_policies(files)
        policies, errors = loaded.policies, loaded.errors
        for e in errors:
            log.error("policy file rejected", error=str(e))
        self.last_rejected = [str(r.source) for r in loaded.rejected] + [str(d) for d in missing]
        if (errors or missing) and self.policies:
            return False
        self.rejected = loaded
        self.enforced = enforced_files(files, loaded)
        if not files:
            log.warning(
                "no policy files: no domain is backed up",
                folders=[str(d) for d in self.config.policy_dirs],
            )
        self.policies = policies
        return True

    def _in_force(self) -> dict[str, list[str]]:
        """What the start and every reload say they loaded: the policy
        files in force, the domains they govern, the files refused."""
        return {
            "files": sorted(str(p.source) for p in self.policies),
            "governed": sorted(self.names.get(u, u) for u in self.governing),
            "rejected": self.last_rejected,
        }

    def _policy(self, name: str, uuid: str) -> Policy | None:
        refusal = self.rejected.refusal(name, uuid) if self.rejected is not None else None
        if refusal is not None:
            # A domain no loaded policy governs is not backed up anyway:
            # the "policy file rejected" line said why; one governed by a
            # loaded policy and named by a broken file is skipped, loudly.
            if any(p.matches(name, uuid) for p in self.policies):
                log.error("domain skipped", domain=name, error=refusal)
            return None
        try:
            return policy_for(name, uuid, self.policies)
        except ConfigError as exc:
            log.error("domain skipped", domain=name, error=str(exc))
            return None

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
            policy = self._policy(d.name, d.uuid)
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
            self.fired.get(uuid),
            self.config.schedule_timezone,
        )
        if asked is None:
            return  # the other schedule of this minute already asked for it
        self.fired[uuid] = (minute, asked)
        self.request(uuid, asked)

    def request(self, uuid: str, level: Level) -> None:
        """Queue a backup: one waits per domain (full wins); a domain that
        runs now gets its request queued again when it ends."""
        first = uuid not in self.pending
        self.pending[uuid] = decisions.merge(self.pending.get(uuid), level)
        if first and uuid not in self.running:
            self.queue.put_nowait(uuid)
        self._status()

    def _retry_later(self, uuid: str, level: Level, why: str) -> None:
        self.retrying[uuid] = why
        loop = asyncio.get_running_loop()

        def again() -> None:
            self.retry_handles.discard(handle)
            self.retrying.pop(uuid, None)
            self.request(uuid, level)

        handle = loop.call_later(self.config.busy_retry, again)
        self.retry_handles.add(handle)
        self._publish()

    # --- supervised tasks -----------------------------------------------------------
    def _supervise(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a long-lived task. Jobs inside it are guarded on their own;
        if the task itself ends (a bug), the daemon cannot keep its
        promises: it logs why and stops with exit 1 so that systemd
        restarts it (Restart=on-failure)."""
        task = asyncio.create_task(factory(), name=name)
        self.tasks[name] = task

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or self.stop.is_set():
                return
            exc = t.exception()
            log.error(
                "daemon task died; stopping so that the service manager restarts the daemon",
                task=name,
                error=repr(exc) if exc else "returned",
                exc_info=exc,
            )
            self._fatal()

        task.add_done_callback(done)

    def _fatal(self) -> None:
        self.exit_code = 1
        self.stop.set()

    async def _worker(self, store: Store) -> None:
        while True:
            uuid = await self.queue.get()
            level = self.pending.pop(uuid, None)
            if level is None:
                continue
            self.running.add(uuid)
            self._status()
            name = self.names.get(uuid, uuid)
            error: BaseException | None = None
            try:
                await self._backup(store, uuid, level)
            except VirtBackupError as exc:
                error = exc
            except Exception as exc:  # a bug: logged with its traceback, the worker lives on
                log.error("backup crashed", domain=name, backup_level=level.value, exc_info=exc)
                error = exc
            finally:
                self.running.discard(uuid)
                if uuid in self.pending:  # asked again while it ran
                    self.queue.put_nowait(uuid)
            outcome = decisions.outcome_of(error)
            if outcome.retry:
                log.info(
                    "domain busy; the backup waits and is retried",
                    domain=name,
                    backup_level=level.value,
                    retry_in_s=self.config.busy_retry,
                    reason=outcome.reason,
                )
                self._retry_later(uuid, level, outcome.reason)
            elif not outcome.ok:
                # A backup that got as far as its id logged its own outcome
                # line (with BACKUP_ID); one that failed before is said here.
                if isinstance(error, VirtBackupError) and not (
                    isinstance(error, BackupFailedError) and error.backup_id
                ):
                    log.error("backup failed", domain=name, error=outcome.reason)
                self.failures[uuid] = (datetime.now(UTC).isoformat(), outcome.reason)
            self._status()

    async def _backup(self, store: Store, uuid: str, level: Level) -> None:
        async with await Libvirt.open(self.config.libvirt_uri) as lv:
            ref = await lv.domain(uuid)
            policy = self._policy(ref.name, ref.uuid)
            if policy is None:
                log.info("no policy governs the domain now; request dropped", domain=ref.name)
                return
            await backup_domain(
                BackupContext(self.config, store, lv, policy),
                uuid,
                want=Level.FULL if level is Level.FULL else None,
            )
            self.failures.pop(uuid, None)  # the engine logged "backup complete"
            await self._prune(store, lv, policy, ref)

    async def _prune(self, store: Store, lv: Libvirt, policy: Policy, ref: DomainRef) -> None:
        """Retention and the chain limit after every successful backup; a
        failed prune is logged and retried after the next one."""
        try:  # the engine logs "prune done" with what went
            await prune_under_policy(self.config, store, policy, ref.uuid, ref.name, libvirt=lv)
        except (VirtBackupError, OSError) as exc:
            log.error("prune failed", domain=ref.name, error=str(exc))

    async def _verifier(self, store: Store) -> None:
        """Scheduled verification, one domain at a time, never during a
        backup or prune of that domain (what is left waits for the next
        schedule)."""
        while True:
            uuid, kind = await self.verify_queue.get()
            name = self.names.get(uuid, uuid)
            try:
                backups = await store.backups(uuid, status=BackupStatus.COMPLETE)
                if kind == VERIFY_FS:
                    await self._check_filesystems(store, name, backups[-1:])
                    continue
                bad = [
                    verdict.as_json()
                    async for _, verdict in verify_recorded(self.config, store, backups)
                    if not verdict.ok
                ]
            except VirtBackupError as exc:
                log.warning("scheduled verify skipped", domain=name, error=str(exc))
                continue
            except Exception as exc:  # a bug: logged, the verifier lives on
                log.error("scheduled verify crashed", domain=name, exc_info=exc)
                continue
            if bad:
                log.error("verify failed", domain=name, backups=len(backups), failed=bad)
            else:
                log.info("verify done", domain=name, backups=len(backups))

    async def _check_filesystems(
        self, store: Store, name: str, backups: Sequence[BackupRecord]
    ) -> None:
        """The scheduled `verify --filesystems` of the newest backup."""
        for b in backups:
            found, notes = await verify_filesystems(self.config, store, b)
            bad = [f"{f.label} ({f.fstype}): {f.detail}" for f in found if f.ok is False]
            if bad:
                log.error(
                    "filesystem check failed", domain=name, backup_id=b.id, damaged=bad, notes=notes
                )
            else:
                checked = [f.label for f in found if f.ok]
                log.info(
                    "filesystem check done", domain=name, backup_id=b.id, clean=checked, notes=notes
                )

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
        if ev.kind is EventKind.CONNECTED:
            self.libvirt_connected = True
            if self.catch_up_pending:  # libvirtd was not there at start
                await self._clean_interrupted(store)
                await self._tidy_shut_off(store)
            await self._resync(store, catch_up=self.catch_up_pending)
            self.catch_up_pending = False
        elif ev.kind is EventKind.DISCONNECTED:
            self.libvirt_connected = False
            log.warning("lost the connection to libvirtd; reconnecting")
            self._publish()
        elif ev.kind in (EventKind.DEFINED, EventKind.UNDEFINED):
            await self._resync(store, catch_up=False)
            if ev.kind is EventKind.DEFINED:
                asked = decisions.event_request(
                    Trigger.DEFINED,
                    self._policy(ev.name, ev.uuid),
                    bool(await store.backups(ev.uuid)),
                )
                if asked is not None:
                    log.info("new domain: first backup", domain=ev.name, backup_level=asked.value)
                    self.request(ev.uuid, asked)
        elif ev.kind is EventKind.STOPPED and ev.detail in ("shutdown", "destroyed"):
            asked = decisions.event_request(Trigger.STOPPED, self._policy(ev.name, ev.uuid), True)
            if asked is not None:
                log.info("domain stopped: backup", domain=ev.name, reason=ev.detail)
                self.request(ev.uuid, asked)
        elif ev.kind is EventKind.CRASHED:
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

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 only while every supervised task is alive: a ping
        proves the loops run, not merely this timer."""
        while True:
            alive = all(not t.done() for n, t in self.tasks.items() if n != "watchdog")
            if alive:
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    # --- status ----------------------------------------------------------------------
    def _status(self) -> None:
        names = sorted(self.names.get(u, u) for u in self.running)
        text = f"backing up {', '.join(names)}" if names else "idle"
        sent = self.notifier.status(f"{text}; {len(self.pending)} queued")
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
        for uuid in sorted(set(self.names) | set(self.pending) | set(self.failures)):
            runs = {}
            for level in self.levels.get(uuid, []):
                when = self.schedules.next_run(uuid, level, now)
                if when is not None:
                    runs[level] = when.isoformat()
            pending = self.pending.get(uuid)
            domains[uuid] = DomainState(
                name=self.names.get(uuid, uuid),
                policy=self.governing.get(uuid),
                next_runs=runs,
                queued=pending.value if pending else None,
                retrying=self.retrying.get(uuid),
                last_failure=self.failures.get(uuid),
            )
        try:
            write_status(
                self.config.runtime_dir,
                DaemonStatus(
                    pid=os.getpid(),
                    started=self.started_at.isoformat(),
                    libvirt_uri=self.config.libvirt_uri,
                    libvirt_connected=self.libvirt_connected,
                    running=tuple(sorted(self.running)),
                    domains=domains,
                    schedule_timezone=zone_name(self.config.schedule_timezone),
                    policy_files=self.enforced,
                ),
            )
        except OSError as exc:
            log.warning("cannot write the status file", error=str(exc))

    # --- lifecycle ----------------------------------------------------------------
    def _reload(self) -> bool:
        """Returns whether the policy files read now are in force."""
        try:
            self.config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config rejected; keeping the previous one", error=str(exc))
        self.schedules.set_zone(self.config.schedule_timezone)
        adopted = self._load_policies(at_start=False)
        self.notifier.reloading()
        return adopted

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
        logs.configure(self.config.log_level, logs.daemon_format(self.config.log_format))
        host_folders.make_passable(self.config.scratch_dir)
        priority.apply(self.config.priority)
        libvirt_conn.configure(self.config.libvirt_timeout)
        self._load_policies(at_start=True)
        loop = asyncio.get_running_loop()
        reload_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
        async with (
            Store.open(self.config.state_db) as store,
            EventSource(self.config.libvirt_uri) as source,
        ):
            # A catalogue of another repository is refused (the daemon
            # exits naming it): its rows would be acted on here.
            await catalogue.check_identity(store, self._repositories())
            await self._reconcile_catalogue(store)
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
                await self._clean_interrupted(store)
                await self._tidy_shut_off(store)
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
            for i in range(self.config.max_concurrent_backups):
                self._supervise(f"worker-{i}", lambda: self._worker(store))
            self._supervise("events", lambda: self._events(store, source))
            self._supervise("verifier", lambda: self._verifier(store))
            self._supervise("store-watch", lambda: self._watch_store(store))
            self._supervise("holds", self._holds)
            interval = watchdog_interval()
            if interval is not None:  # WatchdogSec= set in the unit
                self._supervise("watchdog", lambda: self._watchdog(interval))
            self.notifier.ready("idle")
            self._status()
            log.info("virtbackupd started", **self._in_force())
            while not self.stop.is_set():
                waiter = asyncio.create_task(reload_requested.wait())
                stopper = asyncio.create_task(self.stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                if reload_requested.is_set() and not self.stop.is_set():
                    reload_requested.clear()
                    adopted = self._reload()
                    try:
                        await self._resync(store, catch_up=False)
                    except VirtBackupError as exc:
                        log.warning("resynchronising after reload failed", error=str(exc))
                    # The reload's one outcome line: what is in force now.
                    if adopted:
                        log.info("policies reloaded", **self._in_force())
                    else:
                        log.warning(
                            "reload rejected; the previous policies stay", **self._in_force()
                        )
                    self.notifier.ready("reloaded")
            await self._shutdown()
        remove_status(self.config.runtime_dir)
        log.info("virtbackupd stopped", exit_code=self.exit_code)
        return self.exit_code

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping: cancelling running backups", running=len(self.running))
        self.schedules.shutdown()
        for handle in self.retry_handles:
            handle.cancel()
        for t in self.tasks.values():
            t.cancel()
        results = await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for name, result in zip(self.tasks, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                # Already logged by the supervisor when it died.
                log.debug("task ended with an error", task=name, error=repr(result))

    def _repositories(self) -> list[Repository]:
        roots = {self.config.backup_root} | {p.target for p in self.policies if p.target}
        return [Repository(r) for r in sorted(roots)]

    async def _reconcile_catalogue(self, store: Store) -> None:
        """The folders are the truth: the catalogue is brought in line with
        them at start (cheap: only what it disagrees on is read)."""
        for repo in self._repositories():
            try:
                found = await catalogue.reconcile(store, repo)
            except (OSError, VirtBackupError) as exc:
                log.error("cannot reconcile the catalogue", root=str(repo.root), error=str(exc))
                continue
            for problem in found.problems:
                log.warning("repository problem", root=str(repo.root), problem=problem)

    async def _tidy_shut_off(self, store: Store) -> None:
        """At start, for every governed domain that is shut off: remove
        bitmaps of ours that no checkpoint names, and drop our checkpoints
        after a QEMU crash (own_checkpoints.check_shut_off). A domain that
        is busy or being started is left to its next backup."""
        async with await Libvirt.open(self.config.libvirt_uri) as lv:
            for ref in await lv.domains():
                if self._policy(ref.name, ref.uuid) is None or await lv.is_running(ref):
                    continue
                try:
                    with domain_lock(self.config.runtime_dir, ref.uuid, ref.name, "tidy"):
                        async with vm_starts.running_or_held(lv, ref) as running:
                            if running:
                                continue
                            info = parse_domain(
                                await lv.xml(ref, inactive=True), f"domain XML of {ref.name}"
                            )
                            reason = await own_checkpoints.check_shut_off(
                                lv, store, ref, info, log.bind(domain=ref.name)
                            )
                except VirtBackupError as exc:
                    log.info("left for the domain's next backup", domain=ref.name, error=str(exc))
                    continue
                if reason is not None:
                    log.warning(
                        "checkpoint bitmaps inconsistent; the next backup is full",
                        domain=ref.name,
                        reason=reason,
                    )

    async def _clean_interrupted(self, store: Store) -> None:
        """Backups left "running" by a daemon that died: clean each domain
        (job aborted, checkpoint deleted, partial folder removed, record
        failed) under its lock, before anything new starts."""
        uuids = {b.domain_uuid for b in await store.backups(status=BackupStatus.RUNNING)}
        for repo in self._repositories():
            uuids |= {d.name for d in repo.domain_dirs() if repo.undo_logs(d.name)}
        if not uuids:
            return
        async with await Libvirt.open(self.config.libvirt_uri) as lv:
            for uuid in sorted(uuids):
                try:
                    ref = await lv.domain(uuid)
                except VirtBackupError:
                    for b in await store.backups(uuid, status=BackupStatus.RUNNING):
                        await store.fail_backup(
                            b.id, datetime.now(UTC), "interrupted: the domain is gone"
                        )
                    continue
                policy = self._policy(ref.name, ref.uuid)
                repo = Repository((policy.target if policy else None) or self.config.backup_root)
                try:
                    async with domain_job(
                        self.config, store, repo, ref.uuid, ref.name, "backup", libvirt=lv
                    ) as job:
                        cleaned = list(job.cleaned)
                except VirtBackupError as exc:
                    # A CLI backup may hold the lock: its own process cleans
                    # up; otherwise the domain's next backup tries again.
                    log.warning(
                        "cleaning an interrupted backup failed", domain=ref.name, error=str(exc)
                    )
                    continue
                # Each backup cleaned had its own line ("cleaned up an
                # interrupted backup", with BACKUP_ID).
                log.debug("cleaned interrupted backups", domain=ref.name, backups=cleaned)


def enforced_files(files: Sequence[Path], loaded: LoadedPolicies) -> dict[str, EnforcedFile]:
    """What each policy file of an adopted set held (its SHA-256, read
    again right after loading: an edit in between shows as a change, the
    safe side) and whether it loaded."""
    bad = {str(r.source) for r in loaded.rejected}
    return {f: EnforcedFile(digest, f not in bad) for f, digest in file_digests(files).items()}
