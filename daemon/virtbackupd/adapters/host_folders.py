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

import errno
import os
import stat
from pathlib import Path

from virtbackupd.errors import UntrustedFolderError


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


def make_folder(
    path: Path,
    mode: int = 0o700,
    owner: tuple[int, int] | None = None,
    *,
    parents_mode: int = 0o700,
    exist_ok: bool = True,
    reset: bool = False,
    trusted: bool = True,
) -> None:
    """Create `path` and each folder missing above it, never following a
    symbolic link that root does not own: the walk opens one component at
    a time (O_NOFOLLOW, relative to the folder above), so a link planted
    where a folder is about to be made is refused, not followed, and what
    it points to is left alone. A created folder gets `mode` (the missing
    ones above: `parents_mode`) whatever the umask, and `owner` (uid, gid)
    when given, both set through its descriptor. An existing `path` keeps
    its mode and owner unless `reset`. `trusted`: every existing folder
    on the way must be root's and writable only by root (as the configured
    folders are, see :func:`untrusted_part`); off for a folder an operator
    names on the command line (``restore --to``), where only links are
    judged.

    Raises UntrustedFolderError naming the component that is refused
    (FileExistsError when `path` exists and not `exist_ok`)."""
    path = path.absolute()
    names = path.parts[1:]
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(names):
            last = i == len(names) - 1
            here = Path("/", *names[: i + 1])
            want = mode if last else parents_mode
            created = True
            try:
                os.mkdir(name, want, dir_fd=fd)
            except FileExistsError:
                if last and not exist_ok:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise UntrustedFolderError(here, _LINK.format(uid=st.st_uid)) from None
                    raise FileExistsError(errno.EEXIST, "File exists", str(here)) from None
                created = False
            except OSError as exc:  # named by its whole path, as mkdir by path would
                raise OSError(exc.errno, exc.strerror, str(here)) from exc
            # A folder this walk changes (made now, or `reset`) is opened
            # without following a link: a link there, even root's, would
            # have root chmod/chown whatever it points to (a link at
            # runtime_dir/jobs made its target 0711). Root's links above
            # (/var/run -> /run) are followed as untrusted_part allows.
            changes = created or (last and reset)
            try:
                nfd = _open_step(fd, name, here, may_follow=not changes)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(here)) from exc
            os.close(fd)
            fd = nfd
            if changes:
                if owner is not None:
                    os.fchown(fd, *owner)
                os.fchmod(fd, want)
            elif trusted:
                problem = _folder_problem(here, os.fstat(fd))
                if problem is not None:
                    why = problem.removeprefix(f"{here} ")
                    raise UntrustedFolderError(here, f"{why}, so root does not use it; {_REMEDY}")
    finally:
        os.close(fd)


_REMEDY = (
    "a folder root writes into must be root's and writable only by root "
    "(chown root, chmod go-w), all the way up"
)


_LINK = (
    "is a symbolic link (owner uid {uid}) where root makes or uses a folder; "
    "it is not followed: remove it"
)


def _open_step(parent: int, name: str, here: Path, *, may_follow: bool) -> int:
    """Open folder `name` in `parent`; a symbolic link there is followed
    only where `may_follow` (this walk neither made it nor changes it)
    and root owns it (/var/run -> /run), as :func:`untrusted_part` judges
    a configured folder."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            raise UntrustedFolderError(here, "is not a folder") from exc
        if not may_follow or st.st_uid != 0:
            raise UntrustedFolderError(here, _LINK.format(uid=st.st_uid)) from exc
    return os.open(name, flags, dir_fd=parent)


def set_owner(path: Path, owner: tuple[int, int] | None = None, mode: int | None = None) -> None:
    """chown/chmod `path` through a descriptor of the file itself: a
    symbolic link put in its place is refused, never followed (chown by
    path would hand the link's target to QEMU's user).

    The descriptor is an O_PATH one, changed through its /proc/self/fd
    name: closing an ordinary descriptor of a file drops every fcntl lock
    this process holds on it, and SQLite's lock on state.db is one (with it
    gone, another process closing its connection deletes the WAL under
    ours). The kernel drops no lock when an O_PATH descriptor closes."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise UntrustedFolderError(path, "is a symbolic link; it is not followed: remove it")
        # The magic link names the file the descriptor holds, whatever
        # replaced `path` meanwhile.
        name = Path(f"/proc/self/fd/{fd}")
        if owner is not None:
            os.chown(name, *owner)
        if mode is not None:
            name.chmod(mode)
    finally:
        os.close(fd)


def make_passable(folder: Path, *, trusted: bool = True) -> None:
    """Create `folder` (and what is missing above it) as root's, 0711
    whatever the umask: QEMU, running as its own user, passes through to
    the job folders below without listing them. (The unit's UMask=0077, or
    an operator's, would make new folders 0700 and the first online backup
    fail inside libvirt.) An existing folder keeps its mode. A state_dir
    created here because it holds the scratch_dir (the default) is thus
    0711 too: passable, not readable."""
    make_folder(folder, 0o711, parents_mode=0o711, trusted=trusted)


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
