"""The table of commands (issue 25: one module per command, a table not an
if-chain): each command opens what it did when cli.main dispatched by
name (the config, the catalogue checked and perhaps reconciled, libvirt),
and building the parser loads no command's run-time code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from virtbackupd.cli.commands import Needs
from virtbackupd.cli.main import COMMANDS, build_parser

#: argv -> (what is opened first, whether the catalogue is reconciled):
#: what the if-chain in cli.main._run did before the table.
OPENED: dict[tuple[str, ...], tuple[Needs, bool]] = {
    ("policy", "check"): (Needs.NOTHING, False),
    ("reindex",): (Needs.CONFIG, False),
    ("umount", "/mnt/x"): (Needs.STORE, False),
    ("mount", "vm", "/mnt/x"): (Needs.STORE, True),
    ("list",): (Needs.STORE, True),
    ("status",): (Needs.STORE, True),
    ("verify",): (Needs.STORE, True),
    ("prune",): (Needs.STORE, True),
    ("cancel", "vm"): (Needs.STORE, False),
    # A plain --to restore works with libvirt down; the others need it.
    ("restore", "vm", "--to", "/tmp/x"): (Needs.STORE, True),
    ("restore", "vm", "--to", "/tmp/x", "--define", "new"): (Needs.LIBVIRT, True),
    ("restore", "vm", "--to", "/tmp/x", "--define", "new", "--live"): (Needs.LIBVIRT, True),
    ("restore", "vm", "--in-place"): (Needs.LIBVIRT, True),
    ("restore", "vm", "--to-device", "/dev/x", "--disk", "vda"): (Needs.LIBVIRT, True),
    ("backup", "vm"): (Needs.LIBVIRT, False),
    ("checkpoints", "vm"): (Needs.LIBVIRT, False),
    ("forget-checkpoints", "vm"): (Needs.LIBVIRT, False),
}


@pytest.mark.parametrize("argv", sorted(OPENED), ids=" ".join)
def test_each_command_opens_what_it_needs(argv: tuple[str, ...]) -> None:
    args = build_parser().parse_args(list(argv))
    command = COMMANDS[args.command]
    assert (command.needs_for(args), command.reconcile) == OPENED[argv]


def test_every_command_is_in_the_table_once() -> None:
    assert {argv[0] for argv in OPENED} == set(COMMANDS)
    assert all(name == c.name for name, c in COMMANDS.items())


def test_building_the_parser_loads_no_commands_run_time_code() -> None:
    """A command starts without loading what only other commands run
    (cli.commands' docstring): checked in a fresh interpreter."""
    heavy = [
        "virtbackupd.engine.restore",
        "virtbackupd.engine.define",
        "virtbackupd.engine.live_restore",
        "virtbackupd.engine.guest_view",
        "virtbackupd.engine.upkeep.verify",
        "virtbackupd.daemon.status_file",
        "virtbackupd.adapters.block_devices",
        "virtbackupd.cli.recovery",
    ]
    code = (
        "import sys\n"
        "from virtbackupd.cli.main import build_parser\n"
        "build_parser()\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "", done.stdout
