"""The sd_notify protocol, without libsystemd and without needing systemd
as PID 1: one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace)."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Tells the service manager what the daemon does. Without
    ``$NOTIFY_SOCKET`` (not started by systemd) every call does nothing."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        self.dropped = 0  # messages the manager's full or missing socket did not take

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str | int) -> bool:
        """Send one message; False when there is no manager to tell, or when
        it has not read the messages before (they queue up to
        net.unix.max_dgram_qlen: 10 where systemd did not raise it) or its
        socket is gone. Never waits: a blocking send stopped the daemon's
        event loop (scheduling, signals, everything) until the manager read;
        a message dropped costs at most a stale STATUS, and a missed
        WATCHDOG=1 is the manager's to judge."""
        if not self.address:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                raise ValueError(f"sd_notify value for {key} contains a newline")
            lines.append(f"{key}={text}")
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        if self._sock is None:
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        try:
            self._sock.sendto("\n".join(lines).encode(), target)
        except OSError:  # EAGAIN: its queue is full; ENOENT, ECONNREFUSED: it is gone
            self.dropped += 1
            return False
        return True

    def ready(self, status: str = "") -> bool:
        extra = {"STATUS": status} if status else {}
        return self.notify(READY=1, MAINPID=os.getpid(), **extra)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def reloading(self) -> bool:
        return self.notify(RELOADING=1)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec=), or None when
    the manager asked for none, or asked another process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None
