"""Fixtures shared by the engine's integration tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.daemon import QUICK_SCHEDULE
from testbed.domains import WORK_ROOT


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    """A repository-local daemon config: state and backups in the test's
    temp dir; the runtime dir where QEMU (libvirt-qemu) can reach its job
    folder (pytest's temp dirs are 0700 root)."""
    run = WORK_ROOT / f"run-{tmp_path.name}"
    run.mkdir(parents=True, exist_ok=True)
    scratch = WORK_ROOT / f"scratch-{tmp_path.name}"  # on disk, like the default
    (tmp_path / "policies").mkdir()
    cfg = tmp_path / "virtbackupd.yaml"
    cfg.write_text(
        f"state_dir: state\nbackup_root: backups\nruntime_dir: {run}\n"
        f"scratch_dir: {scratch}\npolicy_dirs: [policies]\n{QUICK_SCHEDULE}"
    )
    yield cfg
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
