"""``<runtime_dir>/daemon.json``: what the running daemon does, for
`virtbackup status`. Written atomically by the daemon on every change,
read by the CLI; a typed value on both sides, through the repository
format's codec (core.repository_format.codec), its version checked where
it is read."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtbackupd.adapters import host_folders
from virtbackupd.core.repository_format.codec import Fields, FormatError, decode_json, json_text

STATUS_FILE = "daemon.json"
#: Linux's largest process id (PID_MAX_LIMIT): a larger one is no daemon's.
PID_MAX = 4 * 1024 * 1024
FORMAT = 1  # the version written; a file without it was written as version 1
#: A daemon.json is a few KiB per hundred domains.
MAX_STATUS_BYTES = 16 * 1024 * 1024


class StatusFileError(FormatError):
    """A daemon.json this virtbackup cannot read: damaged, or written by a
    newer daemon."""


@dataclass(frozen=True)
class DomainState:
    name: str
    policy: str | None  # the governing policy file; None: unmanaged
    next_runs: dict[str, str] = field(default_factory=dict)  # level -> ISO time
    queued: str | None = None  # level waiting in the queue
    retrying: str | None = None  # why a busy request waits to be retried
    last_failure: tuple[str, str] | None = None  # (ISO time, reason) of an attempt


@dataclass(frozen=True)
class EnforcedFile:
    """A policy file as the daemon read it when it adopted its policies:
    the SHA-256 of its bytes, and whether it loaded (a file rejected at
    start is part of the adopted set: the domains it names are skipped)."""

    sha256: str
    loaded: bool


@dataclass(frozen=True)
class DaemonStatus:
    pid: int
    started: str
    libvirt_uri: str
    libvirt_connected: bool
    domains: dict[str, DomainState]  # uuid -> state
    running: tuple[str, ...] = ()  # uuids
    # The zone the schedules are read in (docs/configuration.md); next
    # runs are ISO times with that zone's offset.
    schedule_timezone: str = "UTC"
    # The policy files behind the policies the daemon enforces (path ->
    # what it read), for `status` to flag files changed on disk since.
    # None: a daemon older than this field, which did not say.
    policy_files: dict[str, EnforcedFile] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "pid": self.pid,
            "started": self.started,
            "libvirt_uri": self.libvirt_uri,
            "libvirt_connected": self.libvirt_connected,
            "running": list(self.running),
            "schedule_timezone": self.schedule_timezone,
            "domains": {
                uuid: {
                    "name": d.name,
                    "policy": d.policy,
                    "next_runs": d.next_runs,
                    "queued": d.queued,
                    "retrying": d.retrying,
                    "last_failure": list(d.last_failure) if d.last_failure else None,
                }
                for uuid, d in self.domains.items()
            },
            "policy_files": None
            if self.policy_files is None
            else {
                path: {"sha256": f.sha256, "loaded": f.loaded}
                for path, f in self.policy_files.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path = Path(STATUS_FILE)) -> DaemonStatus:
        """Every field checked as it is read (the file is only root's, but a
        damaged or hand-made one must be "not known", never a traceback)."""
        f = Fields(data, path, error=StatusFileError)
        pid = f.integer("pid")
        files = None if f.data.get("policy_files") is None else f.sub("policy_files")
        return cls(
            pid=pid,
            started=f.text("started"),
            libvirt_uri=f.text("libvirt_uri"),
            libvirt_connected=f.opt_bool("libvirt_connected") is True,
            running=tuple(f.texts("running")),
            schedule_timezone=f.opt_text("schedule_timezone") or "UTC",
            domains={uuid: _domain(d) for uuid, d in _entries(f.sub("domains", {}))},
            policy_files=None
            if files is None
            else {
                name: EnforcedFile(e.text("sha256"), e.opt_bool("loaded") is True)
                for name, e in _entries(files)
            },
        )


def _entries(f: Fields) -> list[tuple[str, Fields]]:
    return [(name, f.sub(name)) for name in f.names()]


def _domain(d: Fields) -> DomainState:
    runs = d.sub("next_runs", {})
    failure = d.texts("last_failure") if d.data.get("last_failure") else []
    if failure and len(failure) != 2:
        raise d.error("last_failure", "is not a pair of a time and a reason")
    return DomainState(
        name=d.text("name"),
        policy=d.opt_text("policy"),
        next_runs={level: runs.text(level) for level in runs.names()},
        queued=d.opt_text("queued"),
        retrying=d.opt_text("retrying"),
        last_failure=(failure[0], failure[1]) if failure else None,
    )


def write_status(runtime_dir: Path, status: DaemonStatus) -> None:
    path = runtime_dir / STATUS_FILE
    host_folders.make_passable(runtime_dir)  # QEMU passes through it to job folders
    tmp = path.with_suffix(".tmp")
    # 0600: it names every domain, policy and failure reason.
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json_text(status.as_json()))
    tmp.replace(path)


def remove_status(runtime_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (runtime_dir / STATUS_FILE).unlink()


def read_status(runtime_dir: Path) -> DaemonStatus | None:
    """The running daemon's state; None when no daemon runs (no file, or
    one left by a daemon that is gone) or its file cannot be read."""
    return probe_status(runtime_dir)[0]


def probe_status(runtime_dir: Path) -> tuple[DaemonStatus | None, str | None]:
    """The running daemon's state, or None and why it cannot be known:
    (None, None) is "no daemon runs" (no file, or one left by a dead
    process); (None, why) a status file that exists and cannot be read,
    so whether a daemon runs is not known."""
    path = runtime_dir / STATUS_FILE
    try:
        with path.open("rb") as f:
            data = f.read(MAX_STATUS_BYTES + 1)
        status = decode_status(path, data)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{path}: {exc.strerror or exc}"
    except StatusFileError as exc:
        return None, str(exc)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"{path}: not a status file this version reads ({exc!r})"
    if not 1 <= status.pid <= PID_MAX:
        # No process has it: os.kill would signal a group (0, -1) or overflow.
        return None, None
    try:
        os.kill(status.pid, 0)
    except ProcessLookupError:
        return None, None
    except OSError:
        pass  # it exists (EPERM): a daemon runs
    return status, None


def decode_status(path: Path, data: bytes) -> DaemonStatus:
    """The bytes of a status file: JSON through the codec, its version
    checked (StatusFileError names the file, the version and the one this
    virtbackup reads), then the fields."""
    if len(data) > MAX_STATUS_BYTES:
        raise StatusFileError(path, f"is larger than {MAX_STATUS_BYTES} bytes")
    raw = decode_json(path, data, error=StatusFileError)
    version = Fields(raw, path, error=StatusFileError).integer("format", default=FORMAT)
    if version > FORMAT:
        raise StatusFileError(
            path,
            f"written in status file format {version}, newer than this virtbackup reads "
            f"(up to {FORMAT}); run the virtbackup of the daemon's version",
        )
    if version < 1:
        raise StatusFileError(path, f"unknown status file format {version}")
    assert isinstance(raw, dict)  # Fields checked it
    return DaemonStatus.from_json(raw, path)
