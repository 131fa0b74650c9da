"""Throw-away QEMU domains (TCG, no guest OS) with qcow2/raw/cdrom disks.

Every domain is named ``vbtest-<pid>-<n>`` and keeps its images in
``/var/tmp/vbtest/<name>/``. A domain whose creating pytest process is gone
is stale (an earlier run crashed) and is removed at the next session start.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt

from .tools import run

PREFIX = "vbtest-"
WORK_ROOT = Path("/var/tmp/vbtest")
MiB = 1024 * 1024
_counter = itertools.count(1)


@dataclass
class Disk:
    target: str  # "vda"
    path: Path
    fmt: str  # "qcow2" | "raw"
    size: int
    device: str = "disk"  # "disk" | "cdrom"
    alias: str = ""  # libvirt's device alias, filled in once the domain runs
    reference: Path | None = None  # raw oracle image, for data disks

    @property
    def qdev(self) -> str:
        """The guest device's qdev path, the address HMP qemu-io writes through."""
        if not self.alias:
            raise RuntimeError(f"disk {self.target} has no alias: is the domain running?")
        return f"/machine/peripheral/{self.alias}/virtio-backend"


@dataclass
class GuestDomain:
    name: str
    workdir: Path
    disks: list[Disk]
    dom: libvirt.virDomain
    conn: libvirt.virConnect = field(repr=False)

    def root_folder(self, suffix: str) -> Path:
        """A folder of root's that QEMU (libvirt-qemu) can pass through
        (0711), beside the domain's own: for a repository a live restore
        runs from. Not inside the domain's 0777 folder: virtbackupd uses
        only folders no other user can write above. Removed with the domain."""
        folder = WORK_ROOT / f"{self.name}-{suffix}"
        folder.mkdir(mode=0o711)
        folder.chmod(0o711)
        return folder

    def disk(self, target: str) -> Disk:
        for d in self.disks:
            if d.target == target:
                return d
        raise KeyError(target)

    @property
    def data_disks(self) -> list[Disk]:
        return [d for d in self.disks if d.device == "disk"]

    def start(self) -> None:
        self.dom.create()
        self.refresh_aliases()

    def refresh_aliases(self) -> None:
        from lxml import etree

        tree = etree.fromstring(self.dom.XMLDesc(0).encode())
        for el in tree.iterfind("devices/disk"):
            target = el.find("target")
            alias = el.find("alias")
            if target is not None and alias is not None:
                self.disk(target.get("dev", "")).alias = alias.get("name", "")

    def is_running(self) -> bool:
        return bool(self.dom.isActive())

    def shutdown_hard(self) -> None:
        """Destroy (QEMU gets SIGTERM and closes its images cleanly)."""
        if self.dom.isActive():
            self.dom.destroy()


def _domain_xml(
    name: str, disks: Sequence[Disk], agent: bool = False, workdir: Path = WORK_ROOT
) -> str:
    parts = []
    for d in disks:
        if d.device == "cdrom":
            parts.append(
                "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
                f"<target dev='{d.target}' bus='ide'/><readonly/></disk>"
            )
        else:
            parts.append(
                "<disk type='file' device='disk'>"
                f"<driver name='qemu' type='{d.fmt}' discard='unmap'/>"
                f"<source file={quoteattr(str(d.path))}/>"
                f"<target dev='{d.target}' bus='virtio'/></disk>"
            )
    memory, os_xml = 128, "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
    if agent:
        # A real Linux with the guest agent (testbed/agent_guest.py).
        from .agent_guest import build

        kernel, initrd = build()
        memory = 256
        os_xml = (
            "<os><type arch='x86_64' machine='pc'>hvm</type>"
            f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd>"
            "<cmdline>console=ttyS0 quiet</cmdline></os>"
        )
        parts.append(
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
            f"<serial type='file'><source path={quoteattr(str(workdir / 'console.log'))}/>"
            "<target port='0'/></serial>"
        )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  {os_xml}
  <devices>
    {"".join(parts)}
    <memballoon model='none'/>
  </devices>
</domain>"""


class DomainFactory:
    """Creates domains for one test and removes all of them afterwards."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn
        self.created: list[GuestDomain] = []

    def create(
        self,
        qcow2_sizes: Sequence[int] = (64 * MiB,),
        raw_size: int | None = None,
        cdrom: bool = False,
        start: bool = True,
        root: Path = WORK_ROOT,
        agent: bool = False,
    ) -> GuestDomain:
        """`root`: where the domain's folder goes (another folder than the
        default, e.g. libvirt's image folder, for a sandboxed daemon)."""
        name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        workdir = root / name
        workdir.mkdir(parents=True)
        # The QEMU process runs as libvirt-qemu and must reach images, scratch
        # files and sockets created here by root.
        if root == WORK_ROOT:  # ours; a system folder keeps its mode (0711 lets QEMU through)
            root.chmod(0o755)
        workdir.chmod(0o777)
        disks: list[Disk] = []
        targets = (f"vd{chr(ord('a') + i)}" for i in range(26))
        for size in qcow2_sizes:
            t = next(targets)
            disks.append(Disk(t, workdir / f"{t}.qcow2", "qcow2", size))
        if raw_size is not None:
            t = next(targets)
            disks.append(Disk(t, workdir / f"{t}.img", "raw", raw_size))
        for d in disks:
            run("qemu-img", "create", "-q", "-f", d.fmt, d.path, str(d.size))
            d.reference = workdir / f"{d.target}.reference.raw"
            with d.reference.open("wb") as f:
                f.truncate(d.size)
        if cdrom:
            disks.append(Disk("hdc", Path(), "raw", 0, device="cdrom"))
        dom = self.conn.defineXML(_domain_xml(name, disks, agent, workdir))
        td = GuestDomain(name, workdir, disks, dom, self.conn)
        self.created.append(td)
        if start:
            td.start()
        return td

    def cleanup(self) -> None:
        for td in self.created:
            remove_domain(self.conn, td.name)
            shutil.rmtree(td.workdir, ignore_errors=True)
            for extra in WORK_ROOT.glob(f"{td.name}-*"):  # root_folder()s
                shutil.rmtree(extra, ignore_errors=True)
        self.created.clear()


def remove_domain(conn: libvirt.virConnect, name: str) -> None:
    """Destroy and undefine a domain with its checkpoints, and delete its files."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        dom = None
    if dom is not None:
        if dom.isActive():
            with contextlib.suppress(libvirt.libvirtError):  # no job running
                dom.abortJob()
            dom.destroy()
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        dom.undefineFlags(flags)
    shutil.rmtree(WORK_ROOT / name, ignore_errors=True)


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name[len(PREFIX) :].split("-", 1)[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"pytest" in cmdline


def remove_stale(conn: libvirt.virConnect) -> list[str]:
    """Remove test domains and work dirs left behind by crashed earlier runs."""
    removed = []
    names = {d.name() for d in conn.listAllDomains() if d.name().startswith(PREFIX)}
    if WORK_ROOT.is_dir():
        names |= {p.name for p in WORK_ROOT.iterdir() if p.name.startswith(PREFIX)}
    for name in sorted(names):
        if not _owner_alive(name):
            remove_domain(conn, name)
            removed.append(name)
    return removed


def wait_until(predicate: object, timeout: float = 30, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
