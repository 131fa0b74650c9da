"""Full backup of a running VM, end to end, against its peers in one run.

A running test-bed domain (TCG, no OS: nothing writes while it is backed
up) with a qcow2 disk of the given fill. Each way takes a full, durable
copy of it (`sync` inside every timing):

- `virtbackup backup --full`: the product's own path, as an operator runs
  it (CLI start, plan, libvirt pull-mode job, copy into a qcow2 chain
  member, digests, commit).
- `qemu-img convert`: libvirt's pull-mode export (`virsh backup-begin`)
  straight into a qcow2 file: the floor for writing qcow2 from that export.
- `nbdcopy`: the same export into a qcow2 served by qemu-nbd
  (`cache=unsafe`, like the product's target).
- `virtnbdbackup -l copy`: Debian's virtnbdbackup, a full copy (its own
  stream format, not qcow2).

Seconds and the CPU seconds of every process the way starts (the guest's
QEMU, which serves the export, is the same for all and not counted), per
GiB of data. The page cache is dropped before each run. The product's
copy and qemu-img convert's are checked with `qemu-img compare` against
the disk.
"""

from __future__ import annotations

import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from testbed.domains import DomainFactory, GuestDomain  # noqa: E402
from testbed.host import connect, ensure_libvirtd  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
VIRTBACKUP = str(REPO / ".venv" / "bin" / "virtbackup")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(*args: str | Path) -> None:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:3]))}: {proc.stderr.strip()[-2000:]}")


def _run_peak(*args: str | Path) -> int:
    """Run like _run; the process's peak resident memory in bytes, as
    /usr/bin/time sees it (a child's own ru_maxrss would also count the
    bench's memory: Linux keeps it across the fork and exec)."""
    with tempfile.NamedTemporaryFile("r") as out:
        _run("/usr/bin/time", "-f", "%M", "-o", out.name, *args)
        return int(out.read().split()[-1]) * 1024  # KiB


def _compare(a: Path, b: Path) -> None:
    _run("qemu-img", "compare", "-U", a, b)


