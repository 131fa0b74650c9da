"""A libvirt connection whose peer stops answering mid-session (issue 24,
item 8): a call on it fails within its bound, naming the call, and the
keepalive closes the connection so that the calls waiting on it end too.
The real libvirtd is reached through a proxy of the test's own that stops
forwarding (a dead peer; libvirtd itself is not touched)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtbackupd.adapters.libvirt_conn import DomainRef, Libvirt
from virtbackupd.errors import LibvirtError, LibvirtTimeoutError

LIBVIRT_SOCK = "/run/libvirt/libvirt-sock"


@contextlib.contextmanager
def freezing_proxy() -> Iterator[tuple[str, Callable[[], None]]]:
    """A URI through a proxy to libvirtd, and what makes the proxy stop
    forwarding (both ways; the sockets stay open)."""
    folder = Path(tempfile.mkdtemp(prefix="vb-proxy-", dir="/tmp"))  # short: sun_path
    path = folder / "sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    server.settimeout(0.2)
    frozen, done = threading.Event(), threading.Event()
    held: list[socket.socket] = []

    def pump(src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.2)
        while not done.is_set():
            if frozen.is_set():
                time.sleep(0.1)
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if frozen.is_set():
                continue  # lost, as with a peer that died
            with contextlib.suppress(OSError):
                dst.sendall(data)

    def accept() -> None:
        while not done.is_set():
            try:
                client = server.accept()[0]
            except TimeoutError:
                continue
            except OSError:
                return  # the server closed at the end of the test
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(LIBVIRT_SOCK)
            held.extend((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"qemu+unix:///system?socket={path}", frozen.set
    finally:
        done.set()
        for s in held:
            s.close()
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_call_whose_peer_stops_answering_is_bounded_and_the_keepalive_ends_it() -> None:
    with freezing_proxy() as (uri, freeze):
        lv = await Libvirt.open(uri, timeout=3)
        await lv.domains()  # answered through the proxy
        freeze()
        started = time.monotonic()
        with pytest.raises(LibvirtTimeoutError) as caught:
            await lv.domains()
        took = time.monotonic() - started
        print(f"a call to a frozen peer: {took:.1f} s: {caught.value}")
        assert took < 15 and "listAllDomains" in str(caught.value)

        # Given up: no second call waits beside the hung one.
        with pytest.raises(LibvirtError, match="given up when listAllDomains did not answer"):
            await lv.xml(DomainRef("x", "00000000-0000-0000-0000-000000000000"))

        # The keepalive (5 s idle, 3 unanswered) closes the connection.
        started = time.monotonic()
        while lv.alive():
            assert time.monotonic() - started < 60, "no keepalive close within 60 s"
            await asyncio.sleep(0.5)
        print(f"the keepalive closed the connection {time.monotonic() - started:.1f} s later")
        await lv.close()
    # The hung call's thread met the closed socket: the process lives on.
    assert threading.active_count() >= 1
