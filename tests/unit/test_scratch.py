"""Scratch space arithmetic: whether an online backup may begin."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtbackupd.config.daemon import load_config
from virtbackupd.engine.scratch import Space, check_room
from virtbackupd.errors import ScratchSpaceError

MiB = 1 << 20
GiB = 1 << 30


@pytest.mark.parametrize(
    ("needs", "free", "fits"),
    [
        ({"vda": 1 * GiB}, 1 * GiB, True),  # exactly the room: fallocate takes it all
        ({"vda": 1 * GiB}, 1 * GiB - 1, False),
        ({"vda": 40 * MiB, "vdb": 8 * MiB}, 48 * MiB, True),  # the sum of all disks counts
        ({"vda": 40 * MiB, "vdb": 8 * MiB}, 48 * MiB - 1, False),
        ({"vda": (1 * GiB) + (1 << 20)}, 48 * MiB, False),  # issue 22: 1 GiB disk, 48 MiB fs
        ({}, 0, True),
    ],
)
def test_a_backup_begins_only_when_every_reservation_fits(
    needs: dict[str, int], free: int, fits: bool
) -> None:
    space = Space(Path("/s"), free, 2 * GiB)
    if fits:
        check_room(needs, space, "web01")
    else:
        with pytest.raises(ScratchSpaceError):
            check_room(needs, space, "web01")


def test_the_refusal_names_the_numbers_and_what_to_do() -> None:
    space = Space(Path("/var/lib/virtbackupd/scratch"), 47 * MiB, 48 * MiB)
    with pytest.raises(ScratchSpaceError) as err:
        check_room({"vda": 1024 * MiB + 1, "vdb": 64 * MiB}, space, "web01")
    assert str(err.value) == (
        "scratch space: an online backup of web01 reserves 1089 MiB before it begins "
        "(vda 1025 MiB, vdb 64 MiB: the size of each disk, what the guest could overwrite "
        "during the backup), but there are 47 MiB free of 48 MiB in "
        "/var/lib/virtbackupd/scratch; set scratch_dir to a file system with that much room, "
        "or back the domain up while it is shut off (needs no scratch space)"
    )


def test_scratch_dir_defaults_to_the_state_dir_on_disk(tmp_path: Path) -> None:
    cfg = tmp_path / "v.yaml"
    cfg.write_text("state_dir: /srv/vb\n")
    assert load_config(cfg).scratch_dir == Path("/srv/vb/scratch")
    cfg.write_text("scratch_dir: scratch\n")
    c = load_config(cfg)
    assert c.scratch_dir == tmp_path / "scratch"
    assert c.state_dir == Path("/var/lib/virtbackupd")
    assert load_config(cfg).runtime_dir != c.scratch_dir
