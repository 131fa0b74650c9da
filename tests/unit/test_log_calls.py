"""structlog takes a log line's message as its `event` argument: a call
that also passes `event=` raises TypeError at the moment it logs. The
daemon's libvirt event handler did so when handling an event failed
(libvirtd restarted), which ended its events task and the daemon with it.
Every log call in the package is checked here, since such a line runs
only on the rare path it reports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "daemon" / "virtbackupd"
LEVELS = {"debug", "info", "notice", "warning", "error", "exception", "critical", "msg"}


def test_no_log_call_passes_event_as_a_keyword() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and any(k.arg == "event" for k in node.keywords)
            ):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, found
