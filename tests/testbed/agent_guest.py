"""A real Linux guest with the QEMU guest agent, built from Debian packages
alone (no network inside, no image download): the cloud kernel, an
initramfs with busybox, the virtio modules and qemu-ga. Boots in seconds
under TCG. Used where a test needs a guest agent (freeze/thaw).

Built once into /var/cache/virtbackupd-testbed/agent-guest and reused;
shared/TESTBED.md has the recipe this follows.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path("/var/cache/virtbackupd-testbed/agent-guest")
# Loaded in this order; each one's depends= (plain text in the .ko) is
# checked against the ones before it.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
)
APPLETS = ("sh", "mount", "insmod", "mkdir", "cat", "sleep", "basename", "ls", "echo", "sync")

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do insmod /lib/modules/$m.ko; done
sleep 0.2
# A file system for the agent to freeze: the first disk, if it holds ext4.
# Read-only without journal replay, so the guest never changes the disk
# (the tests' reference images stay exact); Linux freezes it all the same.
mkdir -p /mnt
mount -t ext4 -o ro,noload /dev/vda /mnt 2>/dev/null
dev=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && dev=/dev/$(basename $p)
done
echo "agent-guest: qemu-ga on $dev"
exec /usr/sbin/qemu-ga -m virtio-serial -p $dev -f /tmp/qemu-ga.pid -t /tmp
"""


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    return subprocess.run(
        [str(a) for a in args], check=True, capture_output=True, text=True, cwd=cwd
    ).stdout


def _newc(root: Path) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks, of `root`."""
    out = bytearray()
    ino = 1

    def add(name: str, mode: int, data: bytes = b"") -> None:
        nonlocal ino
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out.extend(b"070701" + "".join(f"{f:08x}" for f in fields).encode())
        out.extend(name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))
        ino += 1

    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        st = path.lstat()
        if path.is_symlink():
            add(name, st.st_mode, str(path.readlink()).encode())
        elif path.is_dir():
            add(name, st.st_mode)
        else:
            add(name, st.st_mode, path.read_bytes())
    add("TRAILER!!!", 0)
    return bytes(out)


def _depends(ko: Path) -> list[str]:
    m = re.search(rb"depends=([\w,-]*)\0", ko.read_bytes())
    return [d for d in (m.group(1).decode().split(",") if m else []) if d]


def build(cache: Path = CACHE) -> tuple[Path, Path]:
    """(kernel, initrd), built on first use."""
    kernel, initrd = cache / "vmlinuz", cache / "initrd.gz"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        meta = _run("apt-cache", "depends", "linux-image-cloud-amd64")
        image_pkg = re.search(r"Depends: (linux-image-[\w.-]+)", meta)
        assert image_pkg, meta
        pkgs = [image_pkg.group(1), "busybox-static", "qemu-guest-agent"]
        _run("apt-get", "download", *pkgs, cwd=tmp)
        extracted = tmp / "x"
        for deb in tmp.glob("*.deb"):
            _run("dpkg-deb", "-x", deb, extracted)
        root = tmp / "initramfs"
        for d in ("bin", "sbin", "usr/sbin", "proc", "sys", "dev", "tmp", "mnt", "lib/modules"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(extracted / "bin" / "busybox", root / "bin" / "busybox")
        for applet in APPLETS:
            (root / "bin" / applet).symlink_to("busybox")
        loaded: list[str] = []
        for mod in MODULES:
            (ko,) = extracted.glob(f"lib/modules/*/kernel/**/{mod}.ko")
            missing = [d for d in _depends(ko) if d not in loaded]
            assert not missing, f"{mod} needs {missing} first"
            shutil.copy(ko, root / "lib" / "modules" / f"{mod}.ko")
            loaded.append(mod)
        ga = extracted / "usr" / "sbin" / "qemu-ga"
        shutil.copy(ga, root / "usr" / "sbin" / "qemu-ga")
        for line in _run("ldd", ga).splitlines():
            m = re.search(r"(/\S+\.so[\w.]*)", line)
            if m:
                lib = Path(m.group(1))
                dest = root / lib.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(lib.resolve(), dest)
        init = root / "init"
        init.write_text(INIT.format(modules=" ".join(MODULES)))
        init.chmod(0o755)
        (vmlinuz,) = extracted.glob("boot/vmlinuz-*")
        shutil.copy(vmlinuz, cache / "vmlinuz.tmp")
        (cache / "initrd.gz.tmp").write_bytes(gzip.compress(_newc(root), 6))
    (cache / "vmlinuz.tmp").rename(kernel)
    (cache / "initrd.gz.tmp").rename(initrd)
    return kernel, initrd
