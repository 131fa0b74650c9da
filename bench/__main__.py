"""`make bench`: the copy engine against nbdcopy (and qemu-img convert) in
one run, on the same kind of qemu-nbd exports; then incremental cost by
dirty fraction, and an incremental of an unchanged 1 TiB sparse disk; guest
write latency during a backup; recovery times (live restore against
restore-then-start, mount against restore-and-loop-mount).

    python -m bench [--size-gib 4] [--runs 3] [--fills random,half,fragmented]

Every target is checked with `qemu-img compare` against its source.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.end_to_end import full_backups_end_to_end
from bench.first_byte import first_byte_costs
from bench.guest_latency import guest_write_latency
from bench.prune_cost import prune_costs
from bench.recovery import recovery_times

MiB = 1024 * 1024
GiB = 1024 * MiB
REPO = Path(__file__).resolve().parents[1]


def sh(*args: str | Path) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


@dataclass
class Sample:
    seconds: float
    client_cpu: float
    server_cpu: float
    rss_mib: float
    data: int


@dataclass
class Row:
    name: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        values: list[float] = [getattr(s, attr) for s in self.samples]
        return statistics.median(values)


def wait_cpu(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """Wait for a child; its (cpu seconds, peak RSS MiB)."""
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


class Server:
    def __init__(
        self, image: Path, sock: Path, readonly: bool, opts: list[str], bitmap: str | None = None
    ) -> None:
        argv = ["qemu-nbd", "-t", "-f", "qcow2", "-x", "disk", "-e", "0", "-k", str(sock), *opts]
        if readonly:
            argv.append("-r")
        if bitmap:
            argv += ["-B", bitmap]
        self.sock = sock
        self.proc = subprocess.Popen([*argv, str(image)], stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while subprocess.run(
            ["nbdinfo", "--can", "connect", self.uri], capture_output=True, check=False
        ).returncode:
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd for {image} did not start")
            time.sleep(0.05)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.sock}"

    def stop(self) -> float:
        self.proc.terminate()
        cpu, _ = wait_cpu(self.proc)
        self.sock.unlink(missing_ok=True)
        return cpu


def drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def make_source(path: Path, kind: str, size: int) -> int:
    """Create a source image; returns its allocated data bytes."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    if kind in ("random", "half"):
        # qemu-io refuses single requests of 2 GiB and more: write in 1 GiB steps.
        data = size if kind == "random" else size // 2
        cmds = []
        for off in range(0, data, GiB):
            cmds += ["-c", f"write -s /dev/urandom {off} {min(GiB, data - off)}"]
        sh("qemu-io", "-f", "qcow2", *cmds, path)
        return data
    # fragmented: 64 KiB of data every 128 KiB, in runs of random length
    rng = random.Random(1)
    cmds, pos, data = [], 0, 0
    while pos < size:
        n = min(rng.choice([64, 64, 128, 192]) * 1024, size - pos)
        cmds += ["-c", f"write -P 0x{rng.randint(1, 255):02x} {pos} {n}"]
        data += n
        pos += n + rng.choice([64, 128, 256]) * 1024
    for i in range(0, len(cmds), 4000):
        sh("qemu-io", "-f", "qcow2", *cmds[i : i + 4000], path)
    return data


def make_target(work: Path, size: int, backing: Path | None) -> Path:
    """A fresh target image: standalone, or an overlay on `backing`."""
    dst = work / "dst.qcow2"
    dst.unlink(missing_ok=True)
    if backing:
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing.name, "-F", "qcow2", dst)
    else:
        sh("qemu-img", "create", "-q", "-f", "qcow2", dst, str(size))
    return dst


def one_copy(
    tool: str,
    src: Path,
    work: Path,
    size: int,
    target_opts: list[str],
    extra: list[str],
    data: int,
    bitmap: str | None = None,
    backing: Path | None = None,
) -> Sample:
    dst = make_target(work, size, backing)
    drop_caches()
    s = Server(src, work / "s.sock", True, [], bitmap)
    t = Server(dst, work / "t.sock", False, target_opts) if tool != "convert" else None
    start = time.monotonic()
    if tool == "nbdcopy":
        assert t is not None
        proc = subprocess.Popen(["nbdcopy", *extra, s.uri, t.uri], stdout=subprocess.DEVNULL)
    elif tool == "engine":
        assert t is not None
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.engine_copy", str(s.sock), str(t.sock), *extra],
            stdout=subprocess.PIPE,
        )
    else:  # qemu-img convert straight into a qcow2 file
        dst.unlink()
        proc = subprocess.Popen(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *extra, s.uri, str(dst)]
        )
    client_cpu, rss = wait_cpu(proc)
    seconds = time.monotonic() - start
    if proc.returncode:
        raise RuntimeError(f"{tool} failed with {proc.returncode}")
    server_cpu = s.stop() + (t.stop() if t else 0.0)
    if not bitmap:
        sh("qemu-img", "compare", "-q", src, dst)  # byte-identical or the run fails
    return Sample(seconds, client_cpu, server_cpu, rss, data)


