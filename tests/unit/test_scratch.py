"""Scratch space arithmetic: when a running backup must stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtbackupd.config.daemon import load_config
from virtbackupd.engine import scratch
from virtbackupd.engine.scratch import RESERVE_MAX, Space, check_before
from virtbackupd.errors import ScratchSpaceError

MiB = 1 << 20
GiB = 1 << 30


@pytest.mark.parametrize(
    ("free", "size", "reserve", "running_out"),
    [
        (100 * GiB, 500 * GiB, RESERVE_MAX, False),  # a large disk: 256 MiB kept free
        (RESERVE_MAX, 500 * GiB, RESERVE_MAX, True),
        (RESERVE_MAX + 1, 500 * GiB, RESERVE_MAX, False),
        (9 * MiB, 24 * MiB, 8 * MiB, False),  # a small file system: a third of it
        (8 * MiB, 24 * MiB, 8 * MiB, True),
        (0, 24 * MiB, 8 * MiB, True),
    ],
)
def test_when_the_scratch_file_system_runs_out(
    free: int, size: int, reserve: int, running_out: bool
) -> None:
    space = Space(Path("/s"), free, size)
    assert space.reserve == reserve
    assert space.running_out is running_out


def test_the_message_has_the_numbers() -> None:
    text = Space(Path("/var/lib/virtbackupd/scratch"), 3 * MiB, 24 * MiB).describe(20 * MiB)
    assert text == (
        "3 MiB free of 24 MiB in /var/lib/virtbackupd/scratch (this backup's scratch files: 20 MiB)"
    )


def test_a_backup_is_refused_when_there_is_no_room_to_begin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert check_before(tmp_path, "web01").folder == tmp_path  # the test's disk has room
    monkeypatch.setattr(scratch, "measure", lambda folder: Space(folder, 7 * MiB, 24 * MiB))
    with pytest.raises(
        ScratchSpaceError,
        match=r"scratch space: 7 MiB free of 24 MiB in /s; an online backup of web01 needs room",
    ):
        scratch.check_before(Path("/s"), "web01")


def test_scratch_dir_defaults_to_the_state_dir_on_disk(tmp_path: Path) -> None:
    cfg = tmp_path / "v.yaml"
    cfg.write_text("state_dir: /srv/vb\n")
    assert load_config(cfg).scratch_dir == Path("/srv/vb/scratch")
    cfg.write_text("scratch_dir: scratch\n")
    c = load_config(cfg)
    assert c.scratch_dir == tmp_path / "scratch"
    assert c.state_dir == Path("/var/lib/virtbackupd")
    assert load_config(cfg).runtime_dir != c.scratch_dir
