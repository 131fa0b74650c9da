"""Folders and files root makes are made without following a symbolic link
and owned through a descriptor (issue 23, "only root's own folders are
trusted"; issue 24, item 1). A link an unprivileged user planted where a
job folder, a scratch folder or a folder above backup_root is about to be
made is refused, naming it, and what it points to keeps its owner, mode
and contents. Real folders, real owners, the daemon's own functions."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtbackupd.adapters import host_folders
from virtbackupd.adapters.repository import Repository
from virtbackupd.engine import scratch
from virtbackupd.engine.backup import make_job_folder
from virtbackupd.engine.locks import domain_lock
from virtbackupd.errors import UntrustedFolderError

NOBODY = 65534
QEMU = (NOBODY, NOBODY)  # any non-root user stands for libvirt-qemu here


@pytest.fixture
def base() -> Iterator[Path]:
    """A root folder 0755 in /var/tmp: trusted and passable all the way up
    (pytest's basetemp is 0700, which QEMU's user could not pass)."""
    folder = Path(tempfile.mkdtemp(prefix="vb-folders-", dir="/var/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def victim(base: Path) -> Path:
    """What a planted link points to: root's, 0755, one file."""
    v = base / "victim"
    v.mkdir(mode=0o755)
    v.chmod(0o755)
    (v / "keep").write_text("x")
    return v


def _plant(link: Path, target: Path) -> None:
    """A link as an unprivileged user would leave it (owned by them)."""
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)


def _untouched(victim: Path) -> None:
    st = victim.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_link_planted_for_the_jobs_folder_is_refused(base: Path, victim: Path) -> None:
    """The jobs folder was made with mkdir(exist_ok) and chmod by path:
    root chmodded the link's target 0711 and made a QEMU-owned job folder
    in it."""
    run = base / "run"
    run.mkdir(mode=0o711)
    _plant(run / "jobs", victim)
    with pytest.raises(UntrustedFolderError, match=r"/run/jobs: is a symbolic link \(owner uid"):
        make_job_folder(run / "jobs" / "j1", run, QEMU, qemu_passes=True)
    _untouched(victim)


def test_a_link_planted_at_the_job_folder_itself_is_refused(base: Path, victim: Path) -> None:
    run = base / "run"
    (run / "jobs").mkdir(parents=True)
    _plant(run / "jobs" / "j1", victim)
    with pytest.raises(UntrustedFolderError, match="j1: is a symbolic link"):
        make_job_folder(run / "jobs" / "j1", run, QEMU, qemu_passes=True)
    _untouched(victim)


def test_a_job_folder_is_qemus_and_its_parent_passable(base: Path, umask022: None) -> None:
    run = base / "run"
    make_job_folder(run / "jobs" / "j1", run, QEMU, qemu_passes=True)
    st = (run / "jobs" / "j1").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*QEMU, 0o700)
    assert stat.S_IMODE((run / "jobs").stat().st_mode) == 0o711
    assert stat.S_IMODE(run.stat().st_mode) == 0o711


def test_a_link_planted_as_the_scratch_folder_is_refused(base: Path, victim: Path) -> None:
    """scratch.prepare chmodded scratch_dir by path (0711) and chowned the
    job's scratch folder by path: a link in scratch_dir's place handed its
    target's new folder to QEMU's user."""
    _plant(base / "scratch", victim)
    with pytest.raises(UntrustedFolderError, match="scratch: is a symbolic link"):
        scratch.prepare(base / "scratch" / "j1", QEMU)
    _untouched(victim)
    (base / "scratch").unlink()
    (base / "scratch").mkdir()
    _plant(base / "scratch" / "j1", victim)
    with pytest.raises(UntrustedFolderError, match="j1: is a symbolic link"):
        scratch.prepare(base / "scratch" / "j1", QEMU)
    _untouched(victim)


def test_a_link_planted_above_backup_root_is_refused(base: Path, victim: Path) -> None:
    """backup_root's missing parents were made by mkdir(parents=True),
    which follows a link: root made its backups inside the link's target."""
    _plant(base / "srv", victim)
    repo = Repository(base / "srv" / "vb" / "backups")
    with pytest.raises(UntrustedFolderError, match="srv: is a symbolic link"):
        repo.create_partial("u1", "b1")
    _untouched(victim)


