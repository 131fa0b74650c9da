"""Where habit puts options (issue 24, item 7): `-c` and `--json` work
before or after the command, as docs/cli.md and docs/operations.md write
them; no option is taken from an abbreviation (`--ful` was a full backup,
`--forc` a `--force`); a usage error is one line on stderr, exit 2."""

from __future__ import annotations

import argparse

import pytest

from virtbackupd.cli.main import build_parser, main

#: Each command with the arguments it needs to parse.
COMMANDS: dict[str, list[str]] = {
    "backup": ["backup", "vm"],
    "list": ["list"],
    "checkpoints": ["checkpoints", "vm"],
    "restore": ["restore", "vm", "--to", "/tmp/x"],
    "prune": ["prune"],
    "verify": ["verify"],
    "mount": ["mount", "vm", "/mnt/x"],
    "umount": ["umount", "/mnt/x"],
    "reindex": ["reindex"],
    "status": ["status"],
    "cancel": ["cancel", "vm"],
    "forget-checkpoints": ["forget-checkpoints", "vm"],
    "policy": ["policy", "check"],
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_the_table_names_every_command() -> None:
    assert set(COMMANDS) == set(_subparsers(build_parser()))


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("place", ["before", "after", "at the end"], ids=["before", "after", "end"])
def test_global_options_work_before_or_after_the_command(command: str, place: str) -> None:
    argv = COMMANDS[command]
    glob = ["-c", "/etc/x.yaml", "--json"]
    if place == "before":
        full = [*glob, *argv]
    elif place == "after":
        full = [argv[0], *glob, *argv[1:]]
    else:
        full = [*argv, *glob]
    args = build_parser().parse_args(full)
    assert args.config == "/etc/x.yaml"
    assert args.json is True


def test_without_global_options_the_defaults_hold() -> None:
    args = build_parser().parse_args(["list"])
    assert args.config is None
    assert args.json is False


def test_the_config_given_after_the_command_wins() -> None:
    """Given twice, the one nearer the end wins, as for any repeated option."""
    args = build_parser().parse_args(["-c", "/a.yaml", "list", "-c", "/b.yaml"])
    assert args.config == "/b.yaml"
    args = build_parser().parse_args(["--json", "list"])
    assert args.json is True  # --json before stays on when not repeated after


@pytest.mark.parametrize(
    "argv",
    [
        ["backup", "vm", "--ful"],
        ["restore", "vm", "--to", "/tmp/x", "--forc"],
        ["restore", "vm", "--to", "/tmp/x", "--def", "new"],
        ["restore", "vm", "--in-pl"],
        ["--jso", "list"],
        ["--conf", "/x.yaml", "list"],
        ["list", "--al"],
        ["prune", "--dry"],
        ["verify", "--filesys"],
        ["list", "--js"],
        ["policy", "check", "--js"],
    ],
    ids=lambda a: " ".join(a),
)
def test_abbreviations_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert ": error: " in err, err


def test_a_usage_error_is_one_line_naming_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["restore", "vm"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("virtbackup restore: error: "), err
    assert "virtbackup restore --help" in err, err


def test_the_daemon_takes_no_abbreviation_either() -> None:
    from virtbackupd.daemon.main import build_parser as daemon_parser

    with pytest.raises(SystemExit) as exc:
        daemon_parser().parse_args(["--conf", "/x.yaml"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["list", "--ful"], "virtbackup list --help"),
        (["backup", "vm", "--forc"], "virtbackup backup --help"),
        (["policy", "check", "--x"], "virtbackup policy check --help"),
    ],
)
def test_an_unknown_option_names_its_commands_help(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/cli.md: a usage error is one line naming the command's own
    --help (the first-week run got `virtbackup --help` for `list --ful`)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and f"`{named}`" in err, err
