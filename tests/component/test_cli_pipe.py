"""`virtbackup status | head -c 10`: the reader goes away, the CLI stops
quietly with 141, like any Unix filter (docs/cli.md). A catch-all for
OSError placed before the BrokenPipeError case made it "virtbackup: Broken
pipe", exit 1 (found by the hostile tester)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_reader_gone_away_is_exit_141_and_silent(tmp_path: Path) -> None:
    cfg = tmp_path / "vb.yaml"
    cfg.write_text(
        f"state_dir: {tmp_path / 'state'}\nruntime_dir: {tmp_path / 'run'}\n"
        f"scratch_dir: {tmp_path / 'scratch'}\npolicy_dirs: []\n"
    )
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first byte
    try:
        run = subprocess.run(
            [sys.executable, "-m", "virtbackupd.cli.main", "-c", str(cfg), "status"],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(w)
    assert run.returncode == 141, run.stderr
    assert run.stderr == "", run.stderr