def test_a_foreign_folder_above_backup_root_is_refused(base: Path) -> None:
    theirs = base / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UntrustedFolderError, match=r"theirs: is not root's \(owner uid 65534"):
        Repository(theirs / "backups").create_partial("u1", "b1")
    assert list(theirs.iterdir()) == []


def test_created_parents_are_0700_whatever_the_umask(base: Path, umask022: None) -> None:
    """A created backup_root's missing parents were 0755 (the umask's):
    every user could list the domains' folders (hostile tester, #8)."""
    root = base / "a" / "b" / "backups"
    Repository(root).create_partial("u1", "b1")
    for folder in (base / "a", base / "a" / "b", root, root / "u1", root / "u1" / "b1.partial"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_a_link_planted_for_the_locks_folder_is_refused(base: Path, victim: Path) -> None:
    run = base / "run"
    run.mkdir()
    _plant(run / "locks", victim)
    with (
        pytest.raises(UntrustedFolderError, match="locks: is a symbolic link"),
        domain_lock(run, "u1", "d"),
    ):
        pass
    _untouched(victim)


def test_a_root_link_above_is_followed_as_the_config_check_allows(base: Path) -> None:
    """/var/run -> /run: a link root owns, above the folder, is the host's."""
    real = base / "real"
    real.mkdir()
    (base / "var-run").symlink_to(real)
    host_folders.make_folder(base / "var-run" / "x" / "y")
    assert (real / "x" / "y").is_dir()


def test_set_owner_refuses_a_link_and_leaves_its_target(base: Path) -> None:
    """Scratch images and restored images are chowned by descriptor: a
    link put in an image's place is not followed."""
    target = base / "shadow"
    target.write_text("secret")
    target.chmod(0o640)
    (base / "vda.scratch").symlink_to(target)
    with pytest.raises(UntrustedFolderError, match="vda.scratch: is a symbolic link"):
        host_folders.set_owner(base / "vda.scratch", QEMU, 0o600)
    st = target.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o640)
    image = base / "vda.img"
    image.write_text("")
    host_folders.set_owner(image, QEMU, 0o600)
    st = image.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600)


def _first_command(base: Path, extra: str, umask: int) -> None:
    cfg = base / "virtbackupd.yaml"
    (base / "policies").mkdir(exist_ok=True)
    cfg.write_text(
        f"state_dir: {base / 'state'}\nruntime_dir: {base / 'run'}\n"
        f"policy_dirs: [{base / 'policies'}]\n{extra}"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "virtbackupd.cli.main", "-c", str(cfg), "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.umask(umask),
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_created_state_dir_holding_the_scratch_dir_is_0711(base: Path, umask: int) -> None:
    """Issue 24, item 1: the CLI made a missing state_dir 0700 and then
    refused its own default scratch_dir inside it (QEMU cannot reach
    it). A state_dir made because it holds the scratch_dir is passable
    (0711, no listing); what lies in it stays root's alone."""
    _first_command(base, "", umask)
    state = base / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o711
    assert stat.S_IMODE((state / "scratch").stat().st_mode) == 0o711
    assert stat.S_IMODE((state / "state.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((base / "run").stat().st_mode) == 0o711


def test_a_created_state_dir_without_the_scratch_dir_is_0700(base: Path) -> None:
    _first_command(base, f"scratch_dir: {base / 'scratch'}\n", 0o022)
    assert stat.S_IMODE((base / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((base / "scratch").stat().st_mode) == 0o711


def test_a_restore_folder_is_judged_for_links_only(base: Path, victim: Path) -> None:
    """`restore --to` names a folder on the command line: one in a folder
    another user owns is the operator's choice and made (0711, QEMU
    reaches the images), but a link that user planted is not followed."""
    theirs = base / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    host_folders.make_passable(theirs / "restored", trusted=False)
    assert stat.S_IMODE((theirs / "restored").stat().st_mode) == 0o711
    _plant(theirs / "planted", victim)
    with pytest.raises(UntrustedFolderError, match="planted: is a symbolic link"):
        host_folders.make_passable(theirs / "planted" / "restored", trusted=False)
    _untouched(victim)
