"""What a small backup costs before its first byte moves, and whose it is.

`virtbackup backup --full` of a running test-bed domain with a 64 MiB disk
holding 1 MiB, run as an operator runs it, with debug logs as JSON lines.
Its job logs each state with a timestamp; the wall clock just before the
process starts is the zero:

- start to "exporting": interpreter, imports, config, state database,
  libvirt connection, plan (ours);
- "exporting" to "pull job started": libvirt and QEMU start the pull-mode
  job (checkpoint, export, scratch): not ours, the same for any client;
- "pull job started" to "copying": target images made, sizes (ours).

An empty interpreter's start (`python -c pass`) is shown beside it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from testbed.domains import DomainFactory  # noqa: E402
from testbed.host import connect, ensure_libvirtd  # noqa: E402
from testbed.tools import qemu_io  # noqa: E402

MiB = 1 << 20
PYTHON = str(REPO / ".venv" / "bin" / "python")
VIRTBACKUP = str(REPO / ".venv" / "bin" / "virtbackup")


def _stamps(stderr: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        name = entry.get("state") or entry.get("event")
        if name and "timestamp" in entry and name not in out:
            out[name] = datetime.fromisoformat(entry["timestamp"]).timestamp()
    return out


def _one(work: Path, domain: str, n: int) -> dict[str, float]:
    d = work / f"fb-{n}"
    (d / "policies").mkdir(parents=True)
    d.chmod(0o711)  # QEMU (libvirt-qemu) passes through to its job folders (root's folders only)
    cfg = d / "vb.yaml"
    cfg.write_text(
        f"state_dir: {d}/state\nbackup_root: {d}/backups\nruntime_dir: {d}/run\n"
        f"scratch_dir: {d}/scratch\npolicy_dirs: [{d}/policies]\nlog: {{level: debug}}\n"
    )
    try:
        t0 = time.time()
        proc = subprocess.run(
            [VIRTBACKUP, "-c", str(cfg), "--json", "backup", "--full", domain],
            capture_output=True,
            text=True,
            check=True,
        )
        total = time.time() - t0
        s = _stamps(proc.stderr)
        return {
            "ours before the job": s["exporting"] - t0,
            "libvirt's job start": s["pull job started"] - s["exporting"],
            "ours after the job start": s["copying"] - s["pull job started"],
            "whole backup": total,
        }
    finally:
        subprocess.run(
            [VIRTBACKUP, "-c", str(cfg), "forget-checkpoints", domain], capture_output=True
        )
        shutil.rmtree(d)


def first_byte_costs(work: Path, runs: int) -> str:
    ensure_libvirtd()
    work.chmod(0o755)
    factory = DomainFactory(connect())
    try:
        td = factory.create(qcow2_sizes=[64 * MiB], start=False)
        qemu_io(td.disk("vda").path, "write -P 0x5a 0 1M")
        td.start()
        _one(work, td.name, 0)  # warm the page cache: the figures are for a warm host
        results = [_one(work, td.name, i + 1) for i in range(runs)]
    finally:
        factory.cleanup()
    starts = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run([PYTHON, "-c", "pass"], check=True)
        starts.append(time.monotonic() - t0)
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    ours = med["ours before the job"] + med["ours after the job start"]
    rows = [
        ("an empty Python interpreter's start", statistics.median(starts)),
        *med.items(),
        ("before the first byte, of our making", ours),
    ]
    out = [
        "### A small backup: time before the first byte moves",
        "",
        f"`virtbackup backup --full` of a running domain, 64 MiB disk with 1 MiB of data; "
        f"warm page cache; medians of {runs} runs.",
        "",
        "| part | seconds |",
        "| --- | ---: |",
        *(f"| {name} | {secs:.3f} |" for name, secs in rows),
    ]
    for name, secs in rows:
        print(f"  first byte: {name}: {secs:.3f}s", file=sys.stderr)
    return "\n".join(out) + "\n"
