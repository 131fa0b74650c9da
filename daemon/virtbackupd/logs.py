"""structlog setup: console on stderr, JSON lines, or journald's native
fields (the daemon under systemd)."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import structlog

from virtbackupd.errors import REPORT_BUG, ConfigError, InternalError, VirtBackupError

#: syslog's NOTICE, between info and warning: normal but significant (an
#: operator's cancel). structlog has no such level; our loggers get a
#: `notice` method (`wrapper_class`), and the journal PRIORITY 5.
NOTICE = 25

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: Called before each log line is written: a progress line redrawn in place
#: on the same terminal (cli.progress) clears itself there, or the log
#: line would continue it. None when nothing is drawn.
before_line: Callable[[], None] | None = None


class _StderrLogger(structlog.PrintLogger):
    """structlog's PrintLogger, letting a progress line get out of the way."""

    def msg(self, message: str) -> None:
        if before_line is not None:
            before_line()
        super().msg(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def wrapper_class(min_level: int) -> type[Any]:
    """structlog's filtering logger for `min_level`, with `notice`."""
    base = structlog.make_filtering_bound_logger(min_level)

    def notice(self: Any, event: str, *args: Any, **kw: Any) -> Any:
        if min_level > NOTICE:
            return None
        try:
            out, out_kw = self._process_event("notice", event % args if args else event, kw)
        except structlog.DropEvent:  # the journal renderer sent it
            return None
        # The output loggers (PrintLogger, ...) have no `notice`: `msg`
        # writes any level's rendered line.
        return self._logger.msg(*out, **out_kw)

    return type("BoundLoggerWithNotice", (base,), {"notice": notice})


# Loggers used before configure() (tests that run the engine in-process, a
# library caller) have `notice` too; configure() keeps it.
structlog.configure(wrapper_class=wrapper_class(logging.NOTSET))


def daemon_format(configured: str) -> str:
    """`auto` means journald when systemd connected our output to it
    ($JOURNAL_STREAM), else the console."""
    if configured == "auto":
        return "journal" if os.environ.get("JOURNAL_STREAM") else "console"
    return configured


def configure(level: str = "info", fmt: str = "console") -> None:
    """Raises ConfigError when `fmt` is journal and there is no journal."""
    renderer: structlog.typing.Processor
    if fmt == "journal":
        from virtbackupd.adapters.journald import JOURNAL_SOCKET, JournaldRenderer, JournalSender

        if not os.path.exists(JOURNAL_SOCKET):  # noqa: PTH110 (a socket path, not a file we read)
            raise ConfigError(
                f"log.format is 'journal' but there is no journald socket at {JOURNAL_SOCKET}; "
                "use 'auto' (journald only when systemd connected it) or 'console'"
            )
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
            # A traceback only where a log call passes exc_info (unexpected
            # errors); expected ones are one line with their reason.
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=wrapper_class(LEVELS.get(level, logging.INFO)),
        # Resolve sys.stderr when a logger is made, not once: it may have been
        # replaced (tests capture it, the daemon may redirect it).
        logger_factory=lambda *_: _StderrLogger(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def is_bug(exc: BaseException) -> bool:
    """Not an error of ours for an operator (an InternalError, or anything
    no adapter translated): logged with its traceback. An interruption
    (KeyboardInterrupt, SystemExit) is none, and neither is the host
    refusing a file operation (OSError: a full or read-only file system, a
    vanished folder), which is the operator's to fix: see host_refusal."""
    return isinstance(exc, Exception) and not isinstance(exc, VirtBackupError | OSError)


def host_refusal(exc: OSError) -> str:
    """The host's refusal of a file operation in one line: the file and the
    system's words ("/srv/backups/x: Read-only file system")."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def bug_text(exc: BaseException) -> str:
    """A bug in one line: its type and words."""
    return f"internal error: {type(exc).__name__}: {exc}"


def failure(logger: Any, event: str, exc: BaseException, /, **fields: Any) -> None:
    """Log `event` at error level for `exc`. An operator's error is one line
    whose keys include the error's context (domain, backup_id, disk, path,
    libvirt_code: journal fields DOMAIN=, PATH=, LIBVIRT_CODE=, ...) and
    `error` (its words, unless given); `fields`, and the keys bound to
    `logger` (a job's domain and backup id), win over the context. A bug
    comes with its traceback and a `bug` key asking for a report."""
    bound = structlog.get_context(logger)
    context: dict[str, Any] = {}
    if isinstance(exc, VirtBackupError):
        context = {k: v for k, v in exc.context.items() if k not in bound}
    elif isinstance(exc, OSError) and exc.filename:
        context = {"path": str(exc.filename)}
    context.update(fields)
    if is_bug(exc):
        context.setdefault("error", bug_text(exc))
        context["bug"] = "a bug in virtbackupd: please report it with this traceback"
        context["exc_info"] = exc
    elif isinstance(exc, OSError):
        context.setdefault("error", host_refusal(exc))
    else:
        context.setdefault("error", str(exc) or type(exc).__name__)
    logger.error(event, **context)


def exit_status(prog: str, exc: Exception) -> int:
    """What a command (`prog`: virtbackup, virtbackupd) says on stderr when
    `exc` ends it, and its exit code: an operator's error is one line and
    its class's `exit_code`; a bug is its traceback, a line asking for a
    report, and InternalError's exit code (1)."""
    if isinstance(exc, VirtBackupError):
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, OSError):
        print(f"{prog}: {host_refusal(exc)}", file=sys.stderr)
        return 1
    traceback.print_exception(exc, file=sys.stderr)
    print(f"{prog}: {bug_text(exc)}; {REPORT_BUG}", file=sys.stderr)
    return InternalError.exit_code
