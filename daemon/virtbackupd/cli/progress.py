"""Progress lines on a terminal (stderr): bytes done of the total, rate
and time left, redrawn in place and ended with a newline. A log line
written meanwhile clears the progress line first (it is redrawn below
the log line at its next update)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from virtbackupd import logs


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}:{s % 60:02d}"


def progress_text(label: str, done: int, total: int, rate: float, eta: float | None) -> str:
    """One line: "vda: 42% 84.0 MiB of 200.0 MiB, 35.2 MiB/s, 0:03 left"."""
    pct = f"{100 * done / total:3.0f}% " if total else ""
    of = f" of {human_bytes(total)}" if total else ""
    left = f", {duration(eta)} left" if eta is not None else ""
    return f"{label}: {pct}{human_bytes(done)}{of}, {human_bytes(rate)}/s{left}"


class ProgressLine:
    """Redraws one line at most every `interval` seconds; `end` closes it
    with a newline (on success and on failure alike). Silent unless
    enabled (a terminal, not --json)."""

    def __init__(self, enabled: bool, out: TextIO | None = None, interval: float = 0.2) -> None:
        self.enabled = enabled
        self.out = out or sys.stderr
        self.interval = interval
        self._last = 0.0
        self._width = 0
        self.shown = False

    def show(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        pad = " " * max(0, self._width - len(text))
        self._width = len(text)
        print(f"\r{text}{pad}", end="", file=self.out, flush=True)
        self.shown = True
        logs.before_line = self.clear

    def clear(self) -> None:
        """Blank the line and return to its start (a log line comes): the
        next `show` draws at once, below that log line."""
        if self.shown:
            print(f"\r{' ' * self._width}\r", end="", file=self.out, flush=True)
            self.shown = False
            self._width = 0
            self._last = 0.0

    def end(self) -> None:
        if logs.before_line == self.clear:
            logs.before_line = None
        if self.shown:
            print(file=self.out, flush=True)
            self.shown = False
