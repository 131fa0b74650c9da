"""The host folders virtbackupd (running as root) writes into, checked
before it trusts them.

Root following a path through a folder that another user controls would
let that user redirect root's writes (a symbolic link planted where a job
folder, a lock or a status file is about to be made) or read what root
writes there. So a configured folder and every folder above it must be
owned by root (or by the user we run as) and writable by nobody else; a
world-writable folder passes only with its sticky bit, owned by root (as
/tmp and /var/tmp are: no one can replace another's entry in it), and a
symbolic link on the way only when root owns it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def _describe(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def untrusted_part(path: Path) -> str | None:
    """Why `path` (which need not exist yet) cannot be trusted, naming the
    folder on its way that is the problem; None when it can."""
    path = path.absolute()  # not resolve(): each link on the way is judged itself
    # The existing part of the path, each component as written (a link is
    # judged by its own owner) ...
    for part in [*reversed(path.parents), path]:
        try:
            st = part.lstat()
        except FileNotFoundError:
            break  # what does not exist yet, root will create, as its own
        except OSError as exc:
            return f"{part}: cannot be examined ({exc.strerror})"
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != 0:
                return f"{part} is a symbolic link owned by uid {st.st_uid}, not by root"
            continue
        problem = _folder_problem(part, st)
        if problem is not None:
            return problem
    # ... and the folders the links lead through.
    real = path.resolve()
    for part in [*reversed(real.parents), real]:
        try:
            st = part.stat()
        except FileNotFoundError:
            break
        except OSError as exc:
            return f"{part}: cannot be examined ({exc.strerror})"
        problem = _folder_problem(part, st)
        if problem is not None:
            return problem
    return None


def _folder_problem(part: Path, st: os.stat_result) -> str | None:
    if not stat.S_ISDIR(st.st_mode):
        return None  # the last component may be a file; a non-folder above fails later, clearly
    if not _owner_ok(st):
        return f"{part} is not root's ({_describe(st)})"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        sticky_root = mode & stat.S_ISVTX and st.st_uid == 0 and mode & 0o002
        if not sticky_root:
            return f"{part} is writable by others than root ({_describe(st)})"
    return None


def check_trusted(folders: dict[str, Path], source: Path) -> list[str]:
    """A problem line for each configured folder (key -> path) that is not
    trusted, naming the config file and key."""
    problems = []
    for key, folder in folders.items():
        why = untrusted_part(folder)
        if why is not None:
            problems.append(
                f"{source}: {key}: {folder} is not used: {why}; a folder root writes into "
                "must be root's and writable only by root (chown root, chmod go-w), "
                "all the way up"
            )
    return problems


def make_passable(folder: Path) -> None:
    """Create `folder` (and what is missing above it) as root's, 0711
    whatever the umask: QEMU, running as its own user, passes through to
    the job folders below without listing them. (The unit's UMask=0077, or
    an operator's, would make new folders 0700 and the first online backup
    fail inside libvirt.) An existing folder keeps its mode."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    for part in reversed(missing):
        try:
            part.mkdir(mode=0o711)
        except FileExistsError:
            continue  # made meanwhile by another command: its mode stands
        part.chmod(0o711)


def unpassable(folder: Path) -> Path | None:
    """The first folder from / down to `folder` that a user other than
    root cannot pass through (no o+x), None if there is none."""
    for part in [*reversed(folder.parents), folder]:
        if not part.stat().st_mode & 0o001:
            return part
    return None


# Kernel pseudo file systems: no backup or image belongs there, and writing
# one could do harm (/proc/sys, /sys/... are the kernel's switches).
PSEUDO = (Path("/proc"), Path("/sys"), Path("/dev"))


def on_pseudo_fs(path: Path) -> bool:
    real = path.resolve()
    return any(real == p or real.is_relative_to(p) for p in PSEUDO)
