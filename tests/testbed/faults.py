"""Killing a `virtbackup` command (SIGKILL) at a random instant of its
run, and the checks that must hold afterwards.

The instant is drawn, from a seeded generator, within the command's
normal duration measured on the same machine first, so the kills land
all along the run rather than at the steps a test chose. The seed is
printed; ``VBT_FAULT_SEED=N`` replays a run, ``VBT_FAULT_ITERATIONS=N``
changes how many kills a test makes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED_ENV = "VBT_FAULT_SEED"
ITERATIONS_ENV = "VBT_FAULT_ITERATIONS"
#: The helper programs virtbackupd starts (none may outlive its command).
HELPERS = ("qemu-nbd", "qemu-img", "qemu-storage-daemon")
#: Where export folders are, below a runtime dir (adapters.nbd_folders).
FOLDER_PATTERNS = ("nbd-*", "jobs/*/nbd-*")


def fault_rng(what: str) -> random.Random:
    """A generator seeded from $VBT_FAULT_SEED or at random; the seed is
    printed (pytest shows it with the failure) so that a run can be replayed."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    print(f"{what}: fault seed {seed} (replay with {SEED_ENV}={seed})")
    return random.Random(seed)


def iterations(default: int) -> int:
    return int(os.environ.get(ITERATIONS_ENV) or default)


@dataclass(frozen=True)
class Cli:
    """`virtbackup -c CONFIG` as a separate process (one that can be killed)."""

    config: Path

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "virtbackupd.cli.main", "-c", str(self.config), *args]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def run(
        self, *args: str, expect: int = 0, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args), env=self.env(), capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip
        assert proc.returncode == expect, (
            f"virtbackup {' '.join(args)} exited {proc.returncode} (expected {expect}):\n"
            f"{proc.stderr[-3000:]}\n{proc.stdout[-3000:]}"
        )
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run("--json", *args).stdout)

    def duration(self, *args: str) -> float:
        """How long the command takes when nobody kills it (it must succeed)."""
        started = time.monotonic()
        self.run(*args)
        return time.monotonic() - started


@dataclass(frozen=True)
class Kill:
    args: tuple[str, ...]
    after: float  # seconds after the start
    pid: int
    killed: bool  # False: it had finished before the instant came

    def __str__(self) -> str:
        what = "killed" if self.killed else "finished before being killed"
        return f"virtbackup {' '.join(self.args)} {what} at {self.after:.3f}s (pid {self.pid})"


def kill_at(cli: Cli, args: Sequence[str], after: float) -> Kill:
    """Start the command and SIGKILL it `after` seconds later."""
    proc = subprocess.Popen(
        cli.argv(*args), env=cli.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return Kill(tuple(args), after, proc.pid, killed=proc.returncode == -signal.SIGKILL)
    return Kill(tuple(args), after, proc.pid, killed=False)


@dataclass(frozen=True)
class Helper:
    pid: int
    ppid: int
    argv: tuple[str, ...]


def helpers_naming(paths: Iterable[Path]) -> list[Helper]:
    """Running qemu-nbd/qemu-img/qemu-storage-daemon processes whose
    command line names something below one of `paths`."""
    roots = [str(p) for p in paths]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0")[:-1])
        fields = stat.rpartition(")")[2].split()
        if not argv or fields[0] in ("Z", "X") or Path(argv[0]).name not in HELPERS:
            continue
        if any(root in a for a in argv for root in roots):
            found.append(Helper(int(entry.name), int(fields[1]), argv))
    return found


def assert_no_helpers(paths: Iterable[Path], about: object, wait: float = 10.0) -> None:
    """No helper naming `paths` runs (waiting up to `wait` s for those
    already told to go). Survivors are killed, so that one failure does
    not spoil the next test, and reported."""
    paths = list(paths)
    deadline = time.monotonic() + wait
    while (left := helpers_naming(paths)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for h in left:
        os.kill(h.pid, signal.SIGKILL)
    assert not left, f"{about}: helpers outlived it: " + "; ".join(
        f"pid {h.pid} (parent {h.ppid}) {' '.join(h.argv)}" for h in left
    )


def export_folders(runtime_dir: Path) -> list[Path]:
    return sorted(f for p in FOLDER_PATTERNS for f in runtime_dir.glob(p))
