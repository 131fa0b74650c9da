"""Guest-visible write latency while a backup runs: backups yield to the
guests (`priority: low`, the default) or run at the priority they were
started with (`priority: normal`), against no backup at all.

A running test-bed domain (TCG) with a 2 GiB qcow2 disk full of data (1 GiB
was backed up within a few dozen guest writes once backups got faster); the
guest's writes are 64 KiB `qemu-io` writes through its virtio device (HMP:
the path a guest write takes, copy-before-write included), timed from the
monitor, to offsets not written before (each one a first write during a
backup: the copy-before-write case). The backup is a full `virtbackup
backup` of that domain, started as a process, as an operator would.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import libvirt_qemu  # noqa: E402

from testbed.domains import DomainFactory, GuestDomain  # noqa: E402
from testbed.host import connect, ensure_libvirtd  # noqa: E402

MiB = 1 << 20
DISK = 2048 * MiB
WRITE = 64 * 1024


def _write_ms(td: GuestDomain, offset: int) -> float:
    disk = td.disk("vda")
    t0 = time.perf_counter()
    libvirt_qemu.qemuMonitorCommand(
        td.dom,
        f'qemu-io -d {disk.qdev} "write -P 0x5 {offset} {WRITE}"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
    )
    return (time.perf_counter() - t0) * 1000


def _probe(
    td: GuestDomain, start: int, count: int, until: subprocess.Popen[bytes] | None
) -> list[float]:
    out = []
    for i in range(count):
        if until is not None and until.poll() is not None:
            break
        out.append(_write_ms(td, start + i * 2 * WRITE))
        time.sleep(0.02)
    return out


def _backup(config: Path, td: GuestDomain) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(REPO / ".venv" / "bin" / "virtbackup"),
            "-c",
            str(config),
            "backup",
            "--full",
            td.name,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def guest_write_latency(work: Path, runs: int) -> str:
    ensure_libvirtd()
    work.chmod(0o711)  # QEMU reaches the scratch folders below
    factory = DomainFactory(connect())
    try:
        td = factory.create(qcow2_sizes=[DISK], start=False)
        src = work / "fill.raw"
        with src.open("wb") as f:
            for _ in range(DISK // (8 * MiB)):
                f.write(os.urandom(8 * MiB))
        subprocess.run(
            ["qemu-img", "convert", "-n", "-O", "qcow2", str(src), str(td.disk("vda").path)],
            check=True,
        )
        src.unlink()
        td.start()
        scenarios = {
            "backup, priority: normal": ("normal", None),
            "backup, priority: low": ("low", None),
            "backup, priority: low, bandwidth: 64MiB": ("low", "64MiB"),
        }
        rows: dict[str, list[float]] = {"no backup": []}
        rows |= {name: [] for name in scenarios}
        offset = 0
        for _ in range(runs):
            rows["no backup"] += _probe(td, offset, 100, None)
            offset += 100 * 2 * WRITE
            for i, (name, (prio, bandwidth)) in enumerate(scenarios.items()):
                run_dir = work / f"run-{i}"
                cfg = work / f"vb-{i}.yaml"
                policies = work / f"policies-{i}"
                policies.mkdir(exist_ok=True)
                if bandwidth:
                    (policies / "p.yaml").write_text(
                        f"domains: ['{td.name}']\nbandwidth: {bandwidth}\n"
                    )
                cfg.write_text(
                    f"state_dir: {work}/state-{i}\nbackup_root: {work}/backups-{i}\n"
                    f"runtime_dir: {run_dir}\nscratch_dir: {work}/scratch-{i}\n"
                    f"policy_dirs: [{policies}]\npriority: {prio}\n"
                )
                proc = _backup(cfg, td)
                time.sleep(0.5)  # into the copy
                rows[name] += _probe(td, offset, 400, proc)
                offset += 400 * 2 * WRITE
                _, err = proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(f"backup failed: {err.decode()}")
        lines = [
            "### Guest write latency during a backup",
            "",
            f"64 KiB guest writes (HMP qemu-io through the virtio device) to a "
            f"{DISK // (1024 * MiB)} GiB "
            f"qcow2 disk full of data, during a full `virtbackup backup --full` of it; "
            f"{runs} backups each. Milliseconds.",
            "",
            "| | writes | median | p90 | max |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, ms in rows.items():
            q = statistics.quantiles(ms, n=10) if len(ms) > 1 else ms * 9
            lines.append(
                f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {q[8]:.1f} | {max(ms):.1f} |"
            )
        return "\n".join(lines) + "\n"
    finally:
        factory.cleanup()
