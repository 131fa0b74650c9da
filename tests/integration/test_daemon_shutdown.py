"""The daemon's stop is bounded, as an operator runs it (a process and
its signals, real libvirtd and QEMU): a clean-up that cannot finish (its
libvirt connection went dead: a proxy of the test's own stops forwarding,
libvirtd itself is untouched) is abandoned at the shutdown bound, or at
once on a second SIGTERM; the daemon says what it left, exits 1, and the
next start cleans it up as after a crash. A backup afterwards restores."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import libvirt

from testbed.daemon import Daemon, backups, wait_backups, wait_running
from testbed.domains import DomainFactory, GuestDomain, MiB
from testbed.guest import GuestWriter
from testbed.libvirt_proxy import freezing_proxy
from testbed.tools import assert_restores

#: The daemon with its shutdown bound cut from 60 s to 3 s (only that
#: constant differs from `python -m virtbackupd.daemon.main`).
SHORT_BOUND_S = 3.0
SHORT_BOUND = (
    "-c",
    "import sys; from virtbackupd.daemon import main, service; "
    f"service.SHUTDOWN_BOUND_S = {SHORT_BOUND_S}; sys.exit(main.main())",
)
ABANDONED = "stopping without waiting for what still runs; the next start cleans up after it"


async def _slow_online_backup(td: GuestDomain, config: Path, uri: str) -> None:
    """A policy for this domain alone (other helpers' domains exist), the
    daemon's libvirt through `uri`; a redefinition of the running domain
    asks for its first backup (events.on_define), taken online and slowly."""
    (config.parent / "policies" / "p.yaml").write_text(
        f"domains: ['{td.name}']\nevents: {{on_define: full, on_shutdown: full}}\nbandwidth: 2MiB\n"
    )
    config.write_text(config.read_text() + f"libvirt_uri: '{uri}'\n")
    await asyncio.to_thread(GuestWriter(td).write, "vda", 0, 16 * MiB, 0x5A)


def _signal(d: Daemon, sig: int) -> None:
    assert d.proc is not None
    d.proc.send_signal(sig)


def _redefine(td: GuestDomain) -> None:
    td.dom.connect().defineXML(td.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


async def _cleaned_by_the_next_start(
    config: Path, tmp_path: Path, td: GuestDomain, backup_id: str
) -> Daemon:
    """A daemon on libvirtd directly: before READY it has cleaned up what
    the abandoned stop left (libvirt job, checkpoint, partial folder)."""
    text = config.read_text()
    config.write_text(text[: text.index("libvirt_uri: ")])
    d = Daemon(config, tmp_path)
    await d.start()
    rec = next(b for b in await backups(config) if b["id"] == backup_id)
    assert rec["status"] == "failed", rec
    assert "interrupted" in rec["error"], rec
    assert not list(Path(rec["path"]).parent.glob("*.partial"))
    assert td.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, "the backup job was aborted"
    assert td.dom.listAllCheckpoints() == [], "the abandoned backup's checkpoint was removed"
    return d


async def test_a_stop_whose_clean_up_outlasts_the_bound_abandons_it_and_exits_1(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[32 * MiB])
    with freezing_proxy() as (uri, freeze):
        await _slow_online_backup(td, config, uri)
        d = Daemon(config, tmp_path)
        try:
            await d.start(entry=SHORT_BOUND)
            await asyncio.to_thread(_redefine, td)
            running = await wait_running(config)
            await asyncio.sleep(2)  # copying
            freeze()
            started = time.monotonic()
            _signal(d, signal.SIGTERM)
            code, log = await d.exited(timeout=60)
            took = time.monotonic() - started
        finally:
            d.close()
    print(log[-3000:])
    assert code == 1
    assert SHORT_BOUND_S <= took < SHORT_BOUND_S + 30, took
    assert ABANDONED in log and "the shutdown bound" in log
    assert td.name in log.split(ABANDONED, 1)[1].splitlines()[0], "names the domain left"
    assert "second signal" not in log
    assert "Traceback" not in log

    d2 = await _cleaned_by_the_next_start(config, tmp_path, td, running["id"])
    try:
        (config.parent / "policies" / "p.yaml").write_text(
            f"domains: ['{td.name}']\nevents: {{on_shutdown: full}}\n"
        )
        _signal(d2, signal.SIGHUP)
        await d2.wait_note("STATUS=reloaded")
        await asyncio.to_thread(td.dom.destroy)  # -> on_shutdown, offline
        done = await wait_backups(config, 2, timeout=120)
        assert done[-1]["status"] == "complete", done
        assert_restores(
            Path(done[-1]["path"]),
            [(x["name"], x["path"]) for x in done[-1]["disks"]],
            td,
            tmp_path,
        )
        assert await d2.stop() == 0
    finally:
        d2.close()


async def test_a_second_sigterm_stops_at_once_and_says_what_it_left(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    """With the real 60 s bound: the second signal does not wait for it."""
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[32 * MiB])
    with freezing_proxy() as (uri, freeze):
        await _slow_online_backup(td, config, uri)
        d = Daemon(config, tmp_path)
        try:
            await d.start()
            await asyncio.to_thread(_redefine, td)
            running = await wait_running(config)
            await asyncio.sleep(2)
            freeze()
            _signal(d, signal.SIGTERM)
            await d.wait_note("STOPPING=1")
            started = time.monotonic()
            _signal(d, signal.SIGTERM)
            code, log = await d.exited(timeout=60)
            took = time.monotonic() - started
        finally:
            d.close()
    print(log[-3000:])
    assert code == 1
    assert took < 20, f"{took:.1f} s after the second signal (the bound is 60 s)"
    assert "second signal: stopping at once" in log
    assert ABANDONED in log and "a second signal" in log
    assert td.name in log.split(ABANDONED, 1)[1].splitlines()[0], "names the domain left"
    assert "Traceback" not in log

    d2 = await _cleaned_by_the_next_start(config, tmp_path, td, running["id"])
    try:
        assert await d2.stop() == 0
    finally:
        d2.close()
