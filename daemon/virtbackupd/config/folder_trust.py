"""Whether root may trust a folder the configuration names: judged when
the config or a policy is loaded, as config/yamlnodes.py judges the file
itself. This reads the host's folders (lstat, stat) and changes nothing;
adapters/host_folders.py makes them, with the same judgement.

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
        problem = folder_problem(part, st)
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
        problem = folder_problem(part, st)
        if problem is not None:
            return problem
    return None


def folder_problem(part: Path, st: os.stat_result) -> str | None:
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


# Kernel pseudo file systems: no backup or image belongs there, and writing
# one could do harm (/proc/sys, /sys/... are the kernel's switches).
PSEUDO = (Path("/proc"), Path("/sys"), Path("/dev"))


def on_pseudo_fs(path: Path) -> bool:
    real = path.resolve()
    return any(real == p or real.is_relative_to(p) for p in PSEUDO)