def table(title: str, rows: list[Row], size: int, baseline: dict[str, float]) -> str:
    out = [
        f"\n### {title}\n",
        "| variant | seconds | MiB/s of disk | MiB/s of data | client CPU s | all CPU s "
        "| peak RSS MiB | vs nbdcopy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sec = r.median("seconds")
        base = baseline.get(r.name.split(" ")[-1], baseline.get("default"))
        ratio = f"{base / sec:.2f}" if base else "-"
        client = r.median("client_cpu")
        total = client + r.median("server_cpu")
        data_rate = r.samples[0].data / MiB / sec
        out.append(
            f"| {r.name} | {sec:.2f} | {size / MiB / sec:.0f} | {data_rate:.0f} "
            f"| {client:.2f} | {total:.2f} | {r.median('rss_mib'):.0f} | {ratio} |"
        )
    return "\n".join(out)


VARIANTS = [
    # (name, tool, target qemu-nbd options, tool options); the last word of a
    # name is the target setup it is compared under.
    ("nbdcopy default", "nbdcopy", [], []),
    ("engine 1conn default", "engine", [], []),
    ("engine 2conn default", "engine", [], ["--connections", "2"]),
    # cache=none: the TESTBED notes measured gains for both clients with it.
    ("nbdcopy cache=none", "nbdcopy", ["--cache=none"], []),
    ("engine 2conn cache=none", "engine", ["--cache=none"], ["--connections", "2"]),
    # unsafe: qemu-nbd ignores flushes; durability would then come from an
    # fsync of the image after qemu-nbd exits (see docs/performance.md).
    ("nbdcopy cache=unsafe", "nbdcopy", ["--cache=unsafe"], []),
    ("engine 2conn cache=unsafe", "engine", ["--cache=unsafe"], ["--connections", "2"]),
    ("qemu-img-convert file", "convert", [], []),
]


def full_copies(work: Path, size: int, fills: list[str], runs: int) -> str:
    out = []
    for fill in fills:
        src = work / f"src-{fill}.qcow2"
        print(f"building {fill} source ({size / GiB:.0f} GiB)...", file=sys.stderr)
        data = make_source(src, fill, size)
        rows = []
        for name, tool, topts, extra in VARIANTS:
            row = Row(name)
            for _ in range(runs):
                row.samples.append(one_copy(tool, src, work, size, topts, extra, data))
            print(f"  {fill:10} {name:26} {row.median('seconds'):.2f}s", file=sys.stderr)
            rows.append(row)
        baseline = {
            r.name.split(" ")[-1]: r.median("seconds") for r in rows if r.name.startswith("nbdcopy")
        }
        out.append(
            table(
                f"{fill} fill: {data / MiB:.0f} MiB of data in a {size / GiB:.0f} GiB disk",
                rows,
                size,
                baseline,
            )
        )
        src.unlink()
    return "\n".join(out)


def incremental_costs(work: Path, size: int, runs: int) -> str:
    src = work / "src-inc.qcow2"
    base = work / "base.qcow2"
    make_source(src, "half", size)
    shutil.copy(src, base)  # the "full backup" the overlays sit on
    lines = [
        "\n### Incremental cost by dirty fraction\n",
        f"Same {size / GiB:.0f} GiB half-allocated disk; dirty 1 MiB blocks at random "
        "places; engine, 1 connection, into a qcow2 overlay.\n",
        "| dirty | dirty MiB | seconds | bytes read MiB | read/dirty | client CPU s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    rng = random.Random(2)
    for frac in (0.01, 0.10, 0.50):
        sh("qemu-img", "bitmap", "--add", src, f"d{int(frac * 100)}")
        blocks = rng.sample(range(size // MiB), int(size // MiB * frac))
        cmds = []
        for b in blocks:
            cmds += ["-c", f"write -P 0x5c {b * MiB} {MiB}"]
        for i in range(0, len(cmds), 4000):
            sh("qemu-io", "-f", "qcow2", *cmds[i : i + 4000], src)
        dirty = len(blocks) * MiB
        samples = [
            one_copy(
                "engine",
                src,
                work,
                size,
                [],
                ["--bitmap", f"d{int(frac * 100)}", "--zero", "write-zeroes"],
                dirty,
                bitmap=f"d{int(frac * 100)}",
                backing=base,
            )
            for _ in range(runs)
        ]
        sec = statistics.median(s.seconds for s in samples)
        cpu = statistics.median(s.client_cpu for s in samples)
        # bytes read come from the engine's own report in a last run
        read = engine_report(src, work, size, f"d{int(frac * 100)}", base)["read"]
        lines.append(
            f"| {frac:.0%} | {dirty / MiB:.0f} | {sec:.2f} | {read / MiB:.0f} | "
            f"{read / dirty:.2f} | {cpu:.2f} |"
        )
        sh("qemu-img", "bitmap", "--remove", src, f"d{int(frac * 100)}")
        # each fraction is measured against a fresh bitmap
    src.unlink()
    base.unlink()
    return "\n".join(lines)


def engine_report(
    src: Path, work: Path, size: int, bitmap: str | None, backing: Path | None
) -> dict[str, float]:
    dst = make_target(work, size, backing)
    s = Server(src, work / "s.sock", True, [], bitmap)
    t = Server(dst, work / "t.sock", False, [])
    try:
        extra = ["--bitmap", bitmap, "--zero", "write-zeroes"] if bitmap else []
        out = sh(sys.executable, "-m", "bench.engine_copy", s.sock, t.sock, *extra)
        result: dict[str, float] = json.loads(out)
        return result
    finally:
        s.stop()
        t.stop()


def unchanged_tib(work: Path) -> str:
    src = work / "tib.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", src, str(1024 * GiB))
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64M", "-c", "write -P 2 500G 64M", src)
    sh("qemu-img", "bitmap", "--add", src, "unchanged")
    base = work / "tib-base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, str(1024 * GiB))
    start = time.monotonic()
    r = engine_report(src, work, 1024 * GiB, "unchanged", base)
    total = time.monotonic() - start
    src.unlink()
    base.unlink()
    return (
        f"\n### Unchanged 1 TiB disk\n\nIncremental of a 1 TiB (virtual, sparse) qcow2 with "
        f"no dirty block: the engine's copy took {r['duration']:.2f} s "
        f"({total:.2f} s including starting both qemu-nbd), read {r['read']:.0f} bytes.\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-gib", type=float, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fills", default="random,half,fragmented")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--only-latency", action="store_true", help="only the guest latency part")
    ap.add_argument("--only-recovery", action="store_true", help="only the recovery times")
    ap.add_argument("--only-prune", action="store_true", help="only the prune costs")
    ap.add_argument(
        "--only-first-byte", action="store_true", help="only the small backup's start-up cost"
    )
    ap.add_argument(
        "--only-end-to-end", action="store_true", help="only the end-to-end full backups"
    )
    # Not /tmp: it may be a small tmpfs, and the images are GiBs.
    ap.add_argument("--work", default="/var/tmp")  # noqa: S108
    a = ap.parse_args()
    size = int(a.size_gib * GiB)
    work = Path(tempfile.mkdtemp(prefix="vb-bench-", dir=a.work))
    # mkdtemp makes it 0700: QEMU (libvirt-qemu) must pass through it to the
    # NBD sockets and scratch files the end-to-end part puts below it.
    work.chmod(0o711)
    # An operator's `pip install` compiles the package's bytecode; the
    # editable install here compiles on first import, or never when
    # PYTHONDONTWRITEBYTECODE is set (CI shells set it): without this every
    # CLI run in the bench would pay ~0.06 s of compiling no operator pays.
    compileall.compile_dir(REPO / "daemon" / "virtbackupd", quiet=1)
    cold = drop_caches()
    head = [
        f"## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB RAM, "
        f"Python {platform.python_version()}; {sh('qemu-nbd', '--version').splitlines()[0]}; "
        f"{sh('nbdcopy', '--version').splitlines()[0]}. Page cache dropped before each copy: "
        f"{'yes' if cold else 'no (not permitted)'}. Medians of {a.runs} runs.",
    ]
    try:
        parts = head
        only = (
            a.only_latency
            or a.only_recovery
            or a.only_end_to_end
            or a.only_prune
            or a.only_first_byte
        )
        fills = a.fills.split(",")
        if not only or a.only_end_to_end:
            parts.append(
                full_backups_end_to_end(work, size, fills, a.runs, make_source, drop_caches)
            )
        if not only:
            if not a.skip_full:
                parts.append(full_copies(work, size, fills, a.runs))
            parts.append(incremental_costs(work, size, a.runs))
            parts.append(unchanged_tib(work))
        if not only or a.only_latency:
            parts.append(guest_write_latency(work, a.runs))
        if not only or a.only_recovery:
            parts.append(recovery_times(work))
        if not only or a.only_prune:
            parts.append(prune_costs(work, drop_caches))
        if not only or a.only_first_byte:
            parts.append(first_byte_costs(work, a.runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(parts))


if __name__ == "__main__":
    main()
