"""The project's error hierarchy: each class a contract.

Every error an operator can see derives from :class:`VirtBackupError`. Its
class says what went wrong and decides the exit code (``exit_code``, as
borg's error classes do); the instance carries its context (domain,
backup id, disk, path, libvirt error code: ``context``), which the daemon
logs as journal fields. Adapters translate foreign exceptions into these
(``raise ... from exc``); only the CLI and the daemon turn them into exit
codes and log lines (``logs.exit_status``, ``logs.failure``).

A bug in virtbackupd itself (an illegal state move, a broken invariant) is
an :class:`InternalError`, deliberately *not* a VirtBackupError: no
``except VirtBackupError`` takes it for an operator's error and shows it as
one line; it is logged with its traceback and a request to report it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar


class VirtBackupError(Exception):
    """Root of every error virtbackupd raises on purpose (an operator's to
    act on). Context fields left out stay None; a subclass may also set
    one itself (``self.path = path``): ``context`` reads the attributes."""

    #: The exit code of a command this error ends: 1, an operation failed.
    exit_code: ClassVar[int] = 1

    domain: str | None = None
    backup_id: str | None = None
    disk: str | None = None
    path: Path | str | None = None
    libvirt_code: int | None = None

    def __init__(
        self,
        message: str = "",
        *,
        domain: str | None = None,
        backup_id: str | None = None,
        disk: str | None = None,
        path: Path | str | None = None,
        libvirt_code: int | None = None,
    ) -> None:
        super().__init__(message)
        # Only what is given: a subclass may have set a field before.
        given = {
            "domain": domain,
            "backup_id": backup_id,
            "disk": disk,
            "path": path,
            "libvirt_code": libvirt_code,
        }
        for name, value in given.items():
            if value is not None:
                setattr(self, name, value)

    @property
    def context(self) -> dict[str, str | int]:
        """The context fields that are set, as log keys (journal fields
        DOMAIN, BACKUP_ID, DISK, PATH, LIBVIRT_CODE); a path as text."""
        fields: dict[str, str | int] = {}
        for name in CONTEXT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                fields[name] = value if isinstance(value, int | str) else str(value)
        return fields


#: The context every VirtBackupError may carry, in log order.
CONTEXT_FIELDS = ("domain", "backup_id", "disk", "path", "libvirt_code")


class InternalError(Exception):
    """A bug in virtbackupd: an invariant broke. Not an operator's error
    (not a VirtBackupError): logged with its traceback and a line asking
    for a report; a command it ends exits 1."""

    exit_code: ClassVar[int] = 1


#: What follows a bug's traceback (CLI, daemon).
REPORT_BUG = "this is a bug in virtbackupd: please report it with the traceback above"


class InputError(VirtBackupError):
    """The operator asked for something malformed or that does not exist
    (an unknown domain, backup id, disk, or a bad time): exit code 2."""

    exit_code: ClassVar[int] = 2


class ConfigError(InputError):
    """A configuration or policy file is invalid. ``path`` names the file
    and ``line`` its line (1-based) when the problem has one: a file's
    problems are reported in line order."""

    line: int | None = None

    def __init__(
        self, message: str, *, path: Path | str | None = None, line: int | None = None
    ) -> None:
        super().__init__(message, path=path)
        self.line = line


class XMLError(VirtBackupError):
    """A libvirt XML document is malformed or does not fit the model.

    ``document`` names what was being read (a file, or "checkpoint XML of
    domain web01"), so the message says where to look.
    """

    def __init__(self, document: str, problem: str) -> None:
        super().__init__(f"{document}: {problem}")
        self.document = document
        self.problem = problem


class DefinitionMismatchError(XMLError, InputError):
    """A saved definition does not fit the restore asked for (it has no
    disk the backup restores): refused before anything is written, exit 2."""


class PlanError(VirtBackupError):
    """A backup cannot be planned as asked (no eligible disk, unknown disk, ...)."""


class NbdError(VirtBackupError):
    """Talking NBD failed. ``export`` names the server side (socket/URI)."""


class NbdConnectionError(NbdError):
    """The server could not be reached, refused the handshake, or went away."""


class NbdProtocolError(NbdError):
    """The server broke the NBD protocol; the connection was dropped and no
    byte of the reply that broke it was used."""


class NbdTimeoutError(NbdError):
    """The server stopped answering while requests were outstanding."""


class NbdServerError(NbdError):
    """The server answered a request with an error.

    ``error`` is the NBD error name (EIO, ENOSPC, ...), ``request`` the
    request it answered ("READ 4194304+1048576").
    """

    def __init__(self, export: str, request: str, error: str, message: str = "") -> None:
        detail = f": {message}" if message else ""
        super().__init__(f"{export}: {request} failed with {error}{detail}")
        self.export = export
        self.request = request
        self.error = error
        self.message = message


class ProcessError(VirtBackupError):
    """A helper process (qemu-img, qemu-nbd) failed; the message keeps its stderr."""

    def __init__(self, command: str, message: str) -> None:
        super().__init__(f"{command}: {message}")
        self.command = command
        self.message = message


class LibvirtError(VirtBackupError):
    """A libvirt call failed; ``code`` is libvirt's error code (0: none,
    the error is ours, such as a job that did not end in time)."""

    def __init__(self, message: str, code: int = 0, *, domain: str | None = None) -> None:
        super().__init__(message, domain=domain, libvirt_code=code or None)

    @property
    def code(self) -> int:
        return self.libvirt_code or 0


class LibvirtTimeoutError(LibvirtError):
    """libvirt did not answer a call within its bound (a hung libvirtd, a
    dead peer the keepalive has not caught yet); ``call`` names it."""

    def __init__(self, message: str, call: str, domain: str | None = None) -> None:
        super().__init__(message, domain=domain)
        self.call = call


class DomainNotFoundError(LibvirtError, InputError):
    """No domain with that name or UUID."""


class CheckpointInconsistentError(LibvirtError):
    """libvirt refused a checkpoint whose bitmaps are missing or broken
    (QEMU crashed, image edited): the next backup must be full."""


class BackupBusyError(VirtBackupError):
    """Another backup of the domain runs (ours, from another process, or
    another tool's libvirt job)."""


class DomainStartingError(BackupBusyError):
    """The domain is being started: an offline backup yields its images to
    QEMU (refused before it begins, or cancelled and cleaned up while it
    runs). Retried like any busy domain, then taken online."""


class DaemonRunningError(VirtBackupError):
    """Another virtbackupd runs on this config (it holds the daemon lock):
    exit code 2, before anything is touched. ``pid`` is None when that
    process has taken the lock and not yet written its pid."""

    exit_code: ClassVar[int] = 2

    def __init__(self, lock: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "a process just starting"
        super().__init__(
            f"another virtbackupd runs on this config ({who}, holding {lock}); "
            "one daemon per config: stop that one first (`systemctl stop virtbackupd`)",
            path=lock,
        )
        self.lock = lock
        self.pid = pid


class DaemonLockFileError(InputError):
    """``<runtime_dir>/daemon.lock`` is not a regular file (a symbolic
    link, a FIFO, a folder) or cannot be opened: the daemon does not start
    (exit code 2) and changes nothing there."""

    def __init__(self, lock: Path, problem: str) -> None:
        super().__init__(
            f"{lock}: {problem}; the daemon lock must be a regular file (or absent): "
            "remove it and start the daemon again",
            path=lock,
        )
        self.lock = lock


class ScratchSpaceError(VirtBackupError):
    """The scratch file system of an online backup cannot hold the disks'
    reservation, or is out of QEMU's reach: the backup is refused before it
    begins, never the guest's writes."""


class BackupFailedError(VirtBackupError):
    """A backup failed; it was recorded as failed and cleaned up.
    `backup_id`: the attempt's, once it had one (its outcome line, with
    the id, is then already logged)."""

    def __init__(
        self, message: str, backup_id: str | None = None, *, domain: str | None = None
    ) -> None:
        super().__init__(message, backup_id=backup_id, domain=domain)


class RestoreError(VirtBackupError):
    """A restore cannot be done as asked, or its result failed the check;
    nothing was left half-written."""


class DefineRefusedError(RestoreError):
    """libvirt refused a restored domain's definition, after the copy
    (libvirt's own checks cannot be asked before): the caller takes back
    what the restore wrote."""


class UnknownRestorePointError(RestoreError, InputError):
    """The backup, time or disk asked for does not exist."""


class PruneError(VirtBackupError):
    """Pruning or merging backups failed; a rerun finishes what was begun."""


def first_cause(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, so that a
    failure in one of several parallel tasks reads as that failure."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


class ImageWriteError(VirtBackupError):
    """Writing a backup image failed: the file system refused (no space,
    I/O error) or a write the image cannot take; the backup fails."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}", path=path)


class UntrustedFolderError(InputError):
    """A folder root is about to write into, or one on its way, is a
    symbolic link root does not own, is not root's, or is writable by
    others: another user could redirect root's writes. Nothing was made
    inside it."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}", path=path)
