"""Entry point of the `virtbackup` command.

Global options go before or after the command: ``virtbackup [-c CONFIG]
[--json] COMMAND ...`` or ``virtbackup COMMAND ... [-c CONFIG] [--json]``
(given twice, the later one wins). No option is taken from an
abbreviation. Every failure ends with one clear line on stderr and a
non-zero exit: 1 for a failed operation, 2 for bad input (usage, config,
an unknown domain, backup, disk or time).

Each command lives in its own module under cli.commands (its arguments,
its run function, what it needs opened); this module holds the global
options, the table of commands and what every command goes through
before it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from virtbackupd import __version__, logs
from virtbackupd.adapters import host_folders, libvirt_conn, priority
from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.store import Store
from virtbackupd.cli.catalogue import check_catalogue, reconcile_catalogue
from virtbackupd.cli.commands import (
    Command,
    Needs,
    Session,
    backup,
    cancel,
    checkpoints,
    forget_checkpoints,
    mount,
    policy,
    prune,
    reindex,
    restore,
    status,
    umount,
    verify,
)
from virtbackupd.cli.commands import list as list_
from virtbackupd.config.daemon import config_path, load_config
from virtbackupd.engine.recovery.leftovers import sweep_runtime
from virtbackupd.errors import (
    VirtBackupError,
)

#: Every command, in the order `virtbackup --help` lists them.
COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        backup.COMMAND,
        list_.COMMAND,
        checkpoints.COMMAND,
        restore.COMMAND,
        prune.COMMAND,
        verify.COMMAND,
        mount.COMMAND,
        umount.COMMAND,
        reindex.COMMAND,
        status.COMMAND,
        cancel.COMMAND,
        forget_checkpoints.COMMAND,
        policy.COMMAND,
    )
}


class _Parser(argparse.ArgumentParser):
    """No abbreviations (`--ful` is not `--full`, `--forc` not `--force`:
    an option an operator did not write in full is a typo, not a wish),
    and a usage error is one line naming the help. Subparsers are made of
    the same class (argparse's default `parser_class`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """`-c` and `--json`, on the main parser and on every command: habit
    (and docs/operations.md) puts them after the command too. On a command
    their default is SUPPRESS, so one given before the command stays
    unless given again after it (then the later one wins)."""
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="daemon config file (default: $VIRTBACKUPD_CONFIG, else "
        "/etc/virtbackupd/virtbackupd.yaml)",
        **default,
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print machine-readable JSON instead of text",
        **default,
    )


def _commands(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command's parser below `p` (`policy` and `policy check` too)."""
    out = []
    for action in p._actions:  # argparse lists its subparsers nowhere else
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out += [child, *_commands(child)]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="virtbackup",
        description="Operate virtbackupd: back up, list, restore and verify libvirt domains.",
    )
    parser.add_argument("--version", action="version", version=f"virtbackup {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS.values():
        c.add_arguments(sub.add_parser(c.name, help=c.help))
    for command in _commands(parser):
        _global_options(command, suppress=True)
        # Whose usage error an unknown option is (the innermost wins).
        command.set_defaults(usage_of=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Named by the command it was given to (`virtbackup list --ful`
        # points at `virtbackup list --help`, not the list of commands).
        getattr(args, "usage_of", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        # One line, as every usage error (the list of commands is --help's).
        print("virtbackup: error: give a command (see `virtbackup --help`)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except VirtBackupError as exc:
        # One line; the code is the class's (InputError and kin: 2).
        return logs.exit_status("virtbackup", exc)
    except KeyboardInterrupt:
        print("virtbackup: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`virtbackup status | head`): stop quietly
        # like any Unix filter; keep Python from complaining at exit too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell shows for such a filter
    except OSError as exc:  # after BrokenPipeError, one of its kind
        # The host refused a file operation that no check foresaw (a full
        # or read-only file system, a vanished folder): its words, one line.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"virtbackup: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 (a bug: its traceback and a request to report it)
        return logs.exit_status("virtbackup", exc)


async def _run(args: argparse.Namespace) -> int:
    command = COMMANDS[args.command]
    needs = command.needs_for(args)
    if needs is Needs.NOTHING:
        return await command.run(args, Session())
    config = load_config(config_path(args.config))
    # QEMU passes through runtime_dir and scratch_dir to its job folders:
    # made 0711 whatever this shell's umask (an existing one keeps its mode).
    host_folders.make_passable(config.runtime_dir)
    host_folders.make_passable(config.scratch_dir)
    priority.apply(config.priority)
    libvirt_conn.configure(config.libvirt_timeout)
    logs.configure(config.log_level, "json" if args.json else "console")
    await sweep_runtime(config.runtime_dir)  # what killed commands left
    if needs is Needs.CONFIG:
        return await command.run(args, Session(config))
    async with Store.open(config.state_db) as store:
        await check_catalogue(config, store)
        if command.reconcile:
            await reconcile_catalogue(config, store)
        if needs is Needs.STORE:
            return await command.run(args, Session(config, store))
        async with await Libvirt.open(config.libvirt_uri) as lv:
            return await command.run(args, Session(config, store, lv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
