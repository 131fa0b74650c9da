"""The daemon and the CLI as a new operator meets them: a host whose VMs
exist before the daemon starts, a CLI backup beside the daemon, a broken
or lost state.db, policies that overlap on a real domain. Each test pins
one thing that was seen to fail at first contact (issue 11)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from testbed.daemon import (
    Daemon,
    backups,
    cli,
    ends_in_one_error_line,
    most_at_once,
    one_line_error,
    spawn_cli,
    wait_backups,
    wait_running,
)
from testbed.domains import DomainFactory, MiB
from testbed.guest import GuestWriter
from testbed.host import connect, ensure_libvirtd, stop_libvirtd
from testbed.tools import assert_restores
from virtbackupd.engine.locks import domain_lock


def policy(config: Path, text: str, name: str = "p.yaml") -> Path:
    path = config.parent / "policies" / name
    path.write_text(text)
    return path


async def status(config: Path) -> dict[str, Any]:
    rc, out, err = await cli(config, "--json", "status")
    assert rc == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


async def test_daemon_starts_on_a_host_whose_domains_already_exist(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """It crashed at start (AttributeError: 'Job' object has no attribute
    'next_run_time') as soon as a scheduled policy governed an existing
    domain. Now: it starts, and status lists the governed domain (never
    backed up, with its next runs) and the unmanaged one."""
    governed = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB])
    other = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB], start=False)
    policy(config, f"domains: ['{governed.name}']\nschedule: {{full: '0 2 * * 0'}}\n")
    d = Daemon(config, tmp_path)
    try:
        await d.start()
        st = await status(config)
        assert d.proc is not None and st["daemon"]["pid"] == d.proc.pid
        row = next(r for r in st["domains"] if r["domain"] == governed.name)
        assert row["last_good"] is None
        assert row["policy"].endswith("p.yaml")
        nxt = datetime.fromisoformat(row["next_runs"]["full"])
        assert nxt.weekday() == 6 and (nxt.hour, nxt.minute) == (2, 0)  # Sunday 02:00, host's zone
        assert other.name in st["unmanaged"]
        rc, text, _ = await cli(config, "status")
        assert rc == 0
        assert f"{governed.name}: policy" in text and "never backed up" in text
        assert await d.stop() == 0
        assert "Traceback" not in d.log
    finally:
        d.close()


async def test_a_request_that_meets_a_busy_domain_waits_and_runs(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """An on-shutdown backup that met the lock of another backup (here the
    test holds the very lock a CLI backup takes) was logged as failed and
    never retried. Now it waits and runs once the domain is free."""
    policy(config, "domains: ['vbtest-*']\nevents: {on_shutdown: full}\n")
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB])
    await asyncio.to_thread(GuestWriter(td).write, "vda", MiB, MiB, 0x31)
    run_dir = Path(config.read_text().split("runtime_dir: ")[1].split("\n")[0])
    d = Daemon(config, tmp_path)
    try:
        await d.start()
        uuid = td.dom.UUIDString()
        with domain_lock(run_dir, uuid, td.name):
            await asyncio.to_thread(td.dom.destroy)
            deadline = time.monotonic() + 30
            while "domain busy; the backup waits" not in d.read_log():
                assert time.monotonic() < deadline, d.read_log()
                await asyncio.sleep(0.3)
            row = next(r for r in (await status(config))["domains"] if r["domain"] == td.name)
            assert row["retrying"] and "another backup" in row["retrying"]
        done = await wait_backups(config, 1, timeout=60)
        assert done[0]["status"] == "complete" and done[0]["level"] == "full"
        assert_restores(
            Path(done[0]["path"]), [(x["name"], x["path"]) for x in done[0]["disks"]], td, tmp_path
        )
        assert await d.stop() == 0
    finally:
        d.close()


async def test_several_domains_at_once_share_max_concurrent_backups(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """Three domains stop at once under `max_concurrent_backups: 2`: two
    backups run side by side (concurrent commits to one state.db broke a
    shared transaction and silently killed workers), the third waits for a
    slot, and all three restore byte-identical. The bandwidth limit makes
    each backup last a few seconds so that they really overlap."""
    config.write_text(config.read_text() + "max_concurrent_backups: 2\n")
    policy(config, "domains: ['vbtest-*']\nbandwidth: 1MiB\nevents: {on_shutdown: full}\n")
    tds = [await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB]) for _ in range(3)]
    for i, td in enumerate(tds):
        await asyncio.to_thread(GuestWriter(td).write, "vda", 0, 4 * MiB, 0x40 + i)
    d = Daemon(config, tmp_path)
    try:
        await d.start()
        await asyncio.gather(*(asyncio.to_thread(td.dom.destroy) for td in tds))
        done = await wait_backups(config, 3, timeout=120)
        assert [(b["status"], b["level"]) for b in done] == [("complete", "full")] * 3, done
        assert most_at_once(done) == 2, [(b["started"], b["finished"]) for b in done]
        for b, td in zip(
            sorted(done, key=lambda b: b["domain"]), sorted(tds, key=lambda t: t.name), strict=True
        ):
            assert b["domain"] == td.name
            assert_restores(
                Path(b["path"]), [(x["name"], x["path"]) for x in b["disks"]], td, tmp_path
            )
        assert await d.stop() == 0
        assert "Traceback" not in d.log and "task died" not in d.log
    finally:
        d.close()


async def test_a_run_missed_while_the_daemon_was_down_is_caught_up_once(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """A CLI backup, then the minute of the schedule passes with no daemon;
    the daemon started after it takes that backup at once (the schedule's
    next fire is a day away, so only the catch-up can explain it)."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB])
    rc, _, err = await cli(config, "--json", "backup", td.name)
    assert rc == 0, err
    # The schedule fires at the minute after the backup's, which we let pass.
    now = datetime.now(UTC)
    fire = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
    policy(
        config,
        f"domains: ['{td.name}']\nschedule: {{incremental: '{fire.minute} {fire.hour} * * *'}}\n",
    )
    await asyncio.sleep((fire - datetime.now(UTC)).total_seconds() + 1)
    d = Daemon(config, tmp_path)
    try:
        await d.start()
        done = await wait_backups(config, 2, timeout=60)
        assert done[1]["status"] == "complete" and done[1]["level"] == "incremental"
        assert "catching up a missed backup" in d.read_log()
        await asyncio.sleep(3)
        assert len(await backups(config)) == 2, "caught up once"
        assert await d.stop() == 0
    finally:
        d.close()


