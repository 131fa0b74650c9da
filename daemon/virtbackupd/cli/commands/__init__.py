"""One module per `virtbackup` command (as borg's archiver/*_cmd.py): each
holds its arguments, its run function and its output, and says in its
`COMMAND` what it needs opened first. cli.main builds the parser and
dispatches from the table of these.

Every command module is loaded to build the parser, so what only its run
needs (restore, verification, live restore, mounting) is imported inside
that function: a command starts without loading every other one's code.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from virtbackupd.adapters.libvirt_conn import Libvirt
    from virtbackupd.adapters.store import Store
    from virtbackupd.config.daemon import DaemonConfig


class Needs(IntEnum):
    """What cli.main opens before a command runs, each level with those
    below it: the config read (and the host prepared), then the catalogue
    (checked to describe this repository), then a libvirt connection."""

    NOTHING = 0  # reads what it needs itself (`policy check` works without a config)
    CONFIG = 1
    STORE = 2
    LIBVIRT = 3


@dataclass(frozen=True)
class Session:
    """What cli.main opened for the command, by its Needs."""

    opened_config: DaemonConfig | None = None
    opened_store: Store | None = None
    lv: Libvirt | None = None  # None below Needs.LIBVIRT

    @property
    def config(self) -> DaemonConfig:
        assert self.opened_config is not None, "the command's Needs are below CONFIG"
        return self.opened_config

    @property
    def store(self) -> Store:
        assert self.opened_store is not None, "the command's Needs are below STORE"
        return self.opened_store

    @property
    def libvirt(self) -> Libvirt:
        assert self.lv is not None, "the command's Needs are below LIBVIRT"
        return self.lv


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Session], Awaitable[int]]
    # A function of the arguments where they decide it (restore).
    needs: Needs | Callable[[argparse.Namespace], Needs] = Needs.STORE
    # Bring the catalogue in line with the folders before it is read.
    reconcile: bool = False

    def needs_for(self, args: argparse.Namespace) -> Needs:
        return self.needs if isinstance(self.needs, Needs) else self.needs(args)


def no_arguments(_: argparse.ArgumentParser) -> None:
    """For a command that takes none beyond the global options."""


def backup_and_disks(p: argparse.ArgumentParser) -> None:
    """`[--backup ID | --at TIME] [--disk T ...]`: which backup, which disks
    (cli.recovery.chosen_backup reads them)."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--backup", metavar="ID", help="this backup (default: the newest)")
    which.add_argument(
        "--at", metavar="TIME", help="the newest backup started at or before TIME (ISO 8601)"
    )
    p.add_argument(
        "--disk", action="append", default=[], metavar="TARGET", help="only this disk (repeat)"
    )
