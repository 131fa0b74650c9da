"""The export folders of dead processes and the qemu-nbd they leave
(adapters.nbd_folders): the sweep every command runs first stops an
orphaned helper (only one /proc proves is that folder's) and removes the
folder; a lock error names the process holding the image; the folders of
live processes are never touched."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from testbed.repo_builder import MiB
from testbed.tools import run
from virtbackupd.adapters import nbd_folders, procfs, qemu_img, qemu_nbd
from virtbackupd.errors import ProcessError


def orphan_qemu_nbd(image: Path, runtime: Path) -> tuple[Path, int]:
    """A folder and a qemu-nbd serving `image` read-only from it, whose
    owner is dead: what a helper that missed its parent's death leaves
    (made here by starting it without die_with_parent in a child that exits)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            folder = nbd_folders.new_folder(runtime)
            socket = folder / nbd_folders.SOCKET
            helper = subprocess.Popen(
                ["qemu-nbd", "-t", "-r", "-k", str(socket), "-x", "disk", "-f", "qcow2",
                 str(image)],
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            nbd_folders.record_helper(folder, helper.pid)
            while not socket.exists() and helper.poll() is None:
                time.sleep(0.01)
            if socket.exists():
                os.write(write, json.dumps([str(folder), helper.pid]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        said = f.read()
    os.waitpid(pid, 0)
    assert said, "qemu-nbd did not start (a socket path over 107 bytes?)"
    folder, helper = json.loads(said)
    return Path(folder), helper


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(8 * MiB))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", path, "-F", "qcow2",
        tmp_path / "top.qcow2")  # fmt: skip
    return path


async def test_an_orphaned_qemu_nbd_is_named_in_the_lock_error_and_swept(
    tmp_path: Path, image: Path
) -> None:
    runtime = tmp_path / "run"
    folder, helper = orphan_qemu_nbd(image, runtime)
    assert procfs.parent_of(helper) != os.getpid()  # reparented: nobody owns it
    record = nbd_folders.read_record(folder)
    assert record is not None and record.helper is not None and record.helper.pid == helper

    # The lock it holds stops a merge into its image; the error says who.
    with pytest.raises(ProcessError) as err:
        await qemu_img.commit(tmp_path / "top.qcow2")
    assert 'Failed to get "write" lock' in err.value.message
    assert f"held by process {helper} (qemu-nbd -t -r -k {folder}/nbd.sock" in err.value.message
    assert len(str(err.value).splitlines()) <= 2
    with pytest.raises(ProcessError) as err:
        async with qemu_nbd.serve(image, runtime_dir=tmp_path / "other", readonly=False):
            pass
    assert f"held by process {helper} (qemu-nbd -t -r -k {folder}/nbd.sock" in err.value.message

    swept = await nbd_folders.sweep(runtime)
    assert [(s.folder, [h.pid for h in s.stopped], s.removed) for s in swept] == [
        (folder, [helper], True)
    ]
    gone = procfs.identify(helper)
    assert gone is None or not procfs.running(gone)
    assert not folder.exists()
    await qemu_img.commit(tmp_path / "top.qcow2")  # the lock went with it


async def test_the_folders_of_live_processes_are_left_alone(tmp_path: Path, image: Path) -> None:
    runtime = tmp_path / "run"
    async with qemu_nbd.serve(image, runtime_dir=runtime) as export:
        assert await nbd_folders.sweep(runtime) == []
        # Even long after: a live owner's folder has no age limit.
        assert await nbd_folders.sweep(runtime, now=lambda: time.time() + 86400) == []
        assert export.socket.exists()
        record = nbd_folders.read_record(export.socket.parent)
        assert record is not None and record.owner == procfs.me()
        assert record.helper is not None and procfs.running(record.helper)
    assert not list(runtime.glob("nbd-*"))  # removed on exit


async def test_a_recycled_pid_is_not_taken_for_the_owner(tmp_path: Path, image: Path) -> None:
    """The owner's pid runs again (here: ours) but with another start time:
    the owner is dead, its folder goes. Only a qemu-nbd naming the folder's
    own socket is stopped: not a bystander naming the folder, not a live
    export whose socket the record names instead."""
    runtime = tmp_path / "run"
    async with qemu_nbd.serve(image, runtime_dir=runtime) as live:
        folder = nbd_folders.new_folder(runtime)
        record = nbd_folders.read_record(folder)
        assert record is not None
        stale = procfs.ProcessId(os.getpid(), record.owner.start + 1, record.owner.boot)
        forged = nbd_folders.FolderRecord(stale, None, str(live.socket))
        (folder / nbd_folders.OWNER_FILE).write_text(json.dumps(forged.as_json()))
        bystander = await asyncio.create_subprocess_exec("sleep", "60", str(folder / "nbd.sock"))
        try:
            swept = await nbd_folders.sweep(runtime)
            assert [(s.folder, s.stopped, s.removed) for s in swept] == [(folder, (), True)]
            assert bystander.returncode is None
            assert live.socket.exists()
            live_record = nbd_folders.read_record(live.socket.parent)
            assert live_record is not None and live_record.helper is not None
            assert procfs.running(live_record.helper)
        finally:
            bystander.kill()
            await bystander.wait()


@pytest.mark.parametrize("content", [None, "", "{not json", '{"owner": 5, "socket": "x"}'])
async def test_a_folder_without_a_readable_record_is_swept_only_after_a_grace(
    tmp_path: Path, content: str | None
) -> None:
    """Such a folder belongs to an older version, or to a process killed
    in the instant between making it and writing its record."""
    runtime = tmp_path / "run"
    folder = runtime / "nbd-old12345"
    folder.mkdir(parents=True)
    if content is not None:
        (folder / nbd_folders.OWNER_FILE).write_text(content)
    assert await nbd_folders.sweep(runtime) == []
    later = time.time() + nbd_folders.UNRECORDED_GRACE_S + 1
    swept = await nbd_folders.sweep(runtime, now=lambda: later)
    assert [(s.folder, s.removed) for s in swept] == [(folder, True)]
    assert not folder.exists()


async def test_a_backup_jobs_export_folders_are_swept_too(tmp_path: Path, image: Path) -> None:
    runtime = tmp_path / "run"
    folder, helper = orphan_qemu_nbd(image, runtime / "jobs" / "b-1")
    swept = await nbd_folders.sweep(runtime)
    assert [(s.folder, [h.pid for h in s.stopped]) for s in swept] == [(folder, [helper])]
    assert not folder.exists()
