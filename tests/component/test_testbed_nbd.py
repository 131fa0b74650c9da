"""Self-tests of the NBD server fixtures (qemu-nbd and nbdkit, real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.nbd_servers import NbdServers
from testbed.tools import nbdinfo_map, qemu_img_compare, ranges_where, run

MiB = 1024 * 1024


def test_qemu_nbd_readonly_source_with_bitmap(tmp_path: Path, nbd_servers: NbdServers) -> None:
    """A read-only qemu-nbd export offers the image's data and its dirty bitmap."""
    img = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, str(16 * MiB))
    run("qemu-img", "bitmap", "--add", img, "b1")
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {2 * MiB} {MiB}", img)
    srv = nbd_servers.qemu_nbd(img, bitmaps=["b1"])
    dirty = ranges_where(nbdinfo_map(srv.uri, "qemu:dirty-bitmap:b1"), "dirty")
    assert dirty == [(2 * MiB, 3 * MiB)]
    data = ranges_where(nbdinfo_map(srv.uri), "data")
    assert data == [(2 * MiB, 3 * MiB)]
    assert run("nbdinfo", "--is", "readonly", srv.uri, check=False) == ""
    assert "is_read_only: true" in run("nbdinfo", srv.uri)


def test_qemu_nbd_writable_target(tmp_path: Path, nbd_servers: NbdServers) -> None:
    """A writable qcow2 target export stores what a client writes."""
    img = tmp_path / "dst.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, str(8 * MiB))
    ref = tmp_path / "ref.raw"
    ref.write_bytes(b"\x00" * MiB + b"\x7f" * MiB + b"\x00" * (6 * MiB))
    srv = nbd_servers.qemu_nbd(img, readonly=False)
    run("nbdcopy", "--", "[", "qemu-nbd", "-r", "-f", "raw", str(ref), "]", srv.uri)
    srv.stop()
    qemu_img_compare(ref, img, "raw", "qcow2")


def test_nbdkit_memory_and_error_filter(nbd_servers: NbdServers) -> None:
    """nbdkit's memory plugin serves a sparse disk; its error filter makes reads fail."""
    ok = nbd_servers.nbdkit_memory(4 * MiB)
    assert "4194304" in run("nbdinfo", "--size", ok.uri)
    bad = nbd_servers.nbdkit_memory(
        4 * MiB, filters=["error"], params=["error-pread=EIO", "error-pread-rate=100%"]
    )
    with pytest.raises(AssertionError, match="Input/output error"):
        run("nbdcopy", "--no-extents", bad.uri, "null:")


def test_servers_are_stopped_and_sockets_removed(tmp_path: Path) -> None:
    servers = NbdServers(tmp_path)
    srv = servers.nbdkit_memory(MiB)
    assert srv.proc is not None
    servers.stop_all()
    assert srv.proc.poll() is not None
    assert not srv.socket.exists()
