"""Running `virtbackup` in-process from a test, with JSON output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from virtbackupd.cli.main import main as cli


def run_cli(config: Path, capsys: pytest.CaptureFixture[str], *args: str, expect: int = 0) -> Any:
    """`virtbackup -c CONFIG --json ARGS...`; asserts the exit status and
    returns the parsed JSON (None when nothing was printed)."""
    capsys.readouterr()
    rc = cli(["-c", str(config), "--json", *args])
    out, err = capsys.readouterr()
    assert rc == expect, f"virtbackup {' '.join(args)} exited {rc}: {err}"
    return json.loads(out) if out.strip() else None
