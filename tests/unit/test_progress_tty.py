"""On a terminal the progress line is redrawn in place (`\\r`), so a log
line written while it shows must not be glued to it (issue 24, item 7:
`web01: 42% 84.0 MiB...2026-12-07T... [warning] ...` on one line). The
progress line is cleared before any log line and redrawn below it. Run in
a real pseudo-terminal (pty): stderr.isatty() must be true, as for an
operator."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import structlog
    from virtbackupd import logs
    from virtbackupd.cli.progress import ProgressLine
    import sys

    logs.configure("info", "console")
    log = structlog.get_logger()
    line = ProgressLine(sys.stderr.isatty())
    assert line.enabled, "stderr is no terminal"
    line.show("web01: 42% 84.0 MiB of 200.0 MiB, 35.2 MiB/s, 0:03 left", force=True)
    log.warning("guest agent did not answer", domain="web01")
    line.show("web01: 43% 86.0 MiB of 200.0 MiB, 35.2 MiB/s, 0:03 left", force=True)
    log.info("short", domain="web01")
    line.show("web01: 99%", force=True)
    line.end()
    print("after", file=sys.stderr)
    """
)


def _screen(raw: str) -> list[str]:
    """What a terminal shows: `\\r` returns to column 0 and what follows
    overwrites, `\\n` starts a new line."""
    lines: list[list[str]] = [[]]
    col = 0
    for ch in raw:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append([])
            col = 0
        else:
            cur = lines[-1]
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
    return ["".join(x).rstrip() for x in lines if "".join(x).strip()]


def test_a_log_line_never_joins_the_progress_line_on_a_terminal() -> None:
    controller, terminal = pty.openpty()
    try:
        child = subprocess.run(
            [sys.executable, "-c", CHILD],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            timeout=60,
            check=False,
        )
        os.close(terminal)
        terminal = -1
        raw = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            raw += chunk
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)
    assert child.returncode == 0, raw.decode(errors="replace")
    text = raw.decode().replace("\r\n", "\n")  # the pty's own newline mapping
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the console's colours
    shown = _screen(text)
    logs = [s for s in shown if "guest agent" in s or "short" in s]
    assert len(logs) == 2, shown
    for s in logs:
        assert "web01: 4" not in s and "%" not in s, shown  # no progress text on it
    assert shown[-2:] == ["web01: 99%", "after"], shown
    assert "guest agent did not answer" in shown[0], shown
