"""The undo log of a running backup: what a failure must take back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from virtbackupd.core.policy import Level
from virtbackupd.core.repository_format.codec import Fields, RepositoryFormatError
from virtbackupd.core.repository_format.names import MAX_NAME_CHARS
from virtbackupd.core.repository_format.versions import RECORD_VERSION, UNDO_FORMAT


class UndoKind(StrEnum):
    """What a backup did that a failure must take back (last first)."""

    PARTIAL = "partial"  # the <id>.partial folder
    JOB_DIR = "job_dir"  # a runtime folder (NBD sockets) or scratch folder
    LIBVIRT_JOB = "libvirt_job"  # a pull-mode job whose NBD socket is `path`
    CHECKPOINT = "checkpoint"  # a libvirt checkpoint named `name`
    BITMAP = "bitmap"  # a bitmap `name` added to the image `path` (offline)


@dataclass(frozen=True)
class UndoStep:
    kind: UndoKind
    path: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class UndoLog:
    """Written before each step it lists is taken, fsynced: whoever finds
    it (the job on failure, or the next job after this process died) takes
    the steps back in reverse order. Dropped once the backup committed."""

    backup_id: str
    domain_name: str
    domain_uuid: str
    level: Level
    started: datetime
    steps: tuple[UndoStep, ...] = ()
    parent: str | None = None  # the backup it was to build on

    def to_json(self) -> dict[str, object]:
        return {
            "format": UNDO_FORMAT,
            "format_version": RECORD_VERSION,
            "backup_id": self.backup_id,
            "domain": {"name": self.domain_name, "uuid": self.domain_uuid},
            "level": self.level.value,
            "parent": self.parent,
            "started": self.started.isoformat(),
            "steps": [
                {
                    k: v
                    for k, v in (("do", s.kind.value), ("path", s.path), ("name", s.name))
                    if v is not None
                }
                for s in self.steps
            ],
        }

    @classmethod
    def from_json(cls, data: object, path: Path, domain_dir: Path) -> UndoLog:
        """`domain_dir`: the domain's folder, the only place its backup's
        partial folder may be."""
        f = Fields(data, path)
        if f.integer("format_version") > RECORD_VERSION:
            raise RepositoryFormatError(path, "undo log format is newer than this version reads")
        domain = f.sub("domain")
        backup_id = f.backup_id("backup_id")
        steps = tuple(
            UndoStep(s.enum("do", UndoKind), s.opt_text("path"), s.opt_text("name"))
            for s in f.items("steps")
        )
        for i, step in enumerate(steps):
            _check_folder_step(f, i, step, backup_id, domain_dir)
        return cls(
            backup_id=backup_id,
            domain_name=domain.line("name", MAX_NAME_CHARS),
            domain_uuid=domain.uuid("uuid"),
            level=f.enum("level", Level),
            started=f.time("started"),
            steps=steps,
            parent=f.opt_backup_id("parent"),
        )


def _check_folder_step(f: Fields, i: int, step: UndoStep, backup_id: str, domain_dir: Path) -> None:
    # Taking these back deletes the folder, as root: only the backup's own
    # partial and job folders, named by its id, ever.
    wanted = {UndoKind.PARTIAL: f"{backup_id}.partial", UndoKind.JOB_DIR: backup_id}
    name = wanted.get(step.kind)
    if name is None:
        return
    where = Path(step.path or "")
    beside = where.parent == domain_dir or step.kind is not UndoKind.PARTIAL
    if not where.is_absolute() or ".." in where.parts or where.name != name or not beside:
        raise f.error(
            f"steps[{i}].path",
            f"{str(step.path)[:80]!r} is not this backup's own {step.kind.value} folder "
            f"(an absolute path ending in {name})",
        )
