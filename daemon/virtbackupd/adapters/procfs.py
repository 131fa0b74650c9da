"""What /proc says about processes: who a pid is (its start time, so a
recycled pid is never taken for the process we recorded), its command
line, and which processes hold a file open.

A pid alone names a process only while it lives: the kernel hands the
number to the next process after it dies. A pid with the process's start
time (field 22 of /proc/PID/stat, clock ticks since boot) and the boot's
id names one process for ever, so a record of it can be checked long
after the recorder died.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_BOOT_ID = PROC / "sys/kernel/random/boot_id"


@dataclass(frozen=True)
class ProcessId:
    """One process for ever: a pid, its start time and the boot it ran in."""

    pid: int
    start: int  # clock ticks after boot (field 22 of /proc/PID/stat)
    boot: str

    def as_json(self) -> dict[str, int | str]:
        return {"pid": self.pid, "start": self.start, "boot": self.boot}


def parse_stat(text: str) -> tuple[str, int, int]:
    """(state, parent pid, start time) from the text of /proc/PID/stat.
    The command name (field 2) may hold spaces and parentheses: the fields
    after it start after its *last* closing parenthesis."""
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 20:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    # fields[0] is field 3 (state), so field N is fields[N - 3].
    return fields[0], int(fields[1]), int(fields[19])


def boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, int, int] | None:
    try:
        return parse_stat((PROC / str(pid) / "stat").read_text(errors="replace"))
    except (OSError, ValueError):
        return None


def identify(pid: int) -> ProcessId | None:
    """The process `pid` names now, None when there is none."""
    stat = _stat(pid)
    return None if stat is None else ProcessId(pid, stat[2], boot_id())


def me() -> ProcessId:
    ident = identify(os.getpid())
    if ident is None:  # pragma: no cover - /proc is not mounted
        return ProcessId(os.getpid(), 0, "")
    return ident


def running(ident: ProcessId) -> bool:
    """Is the process `ident` names still there (not a zombie, not a
    newer process that got its pid)?"""
    stat = _stat(ident.pid)
    return (
        stat is not None
        and stat[0] not in ("Z", "X")
        and stat[2] == ident.start
        and ident.boot == boot_id()
    )


def parent_of(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def cmdline(pid: int) -> list[str]:
    """The arguments `pid` was started with ([] for none, a zombie, or a
    process that is gone)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


@dataclass(frozen=True)
class Holder:
    pid: int
    argv: tuple[str, ...]

    def __str__(self) -> str:
        command = " ".join(self.argv)
        if len(command) > 200:
            command = command[:197] + "..."
        return f"process {self.pid} ({command or 'no command line'})"


def holders(path: Path) -> list[Holder]:
    """The processes with `path` open, found through /proc/*/fd (only
    those this process may inspect: all of them as root)."""
    try:
        target = os.path.realpath(path)
    except OSError:
        return []
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:
                if str(fd.readlink()) == target:
                    found.append(Holder(int(entry.name), tuple(cmdline(int(entry.name)))))
                    break
            except OSError:
                continue
    return sorted(found, key=lambda h: h.pid)


# qemu's lock failures end with: Is another process using the image [PATH]?
_LOCKED_IMAGE = re.compile(
    r'Failed to get .*"\w+" lock.*?Is another process using the image \[(.+?)\]\?', re.S
)


def name_lock_holders(message: str) -> str:
    """`message` of a failed qemu-img/qemu-nbd, with the processes that
    hold the image it could not lock named at the end (one line)."""
    found = _LOCKED_IMAGE.search(message)
    if found is None:
        return message
    image = Path(found.group(1))
    who = holders(image)
    if not who:
        return message
    return f"{message} (held by {'; '.join(map(str, who))})"
