"""The NBD client against real servers: qemu-nbd and nbdkit. Extent maps
must agree with libnbd's `nbdinfo --map` on the same export."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from testbed.nbd_servers import NbdServer, NbdServers
from testbed.tools import MapEntry, nbdinfo_map, qemu_io, run
from virtbackupd.adapters.nbd.client import NbdClient, UnixAddress, connect, list_meta_contexts
from virtbackupd.adapters.nbd.protocol import Extent
from virtbackupd.errors import NbdServerError

MiB = 1024 * 1024


async def _client(srv: NbdServer, contexts: list[str] | None = None) -> NbdClient:
    return await connect(UnixAddress(str(srv.socket)), srv.export, meta_contexts=contexts or [])


async def _full_map(c: NbdClient, context: str) -> list[Extent]:
    out: list[Extent] = []
    pos = 0
    while pos < c.size:
        ext = (await c.block_status(pos, c.size - pos))[context]
        out.extend(ext)
        pos = ext[-1].end
    return out


def _merged(entries: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for off, n, flags in entries:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, flags)
        else:
            out.append((off, n, flags))
    return out


def _same_map(ours: list[Extent], theirs: list[MapEntry]) -> None:
    assert _merged([(e.offset, e.length, e.flags) for e in ours]) == _merged(
        [(e.offset, e.length, e.type) for e in theirs]
    )


@pytest.fixture
def fragmented(tmp_path: Path) -> Path:
    """A qcow2 with data, zero clusters, holes and a dirty bitmap."""
    img = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, str(64 * MiB))
    cmds = [f"write -P 0x{i + 1:02x} {i * 3 * MiB} {MiB}" for i in range(8)]
    cmds += ["write -z 40M 2M"]
    qemu_io(img, *cmds)
    run("qemu-img", "bitmap", "--add", img, "b1")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 5M 128k", "-c", "write -z 50M 64k", img)
    return img


async def test_qemu_nbd_extent_maps_agree_with_nbdinfo(
    fragmented: Path, nbd_servers: NbdServers
) -> None:
    srv = nbd_servers.qemu_nbd(fragmented, bitmaps=["b1"])
    c = await _client(srv, ["base:allocation", "qemu:dirty-bitmap:b1"])
    try:
        _same_map(await _full_map(c, "base:allocation"), nbdinfo_map(srv.uri))
        _same_map(
            await _full_map(c, "qemu:dirty-bitmap:b1"),
            nbdinfo_map(srv.uri, "qemu:dirty-bitmap:b1"),
        )
        assert c.read_only
        assert c.can_multi_conn
        assert await c.read(3 * MiB, 4096) == b"\x02" * 4096
        assert await c.read(40 * MiB, 4096) == bytes(4096)
    finally:
        await c.close()


async def test_list_meta_contexts(fragmented: Path, nbd_servers: NbdServers) -> None:
    srv = nbd_servers.qemu_nbd(fragmented, bitmaps=["b1"])
    names = await list_meta_contexts(UnixAddress(str(srv.socket)), srv.export)
    assert "base:allocation" in names
    assert "qemu:dirty-bitmap:b1" in names


async def test_qemu_nbd_target_write_zero_trim_flush(
    tmp_path: Path, nbd_servers: NbdServers
) -> None:
    img = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, str(8 * MiB))
    srv = nbd_servers.qemu_nbd(img, readonly=False)
    c = await _client(srv)
    data = os.urandom(MiB)
    try:
        await c.write(MiB, data)
        await c.write(3 * MiB, b"\x55" * MiB)
        await c.write_zeroes(3 * MiB, 64 * 1024)
        await c.write_zeroes(3 * MiB + 64 * 1024, 64 * 1024, no_hole=True)
        await c.trim(6 * MiB, MiB)
        await c.flush()
        assert await c.read(MiB, MiB) == data
        assert await c.read(3 * MiB, 128 * 1024) == bytes(128 * 1024)
    finally:
        await c.close()
    srv.stop()
    expected = tmp_path / "e.raw"
    content = bytearray(8 * MiB)
    content[MiB : 2 * MiB] = data
    content[3 * MiB + 128 * 1024 : 4 * MiB] = b"\x55" * (MiB - 128 * 1024)
    expected.write_bytes(bytes(content))
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", expected, img)


async def test_many_requests_in_flight_on_several_connections(
    fragmented: Path, nbd_servers: NbdServers
) -> None:
    """64 reads in flight over 3 connections come back matched to their handles."""
    srv = nbd_servers.qemu_nbd(fragmented)
    clients = [await _client(srv) for _ in range(3)]
    try:
        reads = [clients[i % 3].read(i * 256 * 1024, 256 * 1024) for i in range(64)]
        parts = await asyncio.gather(*reads)
    finally:
        for c in clients:
            await c.close()
    expected = bytearray(16 * MiB)
    for i in range(6):
        expected[i * 3 * MiB : i * 3 * MiB + MiB] = bytes([i + 1]) * MiB
    expected[5 * MiB : 5 * MiB + 128 * 1024] = b"\x77" * 128 * 1024
    assert b"".join(parts) == bytes(expected)


async def test_nbdkit_memory_plugin(nbd_servers: NbdServers) -> None:
    srv = nbd_servers.nbdkit_memory(16 * MiB)
    c = await _client(srv, ["base:allocation"])
    try:
        await c.write(2 * MiB, b"\x42" * MiB)
        await c.write_zeroes(2 * MiB, 4096)
        assert await c.read(2 * MiB, 8192) == bytes(4096) + b"\x42" * 4096
        await c.trim(2 * MiB + 512 * 1024, 512 * 1024)
        _same_map(await _full_map(c, "base:allocation"), nbdinfo_map(srv.uri))
    finally:
        await c.close()


async def test_nbdkit_error_filter_gives_server_errors(nbd_servers: NbdServers) -> None:
    srv = nbd_servers.nbdkit_memory(
        4 * MiB, filters=["error"], params=["error-pread=EIO", "error-pread-rate=100%"]
    )
    c = await _client(srv)
    try:
        with pytest.raises(NbdServerError, match="READ 0\\+65536 failed with EIO"):
            await c.read(0, 65536)
        await c.write(0, b"\x01" * 4096)  # writes still work: the connection survived
    finally:
        await c.close()
