"""Folders another user controls are never trusted (issue 23, item 3):
root followed an unprivileged user's symlink inside a runtime_dir that
user had made, chmodded its target and made job folders in it. Real
folders with real owners; the config is refused naming the file, the key
and the folder that is the problem."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from virtbackupd.config.daemon import load_config
from virtbackupd.daemon.status_file import DaemonStatus, write_status
from virtbackupd.errors import ConfigError

NOBODY = 65534


def _owned_by_nobody(base: Path) -> Path:
    d = base / "theirs"
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    return d / "run"


def _world_writable(base: Path) -> Path:
    d = base / "open"
    d.mkdir()
    d.chmod(0o777)
    return d / "run"


def _group_writable(base: Path) -> Path:
    d = base / "group"
    d.mkdir()
    d.chmod(0o770)
    return d / "run"


def _their_link(base: Path) -> Path:
    target = base / "real"
    target.mkdir()
    link = base / "link"
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)
    return link / "run"


def _link_into_theirs(base: Path) -> Path:
    theirs = base / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    link = base / "link"
    link.symlink_to(theirs)
    return link


UNTRUSTED: list[tuple[str, Callable[[Path], Path], str]] = [
    ("a folder above owned by another user", _owned_by_nobody, "is not root's (owner uid 65534"),
    ("a world-writable folder above", _world_writable, "writable by others than root"),
    ("a group-writable folder above", _group_writable, "writable by others than root"),
    ("a link owned by another user", _their_link, "symbolic link owned by uid 65534"),
    ("a root link into another user's folder", _link_into_theirs, "is not root's"),
]


@pytest.mark.parametrize(
    ("make", "words"), [c[1:] for c in UNTRUSTED], ids=[c[0] for c in UNTRUSTED]
)
@pytest.mark.parametrize("key", ["runtime_dir", "state_dir", "scratch_dir", "backup_root"])
def test_a_folder_another_user_controls_is_refused(
    tmp_path: Path, make: Callable[[Path], Path], words: str, key: str
) -> None:
    folder = make(tmp_path)
    cfg = tmp_path / "vb.yaml"
    cfg.write_text(f"{key}: {folder}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    text = str(exc.value)
    assert text.startswith(f"{cfg}: {key}: {folder} is not used: "), text
    assert words in text, text


def test_root_folders_and_sticky_tmp_are_trusted(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    cfg = tmp_path / "vb.yaml"
    cfg.write_text(
        f"state_dir: {tmp_path / 'state'}\nruntime_dir: {sticky / 'run'}\n"
        f"scratch_dir: {tmp_path / 'a' / 'b'}\n"
    )
    assert load_config(cfg).runtime_dir == sticky / "run"


def test_the_cli_refuses_it_in_one_line_and_touches_nothing(tmp_path: Path) -> None:
    folder = _owned_by_nobody(tmp_path)
    cfg = tmp_path / "vb.yaml"
    cfg.write_text(f"runtime_dir: {folder}\nstate_dir: {tmp_path / 'state'}\n")
    run = subprocess.run(
        [sys.executable, "-m", "virtbackupd.cli.main", "-c", str(cfg), "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert "runtime_dir" in run.stderr and "theirs" in run.stderr
    assert not folder.exists() and not (tmp_path / "state").exists()


def test_the_status_file_is_readable_by_root_alone(tmp_path: Path) -> None:
    """daemon.json was 0644: every domain, policy and failure reason
    readable by any local user."""
    old = os.umask(0o022)
    try:
        write_status(
            tmp_path,
            DaemonStatus.from_json(
                {
                    "pid": 1,
                    "started": "x",
                    "libvirt_uri": "x",
                    "libvirt_connected": True,
                    "domains": {},
                }
            ),
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "daemon.json").stat().st_mode) == 0o600


def test_a_policy_target_or_file_another_user_controls_is_refused(tmp_path: Path) -> None:
    """A policy `target:` below a folder another user owns made root write
    the domain's backups where that user's planted link pointed; a policy
    file owned by another user (in a 0777 policy folder) was obeyed."""
    from virtbackupd.config.policy import load_policy

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    folder = tmp_path / "policies"
    folder.mkdir()
    pol = folder / "p.yaml"
    pol.write_text(f"domains: [web]\ntarget: {theirs / 'repo'}\n")
    with pytest.raises(ConfigError, match=r"p.yaml:2: target: .*theirs is not root's"):
        load_policy(pol)
    pol.write_text("domains: [web]\ntarget: /proc/x\n")
    with pytest.raises(ConfigError, match="a kernel pseudo file system"):
        load_policy(pol)
    pol.write_text("domains: [web]\n")
    os.chown(pol, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        load_policy(pol)
    os.chown(pol, 0, 0)
    pol.chmod(0o666)
    with pytest.raises(ConfigError, match="mode 0666"):
        load_policy(pol)
    folder.chmod(0o777)
    cfg = tmp_path / "vb.yaml"
    cfg.write_text(f"policy_dirs: [{folder}]\nstate_dir: {tmp_path / 'state'}\n")
    with pytest.raises(ConfigError, match=r"policy_dirs\[0\]: .* writable by others than root"):
        load_config(cfg)
