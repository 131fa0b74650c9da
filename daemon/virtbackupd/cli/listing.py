"""`virtbackup list`: what the catalogue records, told as the repository
stands now. A backup merged by a prune is shown as it is stored now
(standalone, or on which parent), with its size on disk; backups an
interrupted prune is removing are shown as such, never as restore points;
failed attempts (with `--all`) with their reasons. A backup whose folder
cannot be read (manifest, a missing image) is `unreadable`, and every
backup whose chain goes through one is `unreadable-chain`: listed, never
dropped, with the file to blame; told alike whether the catalogue was
kept or rebuilt (the folders are read either way)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from virtbackupd.adapters.repository import Repository
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.engine.upkeep.catalogue import Standing, standing
from virtbackupd.errors import VirtBackupError


class State(StrEnum):
    COMPLETE = "complete"
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # recorded running, its process died: cancel cleans it up
    FAILED = "failed"
    PRUNING = "pruning"  # an interrupted prune is removing it: no restore point
    DAMAGED = "unreadable"  # its manifest cannot be read, or an image is missing
    ON_DAMAGED = "unreadable-chain"  # restores through an unreadable backup


@dataclass(frozen=True)
class Listed:
    record: BackupRecord
    state: State
    backing: str | None = None  # the backup its images are overlays on now
    size_on_disk: int | None = None  # bytes its folder's files take
    problem: str | None = None

    @property
    def stored(self) -> str:
        if self.state not in (State.COMPLETE, State.ON_DAMAGED):
            return "-"
        return f"on {self.backing}" if self.backing else "standalone"

    def as_json(self) -> dict[str, object]:
        return {
            **self.record.as_json(),
            **({"level": None} if self.record.unreadable else {}),  # a stand-in's is unknown
            "state": self.state.value,
            "stored": (
                None
                if self.state not in (State.COMPLETE, State.ON_DAMAGED)
                else "overlay"
                if self.backing
                else "standalone"
            ),
            "backing": self.backing,
            "size_on_disk": self.size_on_disk,
            "problem": self.problem,
        }


def listing(
    backups: list[BackupRecord],
    show_failed: bool,
    alive: Callable[[str], bool] = lambda _: True,
) -> list[Listed]:
    """`alive(domain_uuid)`: whether the process of the domain's running
    backup still runs (engine.locks.backup_owner_alive)."""
    out = []
    removing: dict[Path, frozenset[str]] = {}
    seen: dict[Path, Standing] = {}
    for b in backups:
        if b.status is BackupStatus.FAILED:
            if show_failed:
                out.append(Listed(b, State.FAILED))
            continue
        if b.status is BackupStatus.RUNNING or b.path is None:
            dead = b.status is BackupStatus.RUNNING and not alive(b.domain_uuid)
            out.append(Listed(b, State.INTERRUPTED if dead else State.RUNNING))
            continue
        folder = Path(b.path)
        domain_dir = folder.parent
        if domain_dir not in removing:
            try:
                removing[domain_dir] = Repository.of_domain(domain_dir).being_removed(
                    domain_dir.name
                )
            except VirtBackupError:
                removing[domain_dir] = frozenset()
        if b.id in removing[domain_dir]:
            out.append(Listed(b, State.PRUNING, size_on_disk=_size(folder)))
            continue
        s = standing(folder, seen)
        if s.manifest is None or s.problem is not None:
            out.append(Listed(b, State.DAMAGED, problem=s.why(), size_on_disk=_size(folder)))
        elif s.through is not None:
            out.append(
                Listed(b, State.ON_DAMAGED, s.manifest.parent, _size(folder), problem=s.why())
            )
        else:
            out.append(Listed(b, State.COMPLETE, s.manifest.parent, _size(folder)))
    return out


def _size(folder: Path) -> int | None:
    """Bytes allocated to the folder's files (sparse images count what
    they hold, not their virtual size)."""
    try:
        return sum(p.stat().st_blocks * 512 for p in folder.iterdir() if p.is_file())
    except OSError:
        return None


def line(x: Listed) -> str:
    b = x.record
    size = f"{x.size_on_disk / 2**20:,.1f} MiB" if x.size_on_disk is not None else "-"
    left_out = "; ".join(f"{d.disk} ({d.reason})" for d in b.left_out)
    level = "?" if b.unreadable else b.level.value  # a stand-in: its level is unknown
    return (
        f"{b.id}  {b.domain_name:16} {level:11} {x.state.value:10} {size:>12}  "
        f"{x.stored}"
        + (f"  left out: {left_out}" if left_out else "")
        + (f"  error: {b.error}" if b.error else "")
        + (f"  problem: {x.problem}" if x.problem else "")
    )
