"""The host folders virtbackupd (running as root) makes and writes into:
created one component at a time, never through a link root does not own,
and (where configured) only below folders that config/folder_trust.py
judges trusted.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from virtbackupd.config.folder_trust import folder_problem
from virtbackupd.config.folder_trust import on_pseudo_fs as on_pseudo_fs  # restore --to uses it
from virtbackupd.errors import UntrustedFolderError


# PLR0913: the folder's and its parents' mode and owner, then switches: keyword-only, with defaults
def make_folder(  # noqa: PLR0913 (see above)
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
    folders are, see config/folder_trust.py); off for a folder an
    operator names on the command line (``restore --to``), where only
    links are judged.

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
                problem = folder_problem(here, os.fstat(fd))
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
    and root owns it (/var/run -> /run), as config/folder_trust.py judges a configured
    folder."""
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
