"""A small NBD server of the tests' own that can be told to misbehave.

It performs a correct fixed-newstyle handshake (unless told otherwise) and
then hands every transmission request to a scenario function that writes
whatever bytes it likes. Written from the spec, independent of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
SIMPLE = 0x67446698
STRUCT = 0x668E33EF
SIZE = 1024 * 1024
CONTEXT_ID = 7


@dataclass
class Request:
    flags: int
    cmd: int
    handle: int
    offset: int
    length: int
    payload: bytes


Scenario = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


def simple(handle: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", SIMPLE, error, handle)


def chunk(handle: int, rtype: int, payload: bytes, done: bool) -> bytes:
    return struct.pack(">IHHQI", STRUCT, 1 if done else 0, rtype, handle, len(payload)) + payload


def data_chunk(handle: int, offset: int, data: bytes, done: bool = True) -> bytes:
    return chunk(handle, 1, struct.pack(">Q", offset) + data, done)


def status_chunk(handle: int, ctx: int, extents: list[tuple[int, int]], done: bool = True) -> bytes:
    body = struct.pack(">I", ctx) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk(handle, 5, body, done)


def error_chunk(handle: int, errno: int, message: str) -> bytes:
    m = message.encode()
    return chunk(handle, 32769, struct.pack(">IH", errno, len(m)) + m, True)


async def _option_reply(w: asyncio.StreamWriter, opt: int, rtype: int, data: bytes = b"") -> None:
    w.write(struct.pack(">QIII", REPLY_MAGIC, opt, rtype, len(data)) + data)
    await w.drain()


async def _handshake(r: asyncio.StreamReader, w: asyncio.StreamWriter, bad_magic: bool) -> None:
    w.write(struct.pack(">QQH", 0xDEADBEEF if bad_magic else NBDMAGIC, IHAVEOPT, 3))
    await w.drain()
    await r.readexactly(4)
    while True:
        _, opt, length = struct.unpack(">QII", await r.readexactly(16))
        data = await r.readexactly(length)
        if opt == 8:  # STRUCTURED_REPLY
            await _option_reply(w, opt, 1)
        elif opt == 10:  # SET_META_CONTEXT: grant base:allocation only
            (nlen,) = struct.unpack(">I", data[:4])
            pos = 4 + nlen
            (count,) = struct.unpack(">I", data[pos : pos + 4])
            pos += 4
            for _ in range(count):
                (qlen,) = struct.unpack(">I", data[pos : pos + 4])
                query = data[pos + 4 : pos + 4 + qlen]
                pos += 4 + qlen
                if query == b"base:allocation":
                    await _option_reply(w, opt, 4, struct.pack(">I", CONTEXT_ID) + query)
            await _option_reply(w, opt, 1)
        elif opt == 7:  # GO
            flags = 1 | (1 << 2) | (1 << 5) | (1 << 6)  # HAS_FLAGS, FLUSH, TRIM, WRITE_ZEROES
            await _option_reply(w, opt, 3, struct.pack(">HQH", 0, SIZE, flags))
            await _option_reply(w, opt, 1)
            return
        else:
            await _option_reply(w, opt, (1 << 31) + 1)


@contextlib.asynccontextmanager
async def fake_server(
    sock: Path, scenario: Scenario, bad_magic: bool = False
) -> AsyncIterator[Path]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await _handshake(r, w, bad_magic)
            while True:
                hdr = await r.readexactly(28)
                _, flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", hdr)
                payload = await r.readexactly(length) if cmd == 1 else b""
                if cmd == 2:
                    break
                await scenario(Request(flags, cmd, handle, offset, length, payload), w)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            w.close()

    server = await asyncio.start_unix_server(handle, str(sock))
    try:
        yield sock
    finally:
        server.close()
        await server.wait_closed()
