"""structlog setup for the CLI (console on stderr, or JSON lines).

The daemon's journald renderer arrives with the daemon issue.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def daemon_format(configured: str) -> str:
    """`auto` means journald when systemd connected our output to it
    ($JOURNAL_STREAM), else the console."""
    if configured == "auto":
        return "journal" if os.environ.get("JOURNAL_STREAM") else "console"
    return configured


def configure(level: str = "info", fmt: str = "console") -> None:
    renderer: structlog.typing.Processor
    if fmt == "journal":
        from virtbackupd.adapters.journald import JournaldRenderer, JournalSender

        renderer = JournaldRenderer(JournalSender())
    elif fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        # Resolve sys.stderr when a logger is made, not once: it may have been
        # replaced (tests capture it, the daemon may redirect it).
        logger_factory=lambda *_: structlog.PrintLogger(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
