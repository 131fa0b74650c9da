"""qemu-img never runs as root in a folder QEMU's user can write to
(hostile-tester finding, reproduced: scratch.prepare made the job's
scratch folder QEMU's, then reserve() ran `qemu-img create` as root on a
path inside it; a link QEMU's user planted there turned a root 0600 file
elsewhere into a 64 MiB qcow2, and set_owner refused the link only
afterwards). Now the folder is root's, 0700, from its creation until every
scratch file in it is made and handed to QEMU; the folder is handed over
last (by descriptor). Real qemu-img, a real unprivileged process planting
links, real owners."""

from __future__ import annotations

import asyncio
import shutil
import stat
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.tools import run
from virtbackupd.adapters import qemu_img
from virtbackupd.engine import scratch
from virtbackupd.engine.restore import live_check
from virtbackupd.engine.scratch import ScratchFile
from virtbackupd.errors import UntrustedFolderError

MiB = 1 << 20
NOBODY = 65534
QEMU = (NOBODY, NOBODY)  # any non-root user stands for libvirt-qemu here

# As QEMU's user: plant a link at each scratch file's name, again and again,
# until told to stop (stdin closes); reports how many it planted.
PLANTER = """
import os, sys, select
victim, paths = sys.argv[1], sys.argv[2:]
planted = 0
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    for p in paths:
        try:
            os.symlink(victim, p)
            planted += 1
        except OSError:
            pass
print(planted, flush=True)
"""


@pytest.fixture
def base() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="vb-scratch-links-", dir="/var/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


async def _with_planter(
    victim: Path, paths: list[Path], work: Coroutine[object, object, object]
) -> tuple[UntrustedFolderError | None, int]:
    """Run `work` while QEMU's user plants links at `paths`; what set_owner
    refused (a link met too late) and how many links were planted."""
    planter = await asyncio.create_subprocess_exec(
        "/usr/bin/python3",
        "-c",
        PLANTER,
        str(victim),
        *map(str, paths),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
    )
    assert planter.stdout is not None and planter.stdin is not None
    assert (await planter.stdout.readline()).strip() == b"ready"
    refused: UntrustedFolderError | None = None
    try:
        await work
    except UntrustedFolderError as exc:
        refused = exc
    finally:
        planter.stdin.close()
        out, _ = await planter.communicate()
    return refused, int(out)


def _victim(base: Path) -> Path:
    v = base / "secret"
    v.write_bytes(b"root's secret\n")
    v.chmod(0o600)
    return v


async def test_a_link_planted_while_reserving_is_never_written_through(base: Path) -> None:
    victim = _victim(base)
    folder = base / "scratch" / "j1"
    files = {d: ScratchFile(d, folder / f"{d}.scratch", 4 * MiB) for d in ("vda", "vdb")}
    for attempt in range(3):  # a retried reservation (a full after a refused incremental) too
        if attempt == 0:
            scratch.prepare(folder, QEMU)
        refused, planted = await _with_planter(
            victim,
            [f.path for f in files.values()],
            scratch.reserve(files, base / "scratch", "web01", QEMU),
        )
        assert victim.read_bytes() == b"root's secret\n"
        st = victim.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
        assert refused is None
        # Once handed over, the names are taken: nothing could be planted.
        assert planted == 0
        for f in files.values():
            st = f.path.lstat()
            assert stat.S_ISREG(st.st_mode)
            assert (st.st_uid, st.st_gid) == QEMU
        st = folder.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*QEMU, 0o700)


async def test_the_folder_is_roots_whenever_qemu_img_runs(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No window by construction: prepare makes the job folder root's 0700;
    reserve takes it back (root's, 0700, by descriptor) before it removes
    or makes anything in it, hands each file to QEMU once made, and the
    folder only after the last one. The real qemu-img runs; the spy only
    records who owns the folder at each call (QEMU's user, not being able
    to write the folder then, cannot plant a link there)."""
    folder = base / "scratch" / "j1"
    files = {d: ScratchFile(d, folder / f"{d}.scratch", 2 * MiB) for d in ("vda", "vdb")}
    seen: list[tuple[int, int]] = []
    real_create = qemu_img.create

    async def spy(path: Path, *args: Any, **kwargs: Any) -> None:
        st = path.parent.stat()
        seen.append((st.st_uid, stat.S_IMODE(st.st_mode)))
        await real_create(path, *args, **kwargs)

    monkeypatch.setattr(qemu_img, "create", spy)
    scratch.prepare(folder, QEMU)
    for _ in range(2):
        await scratch.reserve(files, base / "scratch", "web01", QEMU)
        st = folder.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*QEMU, 0o700)
        for f in files.values():
            assert (f.path.stat().st_uid, f.path.stat().st_gid) == QEMU
            assert '"format": "qcow2"' in run("qemu-img", "info", "--output=json", f.path)
    assert seen == [(0, 0o700)] * 4
    assert (base / "scratch").stat().st_uid == 0


async def test_a_live_check_work_folder_is_made_the_same_way(base: Path) -> None:
    """live_check made its work folder QEMU's and then ran qemu-img create
    as root in it (the same finding): now live_check.make_work keeps it
    root's until its scratch files are made and QEMU's."""
    victim = _victim(base)
    run_dir = base / "run"
    run_dir.mkdir(mode=0o711)
    work = run_dir / "check"
    sizes = {"vda": 2 * MiB, "vdb": 2 * MiB}
    paths = [work / f"{d}.scratch" for d in sizes]
    refused, planted = await _with_planter(victim, paths, live_check.make_work(work, sizes, QEMU))
    assert victim.read_bytes() == b"root's secret\n"
    assert refused is None
    assert planted == 0
    for p in paths:
        st = p.lstat()
        assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid) == QEMU
    st = work.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*QEMU, 0o700)
