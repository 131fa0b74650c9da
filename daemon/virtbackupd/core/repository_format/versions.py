"""Each file's format name and version, and which versions each operation
accepts (as borg's manifest says, per operation, whether this version may
read, write, check or delete a repository). A newer virtbackupd that
changes the format bumps the version it writes and says here what older
versions it still reads, restores from, appends to and prunes."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path

from virtbackupd.core.repository_format.codec import RepositoryFormatError

BACKUP_FORMAT = "virtbackupd-backup"
FORMAT_VERSION = 2  # 2: <disk>.pieces beside every image
READABLE_VERSIONS = (1, 2)
V1_FORMAT = "virtbackupd-backup/1"  # format 1 wrote the version into the name

JOURNAL_FORMAT = "virtbackupd-prune-journal"
UNDO_FORMAT = "virtbackupd-undo"
ATTEMPT_FORMAT = "virtbackupd-attempt"
HOLD_FORMAT = "virtbackupd-hold"
IDENTITY_FORMAT = "virtbackupd-repository"
#: Every bookkeeping file (journal, undo log, attempt, hold, identity) is
#: at version 1 and reads nothing newer.
RECORD_VERSION = 1


class Operation(StrEnum):
    """What is done with a backup, for the compatibility check."""

    READ = "read"  # list, show, verify, reindex
    RESTORE = "restore"  # restore, mount, live restore
    APPEND = "append"  # take an incremental backup on top of it
    PRUNE = "prune"  # rewrite its manifest, merge or remove it


_VERBS = {
    Operation.READ: "read",
    Operation.RESTORE: "restore from",
    Operation.APPEND: "take incrementals on",
    Operation.PRUNE: "prune",
}

#: The manifest versions each operation accepts. Format 1 (no piece
#: files) is read and restored through a digest pass over its images;
#: prunes merge it the same way.
MANIFEST_VERSIONS: Mapping[Operation, frozenset[int]] = {
    Operation.READ: frozenset(READABLE_VERSIONS),
    Operation.RESTORE: frozenset(READABLE_VERSIONS),
    Operation.APPEND: frozenset(READABLE_VERSIONS),
    Operation.PRUNE: frozenset(READABLE_VERSIONS),
}


def check_manifest_version(
    path: Path,
    version: int,
    operation: Operation,
    accepted: Mapping[Operation, frozenset[int]] | None = None,
) -> None:
    """Raise RepositoryFormatError, naming the file, its version and what
    this virtbackupd accepts for `operation` (`accepted`, by default
    MANIFEST_VERSIONS), unless it accepts `version`."""
    allowed = (MANIFEST_VERSIONS if accepted is None else accepted)[operation]
    if version in allowed:
        return
    newest = max(allowed)
    if operation is Operation.READ and version > newest:
        raise RepositoryFormatError(
            path,
            f"written in repository format {version}, newer than this virtbackupd reads "
            f"(up to {newest}); upgrade virtbackupd to read it",
        )
    if operation is Operation.READ:
        raise RepositoryFormatError(path, f"unknown repository format {version}")
    formats = ", ".join(str(v) for v in sorted(allowed))
    raise RepositoryFormatError(
        path,
        f"written in repository format {version}; this virtbackupd can {_VERBS[operation]} "
        f"backups of format {formats} only"
        + ("; upgrade virtbackupd to do it" if version > newest else ""),
    )
