"""Running `virtbackup` in-process from a test."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from virtbackupd.cli.main import main as cli


class CliRun(NamedTuple):
    """One in-process `virtbackup` run: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str

    def joined(self) -> tuple[int, str]:
        """(exit status, stdout and stderr together), for checks that do not
        care which stream a line went to."""
        return self.returncode, self.stdout + self.stderr


def cli_in_process(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> CliRun:
    """`virtbackup -c CONFIG ARGS...` in this process. An exception other
    than the CLI's own fails the test here, and so does a traceback in its
    output: an operator must never see one."""
    capsys.readouterr()
    rc = cli(["-c", str(config), *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return CliRun(rc, out, err)


async def cli_in_thread(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> CliRun:
    """`cli_in_process` from a coroutine: the CLI runs its own event loop,
    so it gets a worker thread while the test's loop keeps running."""
    return await asyncio.to_thread(cli_in_process, capsys, config, *args)


def run_cli(config: Path, capsys: pytest.CaptureFixture[str], *args: str, expect: int = 0) -> Any:
    """`virtbackup -c CONFIG --json ARGS...`; asserts the exit status and
    returns the parsed JSON (None when nothing was printed)."""
    capsys.readouterr()
    rc = cli(["-c", str(config), "--json", *args])
    out, err = capsys.readouterr()
    assert rc == expect, f"virtbackup {' '.join(args)} exited {rc}: {err}"
    return json.loads(out) if out.strip() else None
