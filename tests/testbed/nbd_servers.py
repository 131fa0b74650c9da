"""NBD servers on Unix sockets for tests: qemu-nbd and nbdkit.

Each server runs in the foreground as a child process; "ready" means a client
handshake (nbdinfo) succeeded, not that some time passed.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .tools import nbd_unix_uri


@dataclass
class NbdServer:
    argv: list[str]
    socket: Path
    export: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    stderr_path: Path | None = None

    @property
    def uri(self) -> str:
        return nbd_unix_uri(self.socket, self.export)

    def start(self, timeout: float = 15) -> NbdServer:
        self.stderr_path = self.socket.with_suffix(".stderr")
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited early: {self._stderr()}")
            if self.socket.exists():
                probe = subprocess.run(
                    ["nbdinfo", "--can", "connect", self.uri],
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
                if probe.returncode == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.argv[0]} not ready after {timeout}s: {self._stderr()}")

    def _stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.socket.unlink(missing_ok=True)


class NbdServers:
    """Starts servers in one private directory and stops all of them at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[NbdServer] = []
        self._n = 0

    def _socket(self) -> Path:
        self._n += 1
        return self.directory / f"nbd{self._n}.sock"

    def qemu_nbd(
        self,
        image: Path,
        fmt: str = "qcow2",
        readonly: bool = True,
        export: str = "disk",
        bitmaps: Sequence[str] = (),
        connections: int = 0,
        extra: Sequence[str] = (),
    ) -> NbdServer:
        """qemu-nbd exporting `image`: read-only source (optionally with dirty
        bitmaps) or writable target. `connections=0` allows any number."""
        sock = self._socket()
        # -t: keep serving after a client disconnects (the readiness probe is one).
        argv = ["qemu-nbd", "-t", "-f", fmt, "-k", str(sock), "-x", export, "-e", str(connections)]
        if readonly:
            argv.append("-r")
        for b in bitmaps:
            argv += ["-B", b]
        argv += [*extra, str(image)]
        return self._start(NbdServer(argv, sock, export))

    def nbdkit_memory(
        self, size: int, filters: Sequence[str] = (), params: Sequence[str] = ()
    ) -> NbdServer:
        """nbdkit's memory plugin (sparse RAM disk), with optional filters
        (e.g. ``error`` with ``error-rate=...``)."""
        sock = self._socket()
        argv = ["nbdkit", "-f", "-U", str(sock), "-e", "disk"]
        for f in filters:
            argv += ["--filter", f]
        argv += ["memory", str(size), *params]
        return self._start(NbdServer(argv, sock, "disk"))

    def _start(self, server: NbdServer) -> NbdServer:
        self.servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        for s in self.servers:
            s.stop()
        self.servers.clear()
