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


def _log_calls() -> list[tuple[Path, ast.Call]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("log", "logger")
            ):
                out.append((path, node))
    return out


#: Modules whose lines the daemon writes about the domains it backs up,
#: prunes and cleans: each such line must reach `journalctl DOMAIN=NAME`.
DAEMON_PATHS = {
    "daemon/service.py",
    "daemon/policies.py",
    "daemon/recovery.py",
    "daemon/supervisor.py",
    "daemon/verifier.py",
    "engine/backup/driver.py",
    "engine/backup/entry.py",
    "engine/backup/planning.py",
    "engine/backup/online.py",
    "engine/backup/offline.py",
    "engine/backup/folders.py",
    "engine/backup/commit.py",
    "engine/backup/copying.py",
    "engine/upkeep/prune.py",
    "engine/recovery/leftovers.py",
    "engine/recovery/own_checkpoints.py",
    "engine/recovery/undo.py",
    "engine/domain_job.py",
}
#: Keys that make a line about one domain (or one of its backups).
ABOUT_A_DOMAIN = {"backup_id", "domain_uuid", "uuid", "checkpoint", "disk", "stale", "lost"}


def test_a_backup_is_named_by_backup_id() -> None:
    """journalctl BACKUP_ID=... finds every line about a backup: no line
    names it under another key (`backup=` became BACKUP=)."""
    found = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path, node in _log_calls()
        if any(k.arg == "backup" for k in node.keywords)
    ]
    assert not found, found


def test_every_line_about_a_domain_carries_its_name() -> None:
    """In the daemon's paths, a line on the module's logger (not one bound
    to a job's domain and backup id) that is about a domain, its backup,
    checkpoint or disk passes `domain=`: the documented `journalctl -u
    virtbackupd DOMAIN=web01` misses none (the prune's outcome line had
    only DOMAIN_UUID)."""
    found = []
    for path, node in _log_calls():
        if str(path.relative_to(PACKAGE)) not in DAEMON_PATHS:
            continue
        keys = {k.arg for k in node.keywords}
        if keys & ABOUT_A_DOMAIN and "domain" not in keys:
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, found
