"""The console scripts answer --version and --help."""

from __future__ import annotations

import pytest

from virtbackupd import __version__
from virtbackupd.cli.main import main as cli_main
from virtbackupd.daemon.main import main as daemon_main


def test_daemon_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        daemon_main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"virtbackupd {__version__}"


def test_cli_help_names_global_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out
    assert "--config" in out


def test_cli_without_command_is_a_usage_error() -> None:
    assert cli_main([]) == 2
