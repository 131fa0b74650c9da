"""An asyncio NBD client (fixed newstyle, structured replies, metadata
contexts, many requests in flight), written from the NBD protocol
specification. One :class:`NbdClient` is one connection to one export;
:func:`connect` makes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import Sequence
from typing import Any

from virtbackupd.adapters.nbd import protocol as p
from virtbackupd.adapters.nbd.addresses import Address, TcpAddress, UnixAddress
from virtbackupd.adapters.nbd.handshake import (
    ExportInfo,
    handshake,
    list_meta_contexts,
    open_connection,
)
from virtbackupd.adapters.nbd.protocol import Extent, WireError
from virtbackupd.adapters.nbd.receiver import Connection, PendingRequest
from virtbackupd.errors import (
    NbdConnectionError,
    NbdError,
    NbdProtocolError,
    NbdTimeoutError,
)

__all__ = [
    "Address",
    "NbdClient",
    "TcpAddress",
    "UnixAddress",
    "connect",
    "list_meta_contexts",
]


class NbdClient:
    """One connection to one export, in the transmission phase.

    Use :func:`connect`; close with :meth:`close` (or ``async with``).
    """

    def __init__(self, proto: Connection, export: str, info: ExportInfo, timeout: float) -> None:
        self._proto = proto
        self.export = export
        self.size = info.size
        self.flags = info.flags
        self.block_size = info.block_size
        self.contexts = info.contexts
        self._handles = itertools.count(1)
        self._timeout = timeout
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    @property
    def name(self) -> str:
        return self._proto.name

    @property
    def read_only(self) -> bool:
        return bool(self.flags & p.TFLAG_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & p.TFLAG_CAN_MULTI_CONN)

    @property
    def max_request(self) -> int:
        """Largest READ/WRITE payload the server accepts."""
        return self.block_size.maximum

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _watch(self) -> None:
        """Fail everything when the server stops answering for `timeout`."""
        proto = self._proto
        while proto.broken is None:
            await asyncio.sleep(min(1.0, self._timeout / 4))
            idle = proto.loop.time() - proto.last_progress
            if proto.pending and idle > self._timeout:
                proto.abort(
                    NbdTimeoutError(
                        f"{self.name}: no answer for {idle:.0f}s with "
                        f"{len(proto.pending)} request(s) outstanding"
                    )
                )

    # --- requests --------------------------------------------------------------------
    def _check(self, cmd: int, offset: int, length: int, payload: bool) -> None:
        what = f"{p.CMD_NAMES[cmd]} {offset}+{length}"
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{self.name}: {what} is outside the export ({self.size} bytes)")
        align = self.block_size.minimum
        if offset % align or (length % align and offset + length != self.size):
            raise ValueError(
                f"{self.name}: {what} is not aligned to the minimum block size {align}"
            )
        if payload and length > self.block_size.maximum:
            raise ValueError(f"{self.name}: {what} exceeds the maximum block size")
        if length > 0xFFFFFFFF:
            raise ValueError(f"{self.name}: {what} is longer than a request can say")

    async def _submit(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes | memoryview | None = None,
        buf: memoryview | None = None,
    ) -> Any:
        proto = self._proto
        if proto.broken is not None:
            raise proto.broken
        handle = next(self._handles)
        req = PendingRequest(
            handle, cmd, flags, offset, length, proto.loop.create_future(), buf=buf
        )
        if not proto.pending:
            proto.last_progress = proto.loop.time()
        proto.pending[handle] = req
        try:
            await proto.send_message(p.pack_request(flags, cmd, handle, offset, length), payload)
            return await req.future
        except asyncio.CancelledError:
            # The reply may still arrive: never let it land in a buffer the
            # caller may already reuse.
            req.buf = None
            raise

    async def read_into(self, offset: int, buf: memoryview) -> None:
        """Read len(buf) bytes at `offset` into `buf`. Holes arrive as zeroes."""
        self._check(p.CMD_READ, offset, len(buf), payload=True)
        if len(buf):
            await self._submit(p.CMD_READ, offset, len(buf), buf=buf)

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.read_into(offset, memoryview(buf))
        return bytes(buf)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise ValueError(f"{self.name}: export is read-only")
        self._check(p.CMD_WRITE, offset, len(data), payload=True)
        flags = p.CMD_FLAG_FUA if fua and self.flags & p.TFLAG_SEND_FUA else 0
        await self._submit(p.CMD_WRITE, offset, len(data), flags, payload=data)

    async def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None:
        """Make the range read as zeroes; ``no_hole`` asks the server to keep
        it allocated (otherwise it may punch a hole)."""
        if not self.flags & p.TFLAG_SEND_WRITE_ZEROES:
            raise ValueError(f"{self.name}: server does not support WRITE_ZEROES")
        self._check(p.CMD_WRITE_ZEROES, offset, length, payload=False)
        flags = p.CMD_FLAG_NO_HOLE if no_hole else 0
        await self._submit(p.CMD_WRITE_ZEROES, offset, length, flags)

    async def trim(self, offset: int, length: int) -> None:
        if not self.flags & p.TFLAG_SEND_TRIM:
            raise ValueError(f"{self.name}: server does not support TRIM")
        self._check(p.CMD_TRIM, offset, length, payload=False)
        await self._submit(p.CMD_TRIM, offset, length)

    async def flush(self) -> None:
        if not self.flags & p.TFLAG_SEND_FLUSH:
            return  # the server writes through: nothing to flush
        await self._submit(p.CMD_FLUSH)

    async def block_status(self, offset: int, length: int) -> dict[str, list[Extent]]:
        """Extents of every negotiated context from `offset`, covering at
        least part of `length` (servers may answer with less)."""
        if not self.contexts:
            raise ValueError(f"{self.name}: no metadata context was negotiated")
        self._check(p.CMD_BLOCK_STATUS, offset, length, payload=False)
        by_id: dict[int, list[Extent]] = await self._submit(p.CMD_BLOCK_STATUS, offset, length)
        names = {v: k for k, v in self.contexts.items()}
        return {names[i]: ext for i, ext in by_id.items()}

    async def close(self) -> None:
        """Soft disconnect (NBD_CMD_DISC) when possible, then close."""
        self._watchdog.cancel()
        proto = self._proto
        if proto.broken is None and proto.transport is not None:
            with contextlib.suppress(Exception):
                proto.send(p.pack_request(0, p.CMD_DISC, next(self._handles), 0, 0))
            proto.transport.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(proto.closed), 5)
        if not proto.closed.done() and proto.transport is not None:
            proto.transport.abort()  # type: ignore[attr-defined]


# --- handshake ---------------------------------------------------------------------


async def connect(
    address: Address,
    export: str,
    *,
    meta_contexts: Sequence[str] = (),
    tls: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> NbdClient:
    """Connect, negotiate and enter transmission on `export`.

    Every context in `meta_contexts` must be granted by the server, or the
    connection fails naming the missing ones (an incremental backup must not
    silently lose its dirty bitmap). `timeout` bounds the handshake and,
    later, any wait for a reply while requests are outstanding.
    """
    name = f"{address} export '{export}'"
    proto = await open_connection(address, name, timeout)
    try:
        async with asyncio.timeout(timeout):
            ex = await handshake(proto, address, export, meta_contexts, tls)
    except WireError as exc:
        error: NbdError = NbdProtocolError(f"{name}: protocol violation: {exc}")
        proto.abort(error)
        raise error from exc
    except TimeoutError as exc:
        error = NbdTimeoutError(f"{name}: handshake did not finish within {timeout}s")
        proto.abort(error)
        raise error from exc
    except BaseException:
        proto.abort(NbdConnectionError(f"{name}: handshake failed"))
        raise
    proto.contexts_by_id = {v: k for k, v in ex.contexts.items()}
    proto.transmission = True
    proto.buffer_updated(0)  # parse anything that arrived with the last handshake reply
    return NbdClient(proto, export, ex, timeout)
