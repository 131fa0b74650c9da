"""A folder make_folder changes (``reset``) is never reached through a
symbolic link, not even root's (hostile-tester finding: a root-owned link
at runtime_dir/jobs made its target 0711 before any trust check, and a
dir<->link swap loop every 30 ms changed the target's mode too). The
folder being reset is opened O_NOFOLLOW and a link there is refused
("is a symbolic link ...; it is not followed") before anything changes;
root's links *above* a configured folder (/var/run -> /run) are followed
as before. The refusal is an InputError (exit code 2 from the daemon and
the CLI). Real folders, real owners, the daemon's own functions."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtbackupd.adapters import host_folders
from virtbackupd.engine import scratch
from virtbackupd.engine.backup import make_job_folder
from virtbackupd.errors import InputError, UntrustedFolderError

QEMU = (65534, 65534)  # any non-root user stands for libvirt-qemu here
_LIBC = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


@pytest.fixture
def base() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="vb-reset-", dir="/var/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def victim(base: Path) -> Path:
    """Root's, 0750, one file: what a link leads to."""
    v = base / "victim"
    v.mkdir()
    v.chmod(0o750)
    (v / "keep").write_text("x")
    return v


def _untouched(victim: Path) -> None:
    st = victim.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o750)
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]


def test_a_root_link_at_the_jobs_folder_is_refused(base: Path, victim: Path) -> None:
    run = base / "run"
    run.mkdir(mode=0o711)
    (run / "jobs").symlink_to(victim)  # root's own link: still not followed
    with pytest.raises(UntrustedFolderError) as refused:
        make_job_folder(run / "jobs" / "j1", run, QEMU, qemu_passes=True)
    assert "jobs: is a symbolic link (owner uid 0)" in str(refused.value)
    assert "it is not followed" in str(refused.value)
    assert isinstance(refused.value, InputError)  # exit code 2
    _untouched(victim)


def test_a_root_link_at_scratch_dir_is_refused(base: Path, victim: Path) -> None:
    (base / "scratch").symlink_to(victim)
    with pytest.raises(UntrustedFolderError, match=r"scratch: is a symbolic link \(owner uid 0\)"):
        scratch.prepare(base / "scratch" / "j1", QEMU)
    _untouched(victim)


def test_a_root_link_above_a_reset_folder_is_still_followed(base: Path) -> None:
    """/var/run -> /run: a root link above the configured folder is fine."""
    real = base / "real"
    real.mkdir(mode=0o755)
    (base / "var-run").symlink_to(real)
    make_job_folder(
        base / "var-run" / "vb" / "jobs" / "j1", base / "var-run" / "vb", QEMU, qemu_passes=True
    )
    assert stat.S_IMODE((real / "vb" / "jobs").stat().st_mode) == 0o711
    assert (real / "vb" / "jobs" / "j1").stat().st_uid == QEMU[0]


def test_a_folder_swapped_with_a_link_never_changes_the_target(base: Path, victim: Path) -> None:
    """A thread swaps scratch_dir between a folder and a root link to the
    victim (seeded: VB_SWAP_SEED replays) while make_folder resets it, many
    times; whichever it meets, the victim keeps its mode and owner."""
    seed = int(os.environ.get("VB_SWAP_SEED", random.randrange(1 << 32)))
    print(f"VB_SWAP_SEED={seed}")
    rng = random.Random(seed)
    target, spare = base / "scratch", base / "spare"
    target.mkdir(mode=0o700)
    spare.symlink_to(victim)
    stop = threading.Event()
    delays = [rng.uniform(0, 0.002) for _ in range(1000)]

    def swap() -> None:
        i = 0
        while not stop.is_set():
            # renameat2(RENAME_EXCHANGE): scratch is a folder or a link at
            # every instant, never missing (make_folder would create it).
            if _LIBC.renameat2(_AT_FDCWD, bytes(target), _AT_FDCWD, bytes(spare), 2) != 0:
                raise OSError(ctypes.get_errno(), "renameat2")
            stop.wait(delays[i % len(delays)])
            i += 1

    swapper = threading.Thread(target=swap)
    swapper.start()
    refused = made = 0
    try:
        for _ in range(200):
            try:
                host_folders.make_folder(target, 0o711, parents_mode=0o711, reset=True)
                made += 1
            except UntrustedFolderError:
                refused += 1
            st = victim.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o750), f"seed {seed}"
    finally:
        stop.set()
        swapper.join()
    _untouched(victim)
    print(f"made {made}, refused {refused}")
    assert refused > 0 and made > 0, "the swap never met make_folder both ways"
