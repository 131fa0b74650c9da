"""A libvirt peer that accepts a connection and never answers (a hung
libvirtd, a host gone mid-call; issue 24, item 8): every connect and call
is bounded and ends in an error naming the call, and the daemon starts
without libvirt and exits on SIGTERM within its bound instead of hanging.
No libvirtd is involved: the peer is a unix socket of the test's own,
reached through a `?socket=` URI."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.daemon import Daemon
from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.errors import LibvirtTimeoutError


@pytest.fixture
def dead_uri() -> Iterator[str]:
    """A libvirt URI whose server accepts connections and never answers."""
    folder = Path(tempfile.mkdtemp(prefix="vb-dead-", dir="/tmp"))  # short: sun_path
    path = folder / "sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"qemu+unix:///system?socket={path}"
    finally:
        done.set()
        thread.join()
        for c in held:
            c.close()
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_connect_to_a_peer_that_never_answers_fails_within_its_bound(
    dead_uri: str,
) -> None:
    started = time.monotonic()
    with pytest.raises(LibvirtTimeoutError) as caught:
        # The outer bound only keeps the unfixed code from hanging the suite.
        await asyncio.wait_for(Libvirt.open(dead_uri, timeout=2), 60)
    took = time.monotonic() - started
    print(f"connect to a dead peer: error after {took:.1f} s: {caught.value}")
    assert took < 10, took
    assert f"a connect to {dead_uri}" in str(caught.value) and "within 2 s" in str(caught.value)


async def test_the_daemon_starts_without_a_hung_libvirt_and_exits_on_sigterm(
    dead_uri: str, tmp_path: Path
) -> None:
    (tmp_path / "policies").mkdir()
    config = tmp_path / "virtbackupd.yaml"
    config.write_text(
        f"libvirt_uri: '{dead_uri}'\nlibvirt_timeout: 3\nstate_dir: state\n"
        f"backup_root: backups\nruntime_dir: {tmp_path / 'run'}\n"
        f"scratch_dir: {tmp_path / 'scratch'}\npolicy_dirs: [policies]\n"
    )
    daemon = Daemon(config, tmp_path)
    try:
        await daemon.start(ready=False)
        await daemon.wait_note("READY=1", timeout=60)
        assert "libvirtd is not reachable" in daemon.read_log()
        started = time.monotonic()
        assert await daemon.stop(timeout=30) == 0
        took = time.monotonic() - started
        print(f"daemon with a hung libvirt: exited {took:.1f} s after SIGTERM")
        assert "within 3 s" in daemon.read_log(), daemon.read_log()[-2000:]
    finally:
        daemon.close()
