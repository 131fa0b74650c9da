"""Progress lines on a terminal (stderr): bytes done of the total, rate
and time left, redrawn in place and ended with a newline."""

from __future__ import annotations

import sys
import time
from typing import TextIO


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

    def end(self) -> None:
        if self.shown:
            print(file=self.out, flush=True)
            self.shown = False
