"""Policy files that do not load are refused, never fatal and never
silently replaced by defaults (issue 23, items 1 and 2): against a real
libvirtd, through the CLI and a running daemon."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from testbed.daemon import Daemon, backups, cli, one_line_error
from testbed.domains import WORK_ROOT, DomainFactory, MiB


async def test_a_broken_policy_never_runs_a_backup_under_the_defaults(
    domains: DomainFactory, config: Path
) -> None:
    """It ran under the defaults with only a warning: the disk the policy
    excludes was backed up, its target and bandwidth ignored."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB, 8 * MiB], start=False)
    path = config.parent / "policies" / "p.yaml"
    path.write_text(f"domains: ['{td.name}']\ndisks: {{exclude: [vdb]}}\nkeep_last: 3\n")
    rc, _, err = await cli(config, "backup", td.name)
    assert rc == 2, err
    one_line_error(err)
    assert f"{path}:3: keep_last: unknown key" in err and f"domain '{td.name}'" in err, err
    rc, _, err = await cli(config, "prune", td.name)
    assert rc == 2, err
    assert f"{path}:3" in err and "nothing is pruned" in err, err
    assert await backups(config) == []
    # Fixed, the policy is the one applied: vdb stays out.
    path.write_text(f"domains: ['{td.name}']\ndisks: {{exclude: [vdb]}}\n")
    rc, _, err = await cli(config, "backup", td.name)
    assert rc == 0, err
    done = await backups(config)
    assert [sorted(d["name"] for d in b["disks"]) for b in done] == [["vda"]], done


async def test_hostile_policy_files_never_stop_the_daemon(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """A deeply nested policy killed the daemon at start and on SIGHUP
    (RecursionError); a FIFO or a link to /dev/zero was read without end."""
    folder = config.parent / "policies"
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB], start=False)
    (folder / "good.yaml").write_text(f"domains: ['{td.name}']\n")
    (folder / "nested.yaml").write_text("domains: " + "[" * 20000 + "]" * 20000 + "\n")
    d = Daemon(config, tmp_path)
    try:
        await d.start()  # READY=1: it started with the good file
        os.mkfifo(folder / "fifo.yaml")
        (folder / "zero.yaml").symlink_to("/dev/zero")
        assert d.proc is not None
        d.seen.clear()
        d.proc.send_signal(signal.SIGHUP)
        await d.wait_note("STATUS=reloaded", timeout=60)
        assert d.proc.returncode is None
        rc, _, err = await cli(config, "--json", "status")
        assert rc == 0, err
        assert await d.stop() == 0
        log = d.log
        assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]
        assert "nested.yaml: nested more than 32 levels deep" in log, log[-3000:]
        assert "fifo.yaml: not a regular file (a FIFO)" in log, log[-3000:]
        assert "zero.yaml: a symbolic link to /dev/zero" in log, log[-3000:]
    finally:
        d.close()


async def test_bad_targets_are_one_line_never_a_traceback(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """`restore --to` an existing file or /proc/x, and a policy target on
    a read-only file system printed Python tracebacks; `verify --backup
    ../x` exited 1 where restore and mount give 2 for a backup id that
    names no backup."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB], start=False)
    rc, _, err = await cli(config, "backup", td.name)
    assert rc == 0, err
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    for to, words in ((a_file, "not a folder"), (Path("/proc/x"), "not a folder for images")):
        rc, _, err = await cli(config, "restore", td.name, "--to", str(to))
        assert rc == 2, err
        one_line_error(err)
        assert str(to) in err and words in err, err
    assert a_file.read_text() == "keep me\n"
    for command in ("verify", "restore", "mount"):
        extra = {"restore": ["--to", str(tmp_path / "r")], "mount": [str(tmp_path / "m")]}
        rc, _, err = await cli(
            config, command, td.name, "--backup", "../x", *extra.get(command, [])
        )
        assert rc == 2, (command, err)
        one_line_error(err)
        assert "../x" in err, err
    ro = tmp_path / "ro"
    ro.mkdir()
    await asyncio.to_thread(
        subprocess.run, ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True
    )
    try:
        (config.parent / "policies" / "p.yaml").write_text(
            f"domains: ['{td.name}']\ntarget: {ro}\n"
        )
        rc, _, err = await cli(config, "backup", td.name)
        assert rc == 1, err
        assert "Traceback" not in err, err
        assert str(ro) in err.strip().splitlines()[-1] and "Read-only file system" in err, err
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", str(ro)], check=True)


async def test_an_online_backup_under_umask_077_works(domains: DomainFactory, config: Path) -> None:
    """A new operator's shell (or the unit's UMask=0077) made runtime_dir
    0700 when the CLI created it, and the first online backup failed
    inside libvirt: "Failed to unlink socket …/nbd.sock: Permission
    denied" (QEMU runs as its own user). Folders QEMU passes through are
    made 0711 whatever the umask."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB])
    run = WORK_ROOT / f"{td.name}-fresh-run"
    scratch = WORK_ROOT / f"{td.name}-fresh-scratch"
    text = config.read_text()
    old_run = text.split("runtime_dir: ")[1].split("\n")[0]
    old_scratch = text.split("scratch_dir: ")[1].split("\n")[0]
    config.write_text(text.replace(old_run, str(run)).replace(old_scratch, str(scratch)))
    (config.parent / "policies" / "p.yaml").write_text(f"domains: ['{td.name}']\n")
    restored = WORK_ROOT / f"{td.name}-fresh-restore" / "copy"
    old = os.umask(0o077)
    try:
        rc, _, err = await cli(config, "backup", td.name)
        assert rc == 0, err
        # A --define'd copy's images must be reachable by QEMU too (its
        # `virsh start` failed: "Cannot access storage file").
        rc2, _, err2 = await cli(config, "restore", td.name, "--to", str(restored))
    finally:
        os.umask(old)
    try:
        assert rc2 == 0, err2
        for folder in (run, scratch, restored, restored.parent):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o711, folder
    finally:
        for folder in (run, scratch, restored.parent):
            shutil.rmtree(folder, ignore_errors=True)


async def test_define_of_an_existing_name_is_refused_before_a_byte_is_copied(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """Refused after the copy, it left the images in --to under their
    final names (found by the hostile tester)."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB], start=False)
    rc, _, err = await cli(config, "backup", td.name)
    assert rc == 0, err
    to = tmp_path / "copy"
    rc, _, err = await cli(config, "restore", td.name, "--to", str(to), "--define", td.name)
    assert rc == 2, err
    one_line_error(err)
    assert f"--define {td.name}: a domain of that name exists" in err, err
    assert not to.exists() or not any(to.iterdir())
