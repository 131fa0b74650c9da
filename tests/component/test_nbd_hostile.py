"""A server that misbehaves gets a clean error every time: never a hang,
never data from a reply that broke the protocol."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from fake_nbd_server import (
    CONTEXT_ID,
    Request,
    Scenario,
    chunk,
    data_chunk,
    error_chunk,
    fake_server,
    simple,
    status_chunk,
)
from virtbackupd.adapters.nbd.client import UnixAddress, connect
from virtbackupd.errors import (
    NbdConnectionError,
    NbdProtocolError,
    NbdServerError,
    NbdTimeoutError,
)

W = asyncio.StreamWriter
# A hang is the failure these tests exist to catch: fail fast.
pytestmark = pytest.mark.timeout(30)


async def honest(req: Request, w: W) -> None:
    if req.cmd == 0:
        w.write(data_chunk(req.handle, req.offset, b"\xab" * req.length))
    elif req.cmd == 7:
        w.write(status_chunk(req.handle, CONTEXT_ID, [(req.length, 0)]))
    else:
        w.write(simple(req.handle))


async def _read_with(
    tmp_path: Path, scenario: Scenario, length: int = 4096, timeout: float = 30
) -> bytes:
    async with fake_server(tmp_path / "s", scenario) as sock:
        client = await connect(UnixAddress(str(sock)), "x", timeout=timeout)
        buf = bytearray(b"\x11" * length)
        try:
            await client.read_into(0, memoryview(buf))
        finally:
            await client.close()
        return bytes(buf)


async def test_honest_fake_server_works(tmp_path: Path) -> None:
    """Control: the fake server itself is correct."""
    assert await _read_with(tmp_path, honest) == b"\xab" * 4096


async def test_bad_handshake_magic(tmp_path: Path) -> None:
    async with fake_server(tmp_path / "s", honest, bad_magic=True) as sock:
        with pytest.raises(NbdProtocolError, match="not an NBD server"):
            await connect(UnixAddress(str(sock)), "x")


async def _outside(req: Request, w: W) -> None:
    w.write(data_chunk(req.handle, req.offset + req.length, b"\xee" * 512))


async def _overlap(req: Request, w: W) -> None:
    w.write(data_chunk(req.handle, req.offset, b"\xee" * 2048, done=False))
    w.write(data_chunk(req.handle, req.offset + 1024, b"\xee" * 3072))


async def _short(req: Request, w: W) -> None:
    w.write(data_chunk(req.handle, req.offset, b"\xee" * (req.length // 2)))


async def _unknown_handle(req: Request, w: W) -> None:
    w.write(data_chunk(req.handle + 999, req.offset, b"\xee" * req.length))


async def _garbage(req: Request, w: W) -> None:
    w.write(b"\x00garbage-not-a-reply" * 4)


async def _close_midway(req: Request, w: W) -> None:
    # Header promises the whole read, half of it arrives, then EOF.
    w.write(data_chunk(req.handle, req.offset, b"\xee" * req.length)[: 20 + 8 + req.length // 2])
    await w.drain()
    w.close()


async def _huge_length(req: Request, w: W) -> None:
    w.write(struct.pack(">IHHQI", 0x668E33EF, 1, 0x7FFF, req.handle, 0xFFFFFFF0))


async def _simple_read(req: Request, w: W) -> None:
    w.write(simple(req.handle) + b"\xee" * req.length)


async def _unknown_type(req: Request, w: W) -> None:
    w.write(chunk(req.handle, 42, b"\x00" * 8, True))


async def _silent(req: Request, w: W) -> None:
    await asyncio.sleep(3600)


@pytest.mark.parametrize(
    ("scenario", "error", "match"),
    [
        (_outside, NbdProtocolError, "outside READ 0\\+4096"),
        (_overlap, NbdProtocolError, "overlaps an earlier one"),
        (_short, NbdProtocolError, "ended after 2048 of 4096 bytes"),
        (_unknown_handle, NbdProtocolError, "unknown handle"),
        (_garbage, NbdProtocolError, "neither simple nor structured"),
        (_close_midway, NbdConnectionError, "closed the connection with 1 request"),
        (_huge_length, NbdProtocolError, "too large"),
        (_simple_read, NbdProtocolError, "simple reply to READ"),
        (_unknown_type, NbdProtocolError, "unknown chunk type 42"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
async def test_misbehaving_server_gets_a_clean_error(
    tmp_path: Path,
    scenario: Scenario,
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        await _read_with(tmp_path, scenario)


async def test_chunk_outside_the_request_never_touches_the_buffer(tmp_path: Path) -> None:
    async with fake_server(tmp_path / "s", _outside) as sock:
        client = await connect(UnixAddress(str(sock)), "x")
        buf = bytearray(b"\x11" * 4096)
        with pytest.raises(NbdProtocolError):
            await client.read_into(0, memoryview(buf))
        assert buf == b"\x11" * 4096
        # The connection is dropped: later requests fail at once, not hang.
        with pytest.raises(NbdProtocolError):
            await client.read(0, 512)
        await client.close()


async def test_silent_server_times_out(tmp_path: Path) -> None:
    with pytest.raises(NbdTimeoutError, match="no answer"):
        await _read_with(tmp_path, _silent, timeout=2)


async def test_server_error_chunk_is_a_server_error_and_connection_survives(
    tmp_path: Path,
) -> None:
    calls = 0

    async def first_fails(req: Request, w: W) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            w.write(error_chunk(req.handle, 5, "disk on fire"))
        else:
            await honest(req, w)

    async with fake_server(tmp_path / "s", first_fails) as sock:
        client = await connect(UnixAddress(str(sock)), "x")
        with pytest.raises(
            NbdServerError, match="READ 0\\+4096 failed with EIO: disk on fire"
        ) as exc:
            await client.read(0, 4096)
        assert exc.value.error == "EIO"
        assert await client.read(0, 512) == b"\xab" * 512
        await client.close()


async def test_block_status_for_an_unnegotiated_context(tmp_path: Path) -> None:
    async def wrong_ctx(req: Request, w: W) -> None:
        w.write(status_chunk(req.handle, CONTEXT_ID + 1, [(req.length, 0)]))

    async with fake_server(tmp_path / "s", wrong_ctx) as sock:
        client = await connect(UnixAddress(str(sock)), "x", meta_contexts=["base:allocation"])
        with pytest.raises(NbdProtocolError, match="unexpected context id 8"):
            await client.block_status(0, 65536)
        await client.close()


async def test_missing_dirty_bitmap_context_fails_the_connection(tmp_path: Path) -> None:
    async with fake_server(tmp_path / "s", honest) as sock:
        with pytest.raises(NbdConnectionError, match="does not offer .*qemu:dirty-bitmap:b1"):
            await connect(
                UnixAddress(str(sock)),
                "x",
                meta_contexts=["base:allocation", "qemu:dirty-bitmap:b1"],
            )


async def test_requests_the_server_forbids_are_never_sent(tmp_path: Path) -> None:
    async with fake_server(tmp_path / "s", honest) as sock:
        client = await connect(UnixAddress(str(sock)), "x")
        with pytest.raises(ValueError, match="outside the export"):
            await client.read(1024 * 1024 - 512, 1024)
        with pytest.raises(ValueError, match="no metadata context was negotiated"):
            await client.block_status(0, 4096)
        assert await client.read(0, 512) == b"\xab" * 512, "the connection is still usable"
        await client.close()
