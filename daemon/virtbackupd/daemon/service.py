"""The virtbackupd service loop: policies -> schedules and event triggers
-> a fair queue of backups run by the engine, under systemd.

- Schedules: one cron job per (domain, level); missed runs are caught up at
  start from the state store.
- Events: a defined domain that matches a policy gets its schedules (and a
  first full backup when ``events.on_define`` says so); an undefined one
  loses them (its backups stay); a clean stop triggers ``events.on_shutdown``
  (an offline backup); a crash is left to the engine, which turns the next
  backup into a full one when libvirt reports the bitmaps inconsistent.
- Queue: at most one pending request per domain (full wins over
  incremental), FIFO across domains, ``max_concurrent_backups`` workers.
- Signals: SIGHUP reloads config and policies (a broken file is reported
  and the previous version stays); SIGTERM/SIGINT cancel running backups
  (the engine cleans up) and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import structlog

from virtbackupd import logs
from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.libvirt_events import EventKind, EventSource
from virtbackupd.adapters.scheduler import Schedules, missed_since
from virtbackupd.adapters.sd_notify import Notifier, watchdog_interval
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig, load_config
from virtbackupd.config.policy import load_policies, policy_files
from virtbackupd.core.policy import EventAction, Level, Policy, policy_for
from virtbackupd.core.records import BackupStatus
from virtbackupd.engine.backup import BackupContext, backup_domain
from virtbackupd.engine.leftovers import clean_leftovers
from virtbackupd.engine.locks import domain_lock
from virtbackupd.engine.prune import describe, prune_under_policy
from virtbackupd.engine.repository import Repository
from virtbackupd.engine.verify import verify_recorded
from virtbackupd.errors import ConfigError, VirtBackupError

VERIFY = "verify"  # the schedule kind beside the backup levels

log = structlog.get_logger("virtbackupd.daemon")

#: In the runtime dir: what the daemon does, for `virtbackup status`.
STATUS_FILE = "daemon.json"


class Service:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: DaemonConfig = load_config(config_path)
        self.policies: list[Policy] = []
        self.notifier = Notifier()
        self.pending: dict[str, Level] = {}  # domain uuid -> strongest level asked
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.verify_queue: asyncio.Queue[str] = asyncio.Queue()
        self.running: set[str] = set()
        self.stop = asyncio.Event()
        self.schedules = Schedules(self._scheduled)
        self.names: dict[str, str] = {}  # uuid -> name
        self.started_at = datetime.now(UTC)
        self.libvirt_connected = False
        self.levels: dict[str, list[str]] = {}  # uuid -> scheduled levels

    # --- policies and schedules -------------------------------------------------
    def _load_policies(self) -> None:
        policies, errors = load_policies(policy_files(self.config.policy_dirs))
        for e in errors:
            log.error("policy file rejected", error=str(e))
        if errors and self.policies:
            log.warning("keeping the previous policies until the files are fixed")
            return
        self.policies = policies

    def _policy(self, name: str, uuid: str) -> Policy | None:
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
        for d in domains:
            policy = self._policy(d.name, d.uuid)
            if policy is None:
                continue
            history = [b for b in await store.backups(d.uuid) if b.status is BackupStatus.COMPLETE]
            if policy.verify_schedule is not None:
                wanted[(d.uuid, VERIFY)] = policy.verify_schedule
            for level, cron in (
                (Level.FULL, policy.full_schedule),
                (Level.INCREMENTAL, policy.incremental_schedule),
            ):
                if cron is None:
                    continue
                wanted[(d.uuid, level.value)] = cron
                last = next(
                    (
                        b.started
                        for b in reversed(history)
                        if level is Level.INCREMENTAL or b.level is Level.FULL
                    ),
                    None,
                )
                if catch_up and last is not None and missed_since(cron, last, now):
                    log.info("catching up a missed backup", domain=d.name, backup_level=level.value)
                    self.request(d.uuid, level)
        self.schedules.sync(wanted)
        self.levels = {}
        for uuid, level_name in wanted:
            self.levels.setdefault(uuid, []).append(level_name)
        self._publish()

    def _scheduled(self, uuid: str, level: str) -> None:
        if level == VERIFY:
            self.verify_queue.put_nowait(uuid)
            return
        self.request(uuid, Level(level))

    async def _verifier(self, store: Store) -> None:
        """Scheduled verification, one domain at a time, never during a
        backup or prune of that domain (what is left waits for the next
        schedule)."""
        while True:
            uuid = await self.verify_queue.get()
            name = self.names.get(uuid, uuid)
            backups = await store.backups(uuid, status=BackupStatus.COMPLETE)
            bad = []
            try:
                async for _, verdict in verify_recorded(backups, self.config.runtime_dir):
                    if not verdict.ok:
                        bad.append(verdict.as_json())
            except VirtBackupError as exc:
                log.warning("scheduled verify skipped", domain=name, error=str(exc))
                continue
            if bad:
                log.error("verify failed", domain=name, backups=len(backups), failed=bad)
            else:
                log.info("verify done", domain=name, backups=len(backups))

    def request(self, uuid: str, level: Level) -> None:
        """Queue a backup; a domain waits at most once (full wins)."""
        if uuid in self.pending:
            if level is Level.FULL:
                self.pending[uuid] = Level.FULL
            return
        self.pending[uuid] = level
        self.queue.put_nowait(uuid)

    # --- workers ------------------------------------------------------------------
    async def _worker(self, store: Store) -> None:
        while True:
            uuid = await self.queue.get()
            level = self.pending.pop(uuid, None)
            if level is None or uuid in self.running:
                if level is not None:  # one of ours runs it now: try again later
                    self.request(uuid, level)
                    await asyncio.sleep(1)
                continue
            self.running.add(uuid)
            self._status()
            try:
                await self._backup(store, uuid, level)
            except VirtBackupError as exc:
                log.error("backup failed", domain=self.names.get(uuid, uuid), error=str(exc))
            finally:
                self.running.discard(uuid)
                self._status()

    async def _backup(self, store: Store, uuid: str, level: Level) -> None:
        async with await Libvirt.open(self.config.libvirt_uri) as lv:
            ref = await lv.domain(uuid)
            policy = self._policy(ref.name, ref.uuid)
            if policy is None:
                return
            rec = await backup_domain(
                BackupContext(self.config, store, lv, policy),
                uuid,
                want=Level.FULL if level is Level.FULL else None,
            )
            log.info(
                "backup done",
                domain=ref.name,
                backup_id=rec.id,
                backup_level=rec.level.value,
                bytes_written=rec.bytes_written,
            )
            # Retention and the chain limit after every successful backup;
            # a failed prune is logged and retried after the next one.
            try:
                result = await prune_under_policy(
                    self.config, store, policy, ref.uuid, ref.name, libvirt=lv
                )
            except (VirtBackupError, OSError) as exc:
                log.error("prune failed", domain=ref.name, error=str(exc))
            else:
                pruned = [v.id for v in result.verdicts if not v.keep]
                if result.ops:
                    log.info(
                        "prune done",
                        domain=ref.name,
                        pruned=pruned,
                        operations=[describe(op) for op in result.ops],
                    )

    def _status(self) -> None:
        names = sorted(self.names.get(u, u) for u in self.running)
        text = f"backing up {', '.join(names)}" if names else "idle"
        self.notifier.status(f"{text}; {len(self.pending)} queued")
        self._publish()

    def _publish(self) -> None:
        """The daemon's own state for `virtbackup status`, replaced atomically."""
        next_runs: dict[str, dict[str, str]] = {}
        for uuid, levels in self.levels.items():
            for level in levels:
                when = self.schedules.next_run(uuid, level)
                if when is not None:
                    next_runs.setdefault(uuid, {})[level] = when.isoformat()
        data = {
            "pid": os.getpid(),
            "started": self.started_at.isoformat(),
            "libvirt_uri": self.config.libvirt_uri,
            "libvirt_connected": self.libvirt_connected,
            "running": sorted(self.running),
            "queued": sorted(self.pending),
            "next_runs": next_runs,
            "domains": self.names,
        }
        path = self.config.runtime_dir / STATUS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)

    # --- events -------------------------------------------------------------------
    async def _events(self, store: Store, source: EventSource) -> None:
        async for ev in source.events():
            if ev.kind is EventKind.CONNECTED:
                self.libvirt_connected = True
                await self._resync(store, catch_up=False)
            elif ev.kind is EventKind.DISCONNECTED:
                self.libvirt_connected = False
                log.warning("lost the connection to libvirtd; reconnecting")
                self._publish()
            elif ev.kind is EventKind.DEFINED:
                self.names[ev.uuid] = ev.name
                policy = self._policy(ev.name, ev.uuid)
                await self._resync(store, catch_up=False)
                wants = policy is not None and policy.on_define is not EventAction.NONE
                if wants and policy is not None and not await store.backups(ev.uuid):
                    log.info("new domain: first backup", domain=ev.name)
                    self.request(ev.uuid, Level(policy.on_define.value))
            elif ev.kind is EventKind.UNDEFINED:
                await self._resync(store, catch_up=False)
            elif ev.kind is EventKind.STOPPED and ev.detail in ("shutdown", "destroyed"):
                policy = self._policy(ev.name, ev.uuid)
                if policy is not None and policy.on_shutdown is not EventAction.NONE:
                    log.info("domain stopped: backup", domain=ev.name, reason=ev.detail)
                    self.request(ev.uuid, Level(policy.on_shutdown.value))
            elif ev.kind is EventKind.CRASHED:
                log.warning(
                    "domain crashed; its next backup will be checked for broken bitmaps",
                    domain=ev.name,
                )

    # --- lifecycle ----------------------------------------------------------------
    def _reload(self) -> None:
        try:
            self.config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config rejected; keeping the previous one", error=str(exc))
        self._load_policies()
        self.notifier.reloading()

    async def run(self) -> int:
        logs.configure(self.config.log_level, logs.daemon_format(self.config.log_format))
        self._load_policies()
        loop = asyncio.get_running_loop()
        reload_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
        async with (
            Store.open(self.config.state_db) as store,
            EventSource(self.config.libvirt_uri) as source,
        ):
            await self._clean_interrupted(store)
            await self._resync(store, catch_up=True)
            self.schedules.start()
            tasks = [
                asyncio.create_task(self._worker(store))
                for _ in range(self.config.max_concurrent_backups)
            ]
            tasks.append(asyncio.create_task(self._events(store, source)))
            tasks.append(asyncio.create_task(self._verifier(store)))
            tasks.append(asyncio.create_task(self._watchdog()))
            self.notifier.ready("idle")
            log.info("virtbackupd started", policies=len(self.policies))
            while not self.stop.is_set():
                waiter = asyncio.create_task(reload_requested.wait())
                stopper = asyncio.create_task(self.stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                if reload_requested.is_set():
                    reload_requested.clear()
                    self._reload()
                    await self._resync(store, catch_up=False)
                    self.notifier.ready("reloaded")
            self.notifier.stopping()
            log.info("stopping: cancelling running backups")
            self.schedules.shutdown()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, VirtBackupError):
                    await t
        log.info("virtbackupd stopped")
        return 0

    async def _clean_interrupted(self, store: Store) -> None:
        """Backups left "running" by a daemon that died: clean each domain
        (job aborted, checkpoint deleted, partial folder removed, record
        failed) under its lock, before anything new starts."""
        uuids = {b.domain_uuid for b in await store.backups(status=BackupStatus.RUNNING)}
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
                    with domain_lock(self.config.runtime_dir, ref.uuid, ref.name):
                        cleaned = await clean_leftovers(
                            lv, store, ref, self.config.runtime_dir, repo, datetime.now(UTC)
                        )
                except VirtBackupError as exc:
                    # Keep running: the next backup of the domain tries again.
                    log.error(
                        "cleaning an interrupted backup failed", domain=ref.name, error=str(exc)
                    )
                    continue
                log.warning("cleaned interrupted backups", domain=ref.name, backups=cleaned)

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)
