"""The CLI (and so the helpers it starts) runs at the yielded priority."""

from __future__ import annotations

import os
import subprocess
import sys

from virtbackupd.adapters.priority import LOW, io_priority

PROBE = """
import os, sys
from virtbackupd.adapters import priority
from virtbackupd.adapters.priority import Priority, io_priority
priority.apply(Priority(sys.argv[1]))
child = os.popen("cat /proc/self/stat").read().split()[18]  # a helper's nice
print(os.getpriority(os.PRIO_PROCESS, 0), *io_priority(), child)
"""


def run(arg: str, nice: int = 0) -> list[str]:
    out = subprocess.run(
        ["nice", "-n", str(nice), sys.executable, "-c", PROBE, arg],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


def test_low_priority_is_applied_and_inherited() -> None:
    assert run("low") == [str(LOW.nice), LOW.io_class, str(LOW.io_level), str(LOW.nice)]


def test_normal_leaves_the_priority_alone_and_low_never_raises_it() -> None:
    # Relative to this process's own niceness: an in-process CLI test run
    # earlier may have lowered it (the CLI applies its priority to itself).
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert run("normal")[0] == str(base)
    assert run("low", nice=15)[0] == str(min(base + 15, 19))


def test_io_priority_reads_this_process() -> None:
    cls, level = io_priority()
    assert cls in ("none", "best-effort", "idle", "realtime") and 0 <= level <= 7