class Ways:
    def __init__(self, work: Path, td: GuestDomain) -> None:
        self.work = work
        self.td = td
        self.n = 0

    def _fresh(self) -> Path:
        self.n += 1
        d = self.work / f"e2e-{self.n}"
        d.mkdir()
        d.chmod(
            0o711
        )  # QEMU (libvirt-qemu) passes through to its job folders (root's folders only)
        return d

    def virtbackup(self) -> None:
        d = self._fresh()
        (d / "policies").mkdir()
        cfg = d / "vb.yaml"
        cfg.write_text(
            f"state_dir: {d}/state\nbackup_root: {d}/backups\nruntime_dir: {d}/run\n"
            f"scratch_dir: {d}/scratch\npolicy_dirs: [{d}/policies]\n"
        )
        self.peaks.append(_run_peak(VIRTBACKUP, "-c", cfg, "backup", "--full", self.td.name))
        _run("sync")

        def check() -> None:
            image = next(d.glob("backups/*/*/vda.qcow2"))
            _run("qemu-img", "check", "-q", image)  # our own writer's image: no error, no leak
            _compare(image, self.source)

        def cleanup() -> None:
            _run(VIRTBACKUP, "-c", cfg, "forget-checkpoints", self.td.name)
            shutil.rmtree(d)

        self.check = check
        self.cleanup = cleanup

    def _pull(self, d: Path) -> Path:
        sock = d / "nbd.sock"
        xml = d / "backup.xml"
        # QEMU (libvirt-qemu) creates the socket and the scratch file here;
        # libvirt labels neither folder nor socket for it.
        shutil.chown(d, "libvirt-qemu", "libvirt-qemu")
        xml.write_text(
            "<domainbackup mode='pull'>"
            f"<server transport='unix' socket='{sock}'/>"
            "<disks><disk name='vda' backup='yes' type='file'>"
            f"<scratch file='{d}/scratch.qcow2'/></disk></disks></domainbackup>"
        )
        _run("virsh", "backup-begin", self.td.name, xml)
        return sock

    def qemu_img_convert(self) -> None:
        d = self._fresh()
        sock = self._pull(d)
        try:
            _run(
                "qemu-img",
                "convert",
                "-O",
                "qcow2",
                f"nbd+unix:///vda?socket={sock}",
                d / "vda.qcow2",
            )
            _run("sync")
        finally:
            _run("virsh", "domjobabort", self.td.name)
        self.check = lambda: _compare(d / "vda.qcow2", self.source)
        self.cleanup = lambda: shutil.rmtree(d)

    def nbdcopy(self) -> None:
        d = self._fresh()
        target = d / "vda.qcow2"
        _run("qemu-img", "create", "-q", "-f", "qcow2", target, str(self.size))
        tsock = d / "target.sock"
        server = subprocess.Popen(
            ["qemu-nbd", "-f", "qcow2", "--cache=unsafe", "-k", str(tsock), "-x", "t", str(target)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sock = self._pull(d)
        try:
            while not tsock.exists():
                time.sleep(0.01)
            _run("nbdcopy", f"nbd+unix:///vda?socket={sock}", f"nbd+unix:///t?socket={tsock}")
        finally:
            _run("virsh", "domjobabort", self.td.name)
            server.terminate()
            server.wait()
        _run("sync")
        self.check = lambda: _compare(target, self.source)
        self.cleanup = lambda: shutil.rmtree(d)

    def virtnbdbackup(self) -> None:
        d = self._fresh()
        _run("virtnbdbackup", "-d", self.td.name, "-l", "copy", "-o", d / "out")
        _run("sync")
        self.check = lambda: None  # its own format; its restore is its concern
        self.cleanup = lambda: shutil.rmtree(d)

    source: Path
    size: int
    peaks: list[int]  # peak RSS of each `virtbackup backup --full`
    # Set by the way that ran last: checks its copy, then removes it.
    check: Callable[[], None]
    cleanup: Callable[[], None]


def restores(
    work: Path, td: GuestDomain, drop: Callable[[], bool], peaks: list[int]
) -> dict[str, tuple[float, float]]:
    """A chain of three (a full, then two incrementals after 64 MiB of
    guest writes each), restored to a standalone image by `virtbackup
    restore` and by `qemu-img convert` of the chain's top, to qcow2 and to
    raw; (seconds, CPU seconds) of each, `sync` inside. Each pair of
    results is compared with `qemu-img compare`, and the restored qcow2 is
    checked with `qemu-img check`. The restores' peak RSS go to `peaks`."""
    from testbed.guest import GuestWriter

    d = work / "restore"
    d.mkdir()
    d.chmod(0o711)  # root's folders only: virtbackupd refuses a world-writable one
    (d / "policies").mkdir()
    cfg = d / "vb.yaml"
    cfg.write_text(
        f"state_dir: {d}/state\nbackup_root: {d}/backups\nruntime_dir: {d}/run\n"
        f"scratch_dir: {d}/scratch\npolicy_dirs: [{d}/policies]\n"
    )
    writer = GuestWriter(td)
    try:
        _run(VIRTBACKUP, "-c", cfg, "backup", "--full", td.name)
        for i in range(2):
            writer.write("vda", (1 + 2 * i) * GiB // 2, 64 * MiB, 0x51 + i)
            _run(VIRTBACKUP, "-c", cfg, "backup", td.name)
        top = max(d.glob("backups/*/*/vda.qcow2"), key=lambda p: p.parent.name)
        out: dict[str, tuple[float, float]] = {}
        for fmt in ("qcow2", "raw"):
            ours, theirs = d / f"ours-{fmt}", d / f"convert.{fmt}"
            for name, argv in (
                (
                    f"virtbackup restore ({fmt})",
                    [VIRTBACKUP, "-c", cfg, "restore", td.name, "--to", ours, "--format", fmt],
                ),
                (f"qemu-img convert ({fmt})", ["qemu-img", "convert", "-O", fmt, top, theirs]),
            ):
                drop()
                cpu0, t0 = _children_cpu(), time.monotonic()
                if argv[0] == VIRTBACKUP:
                    peaks.append(_run_peak(*argv))
                else:
                    _run(*argv)
                _run("sync")
                out[name] = (time.monotonic() - t0, _children_cpu() - cpu0)
            if fmt == "qcow2":
                _run("qemu-img", "check", "-q", ours / "vda.qcow2")
            _compare(ours / f"vda.{fmt}", theirs)
            shutil.rmtree(ours)
            theirs.unlink()
        return out
    finally:
        _run(VIRTBACKUP, "-c", cfg, "forget-checkpoints", td.name)
        shutil.rmtree(d)


def full_backups_end_to_end(
    work: Path,
    size: int,
    fills: list[str],
    runs: int,
    make_source: Callable[[Path, str, int], int],
    drop: Callable[[], bool],
) -> str:
    """`make_source(path, kind, size) -> data bytes` and `drop() -> bool`
    come from bench.__main__ (no import loop)."""
    ensure_libvirtd()
    if shutil.which("virtnbdbackup") is None:
        _run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "virtnbdbackup")
    work.chmod(0o755)  # QEMU (libvirt-qemu) writes the scratch files below
    factory = DomainFactory(connect())
    out = [
        "### Full backup of a running VM, end to end (durable: `sync` inside the timing)",
        "",
        f"A {size // GiB} GiB qcow2 disk of a running TCG domain; medians of {runs} runs; "
        "CPU: every process the way starts (the guest's QEMU serving the export not counted).",
        "",
        "| fill | way | seconds | MiB/s of data | CPU s/GiB | vs qemu-img convert | "
        "vs virtnbdbackup |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    restored: dict[str, tuple[int, dict[str, tuple[float, float]]]] = {}
    memory = [
        "",
        "### Peak memory (RSS) of our process, MiB",
        "",
        "| fill | `virtbackup backup --full` | `virtbackup restore` |",
        "| --- | ---: | ---: |",
    ]
    try:
        for fill in fills:
            td = factory.create(qcow2_sizes=[size], start=False)
            image = td.disk("vda").path
            image.unlink()
            data = make_source(image, fill, size)
            image.chmod(0o644)
            td.start()
            ways = Ways(work, td)
            ways.source, ways.size, ways.peaks = image, size, []
            times: dict[str, list[float]] = {}
            cpus: dict[str, list[float]] = {}
            for _ in range(runs):
                for name in ("qemu_img_convert", "virtbackup", "nbdcopy", "virtnbdbackup"):
                    drop()
                    cpu0, t0 = _children_cpu(), time.monotonic()
                    getattr(ways, name)()
                    times.setdefault(name, []).append(time.monotonic() - t0)
                    cpus.setdefault(name, []).append(_children_cpu() - cpu0)
                    ways.check()
                    ways.cleanup()
                    print(f"  {fill:10} {name:18} {times[name][-1]:.2f}s", file=sys.stderr)
            med = {k: statistics.median(v) for k, v in times.items()}
            for name, label in (
                ("virtbackup", "`virtbackup backup --full`"),
                ("qemu_img_convert", "qemu-img convert"),
                ("nbdcopy", "nbdcopy → qemu-nbd"),
                ("virtnbdbackup", "virtnbdbackup 1.9 `-l copy`"),
            ):
                cpu = statistics.median(cpus[name]) / (data / GiB)
                out.append(
                    f"| {fill} ({data / MiB:.0f} MiB) | {label} | {med[name]:.2f} | "
                    f"{data / MiB / med[name]:.0f} | {cpu:.2f} | "
                    f"{med['qemu_img_convert'] / med[name]:.2f}x | "
                    f"{med['virtnbdbackup'] / med[name]:.2f}x |"
                )
            restore_peaks: list[int] = []
            restored[fill] = (data, restores(work, td, drop, restore_peaks))
            memory.append(
                f"| {fill} ({data / MiB:.0f} MiB) | {max(ways.peaks) / MiB:.0f} | "
                f"{max(restore_peaks) / MiB:.0f} |"
            )
            factory.cleanup()
    finally:
        factory.cleanup()
    out += [
        "",
        "### Restore of a chain (a full and two incrementals) to a standalone image",
        "",
        "`sync` inside the timing; the page cache dropped before each; CPU: every process "
        "the way starts. \"vs\": qemu-img convert's seconds over this way's (above 1: faster).",
        "",
        "| fill | way | seconds | CPU s/GiB | vs qemu-img convert |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for fill, (data, restore_times) in restored.items():
        for name, (secs, cpu) in restore_times.items():
            fmt = name.rsplit("(", 1)[1].rstrip(")")
            peer = restore_times[f"qemu-img convert ({fmt})"][0]
            out.append(
                f"| {fill} ({data / MiB:.0f} MiB) | {name} | {secs:.2f} | "
                f"{cpu / (data / GiB):.2f} | {peer / secs:.2f}x |"
            )
    return "\n".join(out + memory) + "\n"
