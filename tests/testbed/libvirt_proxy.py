"""A libvirt URI through a proxy of the test's own that can stop
forwarding: a dead peer (a hung libvirtd, a lost network) without
touching the real libvirtd that other tests share."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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
