"""What one backup job knows, fixed for its whole run: who it backs up,
its ids and folders, the policy and configuration it follows, its log,
and (from the moment its plan is made) its undo log.

Frozen: the steps of the pipeline (planning, the exports, the copy, the
commit) read it and never change it; what changes while the job runs is
the driver's own state (engine.backup.driver)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.policy import Policy
from virtbackupd.core.repository_format.storage import StepHook
from virtbackupd.core.repository_format.undo import UndoKind
from virtbackupd.engine.recovery.undo import Undo


@dataclass
class BackupContext:
    """What the caller (the CLI, the daemon) gives every backup it takes."""

    config: DaemonConfig
    store: Store
    libvirt: Libvirt
    policy: Policy
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    step: StepHook | None = None  # called after each durable commit step (crash tests)


@dataclass(frozen=True)
class JobSetup:
    """A job before its plan: everything but the undo log."""

    config: DaemonConfig
    store: Store
    libvirt: Libvirt
    policy: Policy
    now: Callable[[], datetime]
    step: StepHook | None
    ref: DomainRef
    running: bool  # online (a libvirt pull job) or offline (qemu-nbd on the images)
    backup_id: str
    checkpoint: str
    started: datetime
    repo: Repository
    # structlog's bound logger, with the `notice` level virtbackupd.logs adds
    log: Any

    @property
    def job_dir(self) -> Path:
        """The job's runtime folder: QEMU's NBD socket, our qemu-nbd helpers."""
        return self.config.runtime_dir / "jobs" / self.backup_id

    @property
    def scratch_dir(self) -> Path:
        """QEMU's copy-before-write scratch images (online jobs)."""
        return self.config.scratch_dir / self.backup_id

    @property
    def partial_dir(self) -> Path:
        return self.repo.partial_dir(self.ref.uuid, self.backup_id)


@dataclass(frozen=True)
class JobContext(JobSetup):
    """A planned job: its undo log is written (engine.recovery.undo) before any
    step it lists is taken."""

    undo: Undo

    @classmethod
    def planned(cls, setup: JobSetup, undo: Undo) -> JobContext:
        return cls(**{f.name: getattr(setup, f.name) for f in fields(setup)}, undo=undo)

    def note(self, kind: UndoKind, path: Path | str | None = None, name: str | None = None) -> None:
        """Write down a step before taking it: a failure, or the next job
        after this process died, takes it back."""
        self.undo.note(kind, path, name)