async def test_status_shows_running_jobs_and_cancel_ends_one_cleanly(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """Status showed no running job (nothing wrote its progress) and there
    was no way to cancel one backup. Now CLI and daemon jobs publish bytes
    done of total and rate; `virtbackup cancel` ends one with the same
    clean-up as any failure, and status shows that attempt's reason."""
    policy(config, "domains: ['vbtest-*']\nbandwidth: 2MiB\nevents: {on_shutdown: full}\n")
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[32 * MiB])
    await asyncio.to_thread(GuestWriter(td).write, "vda", 0, 24 * MiB, 0x41)
    # A CLI job.
    proc = await spawn_cli(
        config, "backup", td.name, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_running(config)
    except AssertionError:
        if proc.returncode is None:
            proc.kill()
        _, said = await proc.communicate()
        raise AssertionError(f"the CLI backup said: {said.decode()[-3000:]}") from None
    deadline = time.monotonic() + 20
    while True:
        running = (await status(config))["running"]
        if running and running[0]["done"] > 0:
            break
        assert time.monotonic() < deadline, running
        await asyncio.sleep(0.5)
    job = running[0]
    assert job["domain"] == td.name and job["total"] >= 24 * MiB > job["done"]
    assert job["rate"] > 0 and job["eta_s"] is not None
    rc, text, _ = await cli(config, "status")
    assert f"running: {td.name}" in text and "MiB/s" in text and "left" in text
    rc, out, err = await cli(config, "cancel", td.name)
    assert rc == 0, err
    assert "cancelled backup" in out
    cli_rc = await proc.wait()
    assert proc.stderr is not None  # spawned with stderr=PIPE
    cli_err = (await proc.stderr.read()).decode()
    assert cli_rc == 1
    ends_in_one_error_line(cli_err)
    assert "cancelled by the operator" in cli_err
    rec = (await backups(config))[0]
    assert rec["status"] == "failed" and rec["error"] == "cancelled by the operator"
    assert td.dom.listAllCheckpoints() == [], "the cancelled backup left no checkpoint"
    row = next(r for r in (await status(config))["domains"] if r["domain"] == td.name)
    assert row["last_failure"]["reason"] == "cancelled by the operator"
    # A daemon job (offline, on shutdown), cancelled the same way.
    d = Daemon(config, tmp_path)
    try:
        await d.start()
        await asyncio.to_thread(td.dom.destroy)
        await wait_running(config)
        rc, out, err = await cli(config, "cancel", td.name)
        assert rc == 0, err
        failed = [b for b in await backups(config) if b["status"] == "failed"]
        assert len(failed) == 2 and failed[1]["error"] == "cancelled by the operator"
        assert not list(Path(failed[1]["path"]).parent.glob("*.partial"))
        rc, _, err = await cli(config, "cancel", td.name)
        assert rc == 1 and "no backup" in err
        assert await d.stop() == 0
        assert "Traceback" not in d.log
    finally:
        d.close()


async def test_a_damaged_or_lost_state_database(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """A damaged state.db gave a 25-line traceback from every command, even
    `reindex`; a deleted one was recreated empty while the daemon wrote to
    the deleted inode."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB])
    rc, _, err = await cli(config, "backup", td.name)
    assert rc == 0, err
    db = config.parent / "state" / "state.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"\0garbage" * 4096)
    rc, _, err = await cli(config, "list")
    assert rc == 1
    one_line_error(err)
    assert str(db) in err and "virtbackup reindex" in err
    rc, out, err = await cli(config, "--json", "reindex")
    assert rc == 0, err
    moved = Path(json.loads(out)["moved_aside"])
    assert moved.read_bytes().startswith(b"\0garbage"), "moved aside, not deleted"
    assert json.loads(out)["added"] == 1
    rc, out, _ = await cli(config, "--json", "list")
    listed = json.loads(out)
    assert [b["status"] for b in listed] == ["complete"]
    # The chain goes on from the rebuilt catalogue, byte-identical.
    await asyncio.to_thread(GuestWriter(td).write, "vda", 2 * MiB, MiB, 0x52)
    rc, out, err = await cli(config, "--json", "backup", td.name)
    assert rc == 0, err
    after = json.loads(out)
    assert (after["level"], after["parent"]) == ("incremental", listed[0]["id"])
    assert_restores(Path(after["path"]), [("vda", "vda.qcow2")], td, tmp_path)
    # A catalogue that lost what the folders hold is brought in line with
    # them (the folders are the truth), and that is said.
    db.unlink()
    rc, out, err = await cli(config, "list")
    assert rc == 0, err
    assert [line.split()[0] for line in out.splitlines()] == [listed[0]["id"], after["id"]]
    assert "lacked 2 backup(s)" in err and "recorded them" in err
    # The daemon notices its file deleted under it and stops for a restart.
    rc, _, err = await cli(config, "reindex")
    assert rc == 0, err
    policy(config, "domains: ['nothing-*']\n")
    d = Daemon(config, tmp_path)
    try:
        await d.start()
        db.unlink()
        rc, log = await d.exited(timeout=30)
        assert rc == 1
        assert "state database was removed or replaced" in log
        assert "Traceback" not in log
    finally:
        d.close()


async def test_policy_check_is_an_honest_gate(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """Overlaps on a real domain are errors naming both files; a pattern
    matching no domain and a missing policy folder are warnings (the daemon
    refuses to start without its folder); every problem of a file."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB], start=False)
    a = policy(config, f"domains: ['{td.name}']\n", "a.yaml")
    b = policy(config, "domains: ['vbtest-*', 'no-such-vm']\n", "b.yaml")
    rc, _, err = await cli(config, "policy", "check")
    assert rc == 2
    assert f"domain '{td.name}' is matched by {a} and {b}" in err
    assert "'no-such-vm' matches no domain" in err
    b.unlink()
    policy(config, "domains: ['no-such-vm']\nquiesce: maybe\ncolor: red\n", "c.yaml")
    rc, _, err = await cli(config, "policy", "check")
    assert rc == 2
    lines = [x for x in err.splitlines() if "c.yaml" in x]
    assert len(lines) == 2 and ":2: quiesce" in lines[0] and ":3: color" in lines[1], lines
    (config.parent / "policies" / "c.yaml").unlink()
    rc, out, err = await cli(config, "policy", "check")
    assert rc == 0 and f"ok: {a}" in out and err == ""
    # A missing policy folder: a warning for `policy check`, an error for the daemon.
    for f in (config.parent / "policies").iterdir():
        f.unlink()
    (config.parent / "policies").rmdir()
    rc, _, err = await cli(config, "policy", "check")
    assert rc == 0 and "does not exist" in err
    d = Daemon(config, tmp_path)
    try:
        await d.start(ready=False)
        rc, log = await d.exited()
        assert rc == 2
        one_line_error(log)
        assert "policy_dirs" in log and "does not exist" in log
    finally:
        d.close()


async def test_the_shipped_example_policy_works_on_any_vm(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """The example excluded `vdc`, and an exclude of a disk a VM lacks
    failed every backup. Now: the example (with this VM's name) backs up a
    one-disk VM, and an exclude of an absent disk is no error."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB])
    example = Path(__file__).resolve().parents[2] / "config" / "policies.d" / "example.yaml"
    text = example.read_text().replace('["web01", "db-*"]', f'["{td.name}"]')
    policy(config, text.replace("exclude: []", "exclude: [vdc]"))
    rc, _, err = await cli(config, "policy", "check")
    assert rc == 0, err
    rc, out, err = await cli(config, "--json", "backup", td.name)
    assert rc == 0, err
    assert json.loads(out)["status"] == "complete"


async def test_operator_facing_rough_edges(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[16 * MiB])
    # Unknown domain: bad input, exit 2, one line.
    rc, _, err = await cli(config, "backup", "no-such-domain")
    assert rc == 2
    one_line_error(err)
    rc, _, err = await cli(config, "restore", "no-such-domain", "--to", str(tmp_path / "r"))
    assert rc == 2
    one_line_error(err)
    # `list DOMAIN` of a domain without backups: an empty list.
    rc, out, err = await cli(config, "--json", "list", td.name)
    assert (rc, json.loads(out)) == (0, []), err
    # Progress on a terminal: done of total, rate, time left; ends with a newline.
    await asyncio.to_thread(GuestWriter(td).write, "vda", 0, 8 * MiB, 0x51)
    policy(config, "domains: ['vbtest-*']\nbandwidth: 4MiB\n")
    master, slave = pty.openpty()
    proc = await spawn_cli(
        config, "backup", "--full", td.name, stdout=asyncio.subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    out_bytes, _ = await proc.communicate()
    assert proc.returncode == 0
    term = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        term += chunk
    os.close(master)
    text = term.decode()
    assert "MiB of 8.0 MiB" in text and "/s" in text, text
    assert "walked" not in text
    assert text.endswith("\n") and "Traceback" not in text
    assert "complete" in out_bytes.decode()
    # `status | head`: the reader goes away early; no BrokenPipe traceback.
    shell = await asyncio.create_subprocess_shell(
        f"{sys.executable} -m virtbackupd.cli.main -c {config} --json list | head -c 10",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err_bytes = await shell.communicate()
    assert b"Traceback" not in err_bytes and b"BrokenPipe" not in err_bytes, err_bytes
    # A renamed domain's backups are found under its new name at once.
    await asyncio.to_thread(td.dom.destroy)
    new_name = f"{td.name}-renamed"
    await asyncio.to_thread(td.dom.rename, new_name, 0)
    td.name = new_name
    rc, out, err = await cli(config, "--json", "list", new_name)
    assert rc == 0, err
    assert len(json.loads(out)) == 1
    # The VM stopped under a CLI backup: one line, exit 1, nothing trusted left.
    await asyncio.to_thread(td.start)
    await asyncio.to_thread(GuestWriter(td).write, "vda", 0, 12 * MiB, 0x52)
    policy(config, "domains: ['vbtest-*']\nbandwidth: 1MiB\n")
    proc = await spawn_cli(
        config,
        "backup",
        "--full",
        new_name,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await wait_running(config)
    await asyncio.sleep(2)
    await asyncio.to_thread(td.dom.destroy)
    _, err_bytes = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    ends_in_one_error_line(err_bytes.decode())
    last = (await backups(config))[-1]
    assert last["status"] == "failed" and last["error"]
    assert [c.getName() for c in td.dom.listAllCheckpoints()] == [
        f"virtbackupd-{b['id']}" for b in await backups(config) if b["status"] == "complete"
    ][-1:]


async def test_journal_format_without_journald_is_a_clear_error(
    config: Path, tmp_path: Path
) -> None:
    """`log.format: journal` where no journald listens crashed the daemon."""
    if Path("/run/systemd/journal/socket").exists():  # a real journald: nothing to show
        raise AssertionError("this test bed has journald; the test needs a host without it")
    config.write_text(config.read_text() + "log: {format: journal}\n")
    d = Daemon(config, tmp_path)
    try:
        await d.start(ready=False)
        rc, log = await d.exited()
        assert rc == 2
        one_line_error(log)
        assert "no journald socket" in log
    finally:
        d.close()


async def test_the_daemon_starts_before_libvirtd_and_waits_for_it(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """At boot (or while libvirtd restarts) the daemon used to exit 1 at
    start ("cannot connect"), leaving it to systemd's restart loop and its
    start limit. Now it starts, says libvirt is not reachable, and finishes
    its start-up (schedules, catch-up) when libvirtd answers."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[8 * MiB], start=False)
    policy(config, f"domains: ['{td.name}']\nschedule: {{incremental: '0 3 * * *'}}\n")
    await asyncio.to_thread(stop_libvirtd)
    d = Daemon(config, tmp_path)
    try:
        await d.start()
        st = await status(config)
        assert st["daemon"]["libvirt_connected"] is False
        await asyncio.to_thread(ensure_libvirtd)
        domains.conn = connect()
        td.dom = domains.conn.lookupByName(td.name)
        deadline = time.monotonic() + 60
        while True:
            st = await status(config)
            rows = [r for r in st["domains"] if r["domain"] == td.name]
            if st["daemon"]["libvirt_connected"] and rows and rows[0]["next_runs"]:
                break
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.5)
        assert "libvirtd is not reachable; starting without it" in d.read_log()
        assert await d.stop() == 0
        assert "Traceback" not in d.log
    finally:
        await asyncio.to_thread(ensure_libvirtd)
        d.close()
