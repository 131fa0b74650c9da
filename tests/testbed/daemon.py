"""virtbackupd and virtbackup as an operator runs them: subprocesses with
a config file, talking to the real libvirtd."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from testbed.tools import qemu_img_info

#: Scheduled runs start within 3 s of their minute and busy requests are
#: retried every 3 s: what a test would otherwise sit through (up to 30 s
#: and 15 s). The defaults are unit-tested, and the soak runs with them.
QUICK_SCHEDULE = "schedule: {jitter: 3, busy_retry: 3}\n"


async def spawn_cli(
    config: Path,
    *args: str,
    stdout: int = asyncio.subprocess.PIPE,
    stderr: int = asyncio.subprocess.PIPE,
    env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """`virtbackup -c CONFIG ARGS...` started as a process, as an operator
    runs it; the caller waits for it (or kills it)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "virtbackupd.cli.main",
        "-c",
        str(config),
        *args,
        stdout=stdout,
        stderr=stderr,
        env=env,
    )


async def cli_json(config: Path, *args: str) -> Any:
    """`virtbackup --json ARGS...` as a process, which must succeed: its
    output parsed (an object or a list, as the command prints)."""
    proc = await spawn_cli(config, "--json", *args, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return json.loads(out)


async def backups(config: Path) -> list[dict[str, Any]]:
    proc = await spawn_cli(config, "--json", "list", "--all", stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    records: list[dict[str, Any]] = json.loads(out) if proc.returncode == 0 else []
    return records


async def wait_backups(config: Path, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [b for b in await backups(config) if b["status"] != "running"]
        if len(done) >= n:
            return done
        await asyncio.sleep(0.5)
    raise AssertionError(f"fewer than {n} finished backups after {timeout}s")


class Daemon:
    """virtbackupd as a subprocess with a NOTIFY_SOCKET of the test's own."""

    def __init__(self, config: Path, tmp: Path) -> None:
        self.config = config
        self.notify_path = tmp / f"notify-{time.monotonic_ns()}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)
        self.proc: asyncio.subprocess.Process | None = None
        self.seen: list[str] = []
        # A file, not a pipe: a long run would fill a pipe nobody reads
        # and block the daemon on its next log line.
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.log = ""
        self._log_file: BinaryIO | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _read_notes(self) -> None:
        self.seen += notes(self.notify)

    def read_log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def start(
        self,
        ready: bool = True,
        env: dict[str, str] | None = None,
        entry: Sequence[str] = ("-m", "virtbackupd.daemon.main"),
    ) -> None:
        """`entry`: how Python runs the daemon (`-c CODE` to change a constant first)."""
        self._log_file = self.log_path.open("ab")
        # Read the daemon's notifications as they come, as systemd does: a
        # queue nobody reads fills after 10 (net.unix.max_dgram_qlen) and
        # the daemon then drops them.
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.notify.fileno(), self._read_notes)
        base = {
            "NOTIFY_SOCKET": str(self.notify_path),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            # A daemon that hangs can be made to show every thread's stack
            # (SIGABRT): see stop().
            "PYTHONFAULTHANDLER": "1",
        }
        if "PYTHONPATH" in os.environ:  # e.g. to run the tests against another checkout
            base["PYTHONPATH"] = os.environ["PYTHONPATH"]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *entry,
            "-c",
            str(self.config),
            env={**base, **(env or {})},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._log_file,
        )
        if ready:
            await self.wait_note("READY=1")

    async def exited(self, timeout: float = 30) -> tuple[int, str]:
        """Wait for the daemon to exit on its own: (exit code, its log)."""
        assert self.proc is not None
        await asyncio.wait_for(self.proc.wait(), timeout)
        self.log = self.read_log()
        assert self.proc.returncode is not None
        return self.proc.returncode, self.log

    async def wait_note(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in n for n in self.seen):
            assert time.monotonic() < deadline, f"no {text} from the daemon"
            assert self.proc is not None
            if self.proc.returncode is not None:
                err = self.read_log()
                raise AssertionError(f"the daemon exited ({self.proc.returncode}): {err[-3000:]}")
            self.seen += notes(self.notify)
            await asyncio.sleep(0.1)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            # Hung: every thread's stack into its log (faulthandler), then say it.
            self.proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
            raise AssertionError(
                f"the daemon did not stop within {timeout} s of signal {sig}; its log, with "
                f"the stacks of its threads at the end:\n{self.read_log()[-8000:]}"
            ) from None
        self.seen += notes(self.notify)
        self.log = self.read_log()
        assert self.proc.returncode is not None
        return self.proc.returncode

    def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.notify.fileno())
        self.notify.close()
        if self._log_file is not None:
            self._log_file.close()


async def wait_running(config: Path, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [b for b in await backups(config) if b["status"] == "running"]
        if running:
            return running[0]
        await asyncio.sleep(0.2)
    raise AssertionError(f"no backup started; the records: {await backups(config)}")


def bitmaps(image: Path) -> set[str]:
    data = qemu_img_info(image)["format-specific"]["data"]
    return {b["name"] for b in data.get("bitmaps", []) if b["name"].startswith("virtbackupd-")}


def notes(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def cli(
    config: Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """`virtbackup -c CONFIG ARGS...` as a process: (exit code, stdout, stderr)."""
    proc = await spawn_cli(config, *args, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line_error(err: str) -> None:
    """What an operator sees for an expected failure: one line, no traceback."""
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def ends_in_one_error_line(err: str) -> None:
    """A command that logged its progress (info lines on stderr) and then
    failed: no traceback anywhere, and the failure is its last line."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("virtbackup: "), err


def most_at_once(records: list[dict[str, Any]]) -> int:
    """The largest number of the given backup records whose [started,
    finished] spans overlap at one instant."""
    edges = []
    for r in records:
        edges.append((datetime.fromisoformat(r["started"]), 1))
        edges.append((datetime.fromisoformat(r["finished"]), -1))
    most = now = 0
    for _, step in sorted(edges):  # an end sorts before a start at the same instant
        now += step
        most = max(most, now)
    return most
