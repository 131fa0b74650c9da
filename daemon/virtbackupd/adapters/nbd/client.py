"""An asyncio NBD client (fixed newstyle, structured replies, metadata
contexts, many requests in flight).

Receiving is done by an :class:`asyncio.BufferedProtocol`: small messages are
parsed out of a scratch buffer, and the data of READ replies is received
straight into the caller's buffer (no copy), but only after the chunk's
offset and length were checked against the request. A server that breaks
the protocol gets a hard disconnect and every outstanding request fails with
:class:`NbdProtocolError`; a request that failed is never reported as data.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from virtbackupd.adapters.nbd import protocol as p
from virtbackupd.adapters.nbd.protocol import BlockSize, Extent, WireError
from virtbackupd.errors import (
    NbdConnectionError,
    NbdError,
    NbdProtocolError,
    NbdServerError,
    NbdTimeoutError,
)

_SCRATCH = 256 * 1024
#: Payloads are handed to the transport in slices of this size, each only
#: once the previous ones drained (asyncio in 3.11 copies what it buffers).
_SEND_SLICE = 512 * 1024
#: Socket buffers asked for (root may exceed the sysctl limits): a 4 MiB
#: request then mostly moves in one system call.
_SOCKET_BUFFER = 8 * 1024 * 1024


def _grow_socket_buffers(sock: Any) -> None:
    for force, plain in (
        (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
        (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
    ):
        for opt in (force, plain):
            if opt is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
                break
            except OSError:
                continue  # not privileged: fall back to what the kernel allows


#: Largest non-data reply payload accepted (block status of a fragmented
#: region is the biggest; QEMU caps those far below this).
_MAX_SMALL_PAYLOAD = 64 * 1024 * 1024


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"nbd+unix:///?socket={self.path}"


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int = 10809

    def __str__(self) -> str:
        return f"nbd://{self.host}:{self.port}"


Address = UnixAddress | TcpAddress


@dataclass
class _Request:
    cmd: int
    flags: int
    offset: int
    length: int
    future: asyncio.Future[Any]
    buf: memoryview | None = None  # READ destination
    chunks: list[tuple[int, int]] = field(default_factory=list)  # READ coverage, request-relative
    error: NbdServerError | None = None
    extents: dict[int, list[Extent]] = field(default_factory=dict)

    def describe(self) -> str:
        name = p.CMD_NAMES.get(self.cmd, str(self.cmd))
        return f"{name} {self.offset}+{self.length}"


# Receive states
_HEADER, _SMALL, _DATA_OFFSET, _DATA, _SIMPLE_DATA = range(5)


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.BaseTransport | None = None
        self.scratch = bytearray(_SCRATCH)
        self.start = 0
        self.end = 0
        self.direct: memoryview | None = None  # where received bytes go, when not scratch
        self.waiter: asyncio.Future[None] | None = None  # handshake reads
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.broken: Exception | None = None
        self.transmission = False
        self.structured = False
        self.pending: dict[int, _Request] = {}
        self.last_progress = self.loop.time()
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.send_lock = asyncio.Lock()
        # current reply being received
        self.state = _HEADER
        self.req: _Request | None = None
        self.chunk_flags = 0
        self.chunk_type = 0
        self.chunk_len = 0
        self.chunk_offset = 0
        self.small: bytearray | None = None
        self.data_end = 0
        self.contexts_by_id: dict[int, str] = {}  # set once negotiation is done

    # --- asyncio callbacks -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _grow_socket_buffers(sock)
        if isinstance(transport, asyncio.WriteTransport):
            # Small limits: payloads are fed in slices as the socket drains,
            # instead of piling up (and being copied) in the transport buffer.
            transport.set_write_buffer_limits(high=_SEND_SLICE, low=_SEND_SLICE // 4)

    def connection_lost(self, exc: Exception | None) -> None:
        n = len(self.pending)
        why = f"{self.name}: server closed the connection"
        if n:
            why += f" with {n} request(s) outstanding"
        if exc is not None:
            why += f" ({exc})"
        self._fail(NbdConnectionError(why))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.direct is not None:
            return self.direct
        if self.end == len(self.scratch):
            # Keep unparsed bytes, drop parsed ones.
            rest = self.end - self.start
            self.scratch[:rest] = self.scratch[self.start : self.end]
            self.start, self.end = 0, rest
        return memoryview(self.scratch)[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.last_progress = self.loop.time()
        if self.direct is not None:
            self.direct = self.direct[nbytes:]
            if len(self.direct) == 0:
                self.direct = None
                self._direct_done()
        else:
            self.end += nbytes
        if self.transmission:
            try:
                self._parse()
            except WireError as exc:
                self.abort(NbdProtocolError(f"{self.name}: protocol violation: {exc}"))
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost fails what is pending

    # --- failure -----------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        if self.broken is None:
            self.broken = exc
        pending, self.pending = self.pending, {}
        for req in pending.values():
            if not req.future.done():
                req.future.set_exception(exc)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.direct = None
        self.can_write.set()  # wake senders; they see `broken`

    def abort(self, exc: Exception) -> None:
        """Hard disconnect: fail everything outstanding with `exc`."""
        self._fail(exc)
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    # --- handshake phase: plain sequential reads -------------------------------------
    async def recv_exactly(self, n: int) -> bytes:
        if n > len(self.scratch):
            raise NbdProtocolError(f"{self.name}: handshake message of {n} bytes is too large")
        while self.end - self.start < n:
            if self.broken is not None:
                raise self.broken
            if self.start and len(self.scratch) - self.start < n:
                rest = self.end - self.start
                self.scratch[:rest] = self.scratch[self.start : self.end]
                self.start, self.end = 0, rest
            self.waiter = self.loop.create_future()
            await self.waiter
        out = bytes(self.scratch[self.start : self.start + n])
        self.start += n
        return out

    def send(self, data: bytes | memoryview) -> None:
        if self.broken is not None:
            raise self.broken
        assert isinstance(self.transport, asyncio.WriteTransport)
        self.transport.write(data)

    async def send_message(self, header: bytes, payload: bytes | memoryview | None) -> None:
        """Send a request and its payload as one unit, slice by slice as the
        socket drains, without interleaving with other requests."""
        async with self.send_lock:
            if not self.can_write.is_set():
                await self.can_write.wait()
            self.send(header)
            if payload is None:
                return
            view = memoryview(payload)
            for pos in range(0, len(view), _SEND_SLICE):
                if not self.can_write.is_set():
                    await self.can_write.wait()
                    if self.broken is not None:
                        raise self.broken
                self.send(view[pos : pos + _SEND_SLICE])

    # --- transmission phase: reply parsing -------------------------------------------
    def _take(self, n: int) -> bytes | None:
        if self.end - self.start < n:
            return None
        out = bytes(self.scratch[self.start : self.start + n])
        self.start += n
        return out

    def _parse(self) -> None:
        while self.direct is None and self.broken is None:
            if self.state == _HEADER:
                if not self._parse_header():
                    return
            elif self.state == _SMALL:
                assert self.small is not None
                if len(self.small) < self.chunk_len:
                    self._fill_small()
                    if len(self.small) < self.chunk_len:
                        return
                payload, self.small = bytes(self.small), None
                self._chunk_payload(payload)
            elif self.state == _DATA_OFFSET:
                raw = self._take(8)
                if raw is None:
                    return
                self._start_data(struct.unpack(">Q", raw)[0])
            else:  # pragma: no cover - _DATA/_SIMPLE_DATA always go through direct
                raise AssertionError(self.state)

    def _fill_small(self) -> None:
        assert self.small is not None
        want = self.chunk_len - len(self.small)
        got = min(want, self.end - self.start)
        self.small += self.scratch[self.start : self.start + got]
        self.start += got

    def _parse_header(self) -> bool:
        if self.end - self.start < 4:
            return False
        (magic,) = struct.unpack_from(">I", self.scratch, self.start)
        if magic == p.SIMPLE_REPLY_MAGIC:
            raw = self._take(p.SIMPLE_REPLY.size)
            if raw is None:
                return False
            _, error, handle = p.SIMPLE_REPLY.unpack(raw)
            self._simple_reply(error, handle)
            return True
        if magic == p.STRUCTURED_REPLY_MAGIC:
            raw = self._take(p.STRUCTURED_REPLY.size)
            if raw is None:
                return False
            _, flags, rtype, handle, length = p.STRUCTURED_REPLY.unpack(raw)
            self._structured_header(flags, rtype, handle, length)
            return True
        raise WireError(f"reply magic {magic:#x} is neither simple nor structured")

    def _lookup(self, handle: int) -> _Request:
        req = self.pending.get(handle)
        if req is None:
            raise WireError(f"reply for unknown handle {handle:#x}")
        return req

    def _simple_reply(self, error: int, handle: int) -> None:
        req = self._lookup(handle)
        if error:
            req.error = self._server_error(req, error, "")
            self._complete(handle)
            return
        if req.cmd == p.CMD_READ:
            if self.structured:
                raise WireError("simple reply to READ after structured replies were negotiated")
            self.req = req
            self.state = _SIMPLE_DATA
            self.chunk_offset = req.offset
            self.data_end = req.length
            self._receive_into(req, 0, req.length)
            return
        self._complete(handle)

    def _structured_header(self, flags: int, rtype: int, handle: int, length: int) -> None:
        if not self.structured:
            raise WireError("structured reply chunk without structured replies negotiated")
        req = self._lookup(handle)
        self.req, self.chunk_flags, self.chunk_type, self.chunk_len = req, flags, rtype, length
        if rtype == p.REPLY_TYPE_OFFSET_DATA:
            if req.cmd != p.CMD_READ:
                raise WireError(f"data chunk in reply to {req.describe()}")
            if length <= 8:
                raise WireError(f"data chunk of length {length} carries no data")
            self.state = _DATA_OFFSET
            return
        if length > _MAX_SMALL_PAYLOAD:
            raise WireError(f"chunk type {rtype} of {length} bytes is too large")
        self.small = bytearray()
        self.state = _SMALL

    def _chunk_payload(self, payload: bytes) -> None:
        req = self.req
        assert req is not None
        rtype = self.chunk_type
        if rtype == p.REPLY_TYPE_NONE:
            if payload:
                raise WireError("NBD_REPLY_TYPE_NONE with a payload")
            if not self.chunk_flags & p.REPLY_FLAG_DONE:
                raise WireError("NBD_REPLY_TYPE_NONE without the DONE flag")
        elif rtype == p.REPLY_TYPE_OFFSET_HOLE:
            if req.cmd != p.CMD_READ or len(payload) != 12:
                raise WireError(f"bad hole chunk in reply to {req.describe()}")
            off, size = struct.unpack(">QI", payload)
            rel = self._check_chunk(req, off, size)
            if req.buf is not None:
                req.buf[rel : rel + size] = bytes(size)
        elif rtype == p.REPLY_TYPE_BLOCK_STATUS:
            if req.cmd != p.CMD_BLOCK_STATUS:
                raise WireError(f"block status chunk in reply to {req.describe()}")
            ctx, extents = p.parse_block_status(
                payload, req.offset, req.length, bool(req.flags & p.CMD_FLAG_REQ_ONE)
            )
            if ctx not in self.contexts_by_id or ctx in req.extents:
                raise WireError(f"block status for unexpected context id {ctx}")
            req.extents[ctx] = extents
        elif rtype & p.REPLY_TYPE_ERROR_BIT:
            known = rtype in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET)
            err, msg, off = p.parse_error_chunk(
                payload, rtype == p.REPLY_TYPE_ERROR_OFFSET if known else False
            )
            if off is not None and not req.offset <= off < req.offset + max(req.length, 1):
                raise WireError(f"error offset {off} outside {req.describe()}")
            if req.error is None:
                where = f" at offset {off}" if off is not None else ""
                req.error = self._server_error(req, err, msg + where)
        else:
            raise WireError(f"unknown chunk type {rtype} in reply to {req.describe()}")
        self._chunk_done()

    def _check_chunk(self, req: _Request, off: int, size: int) -> int:
        """Validate a content chunk against the request; return its offset
        in the request buffer. Nothing is written before this passed."""
        rel = off - req.offset
        if size == 0 or rel < 0 or rel + size > req.length:
            raise WireError(f"chunk {off}+{size} outside {req.describe()}")
        for s, e in req.chunks:
            if rel < e and s < rel + size:
                raise WireError(f"chunk {off}+{size} overlaps an earlier one in {req.describe()}")
        req.chunks.append((rel, rel + size))
        return rel

    def _start_data(self, off: int) -> None:
        req = self.req
        assert req is not None
        size = self.chunk_len - 8
        rel = self._check_chunk(req, off, size)
        self.state = _DATA
        self._receive_into(req, rel, size)

    def _receive_into(self, req: _Request, rel: int, size: int) -> None:
        """Receive `size` payload bytes into the request buffer at `rel`,
        first from what is already in scratch, then directly."""
        dest = req.buf[rel : rel + size] if req.buf is not None else memoryview(bytearray(size))
        have = min(size, self.end - self.start)
        dest[:have] = self.scratch[self.start : self.start + have]
        self.start += have
        if have == size:
            self._direct_done()
        else:
            self.direct = dest[have:]

    def _direct_done(self) -> None:
        if self.state == _SIMPLE_DATA:
            assert self.req is not None
            self.state = _HEADER
            self._complete_req(self.req)
            return
        self._chunk_done()

    def _chunk_done(self) -> None:
        req = self.req
        assert req is not None
        self.state = _HEADER
        if self.chunk_flags & p.REPLY_FLAG_DONE:
            self._complete_req(req)

    def _complete(self, handle: int) -> None:
        self._complete_req(self.pending[handle])

    def _complete_req(self, req: _Request) -> None:
        # Judge the reply while the request is still pending, so that a
        # protocol violation found here fails it together with the rest.
        if req.error is None and req.cmd == p.CMD_READ and self.structured:
            covered = sum(e - s for s, e in req.chunks)
            if covered != req.length:
                raise WireError(
                    f"{req.describe()} ended after {covered} of {req.length} bytes without error"
                )
        if (
            req.error is None
            and req.cmd == p.CMD_BLOCK_STATUS
            and set(req.extents) != set(self.contexts_by_id)
        ):
            raise WireError(f"{req.describe()} ended without a status for every context")
        handle = next(h for h, r in self.pending.items() if r is req)
        del self.pending[handle]
        self.req = None
        if req.future.done():  # the caller gave up (cancelled); nothing to deliver
            return
        if req.error is not None:
            req.future.set_exception(req.error)
        else:
            req.future.set_result(req.extents if req.cmd == p.CMD_BLOCK_STATUS else None)

    def _server_error(self, req: _Request, error: int, message: str) -> NbdServerError:
        return NbdServerError(self.name, req.describe(), p.errno_name(error), message)


class NbdClient:
    """One connection to one export, in the transmission phase.

    Use :func:`connect`; close with :meth:`close` (or ``async with``).
    """

    def __init__(
        self,
        proto: _Protocol,
        export: str,
        size: int,
        flags: int,
        block_size: BlockSize,
        contexts: dict[str, int],
        timeout: float,
    ) -> None:
        self._proto = proto
        self.export = export
        self.size = size
        self.flags = flags
        self.block_size = block_size
        self.contexts = contexts
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
        req = _Request(cmd, flags, offset, length, proto.loop.create_future(), buf=buf)
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


async def _open(address: Address, name: str, timeout: float) -> _Protocol:
    loop = asyncio.get_running_loop()
    proto = _Protocol(name)
    try:
        async with asyncio.timeout(timeout):
            if isinstance(address, UnixAddress):
                await loop.create_unix_connection(lambda: proto, address.path)
            else:
                await loop.create_connection(lambda: proto, address.host, address.port)
    except (OSError, TimeoutError) as exc:
        raise NbdConnectionError(f"{name}: cannot connect: {exc or 'timed out'}") from exc
    return proto


async def _option(proto: _Protocol, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send an option; collect its replies up to the final ACK or error."""
    proto.send(p.pack_option(option, data))
    replies = []
    while True:
        magic, opt, rtype, length = p.OPTION_REPLY.unpack(
            await proto.recv_exactly(p.OPTION_REPLY.size)
        )
        if magic != p.OPTION_REPLY_MAGIC or opt != option:
            raise NbdProtocolError(
                f"{proto.name}: bad option reply "
                f"(magic {magic:#x}, option {opt}, expected {option})"
            )
        if length > 64 * 1024:
            raise NbdProtocolError(f"{proto.name}: option reply of {length} bytes is too large")
        payload = await proto.recv_exactly(length) if length else b""
        replies.append((rtype, payload))
        if rtype == p.REP_ACK or rtype & p.REP_ERR_BIT:
            return replies


def _option_error(proto: _Protocol, what: str, rtype: int, payload: bytes) -> NbdConnectionError:
    name = p.REP_ERRORS.get(rtype, f"reply type {rtype:#x}")
    msg = payload.decode("utf-8", errors="replace")
    return NbdConnectionError(f"{proto.name}: {what} refused: {name}{': ' + msg if msg else ''}")


async def _negotiate(
    proto: _Protocol,
    address: Address,
    tls: ssl.SSLContext | None,
) -> _Protocol:
    nbdmagic, second = struct.unpack(">QQ", await proto.recv_exactly(16))
    if nbdmagic != p.NBDMAGIC:
        raise NbdProtocolError(f"{proto.name}: not an NBD server (magic {nbdmagic:#x})")
    if second == p.CLISERV_MAGIC:
        raise NbdConnectionError(f"{proto.name}: server speaks oldstyle NBD, which is unsupported")
    if second != p.IHAVEOPT:
        raise NbdProtocolError(f"{proto.name}: unexpected handshake magic {second:#x}")
    (hflags,) = struct.unpack(">H", await proto.recv_exactly(2))
    if not hflags & p.FLAG_FIXED_NEWSTYLE:
        raise NbdConnectionError(f"{proto.name}: server lacks fixed newstyle negotiation")
    cflags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if hflags & p.FLAG_NO_ZEROES else 0)
    proto.send(struct.pack(">I", cflags))
    if tls is not None:
        rtype, payload = (await _option(proto, p.OPT_STARTTLS))[-1]
        if rtype != p.REP_ACK:
            raise _option_error(proto, "STARTTLS", rtype, payload)
        assert proto.transport is not None
        host = address.host if isinstance(address, TcpAddress) else None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(
                proto.transport,  # type: ignore[arg-type]
                proto,
                tls,
                server_hostname=host,
            )
        except (OSError, ssl.SSLError) as exc:
            raise NbdConnectionError(f"{proto.name}: TLS handshake failed: {exc}") from exc
        proto.transport = new
    return proto


@dataclass(frozen=True)
class _Export:
    size: int
    flags: int
    block_size: BlockSize
    contexts: dict[str, int]


async def _set_meta_contexts(
    proto: _Protocol, export: str, meta_contexts: Sequence[str]
) -> dict[str, int]:
    if not proto.structured:
        raise NbdConnectionError(
            f"{proto.name}: server has no structured replies, so no metadata contexts"
        )
    replies = await _option(
        proto, p.OPT_SET_META_CONTEXT, p.pack_meta_context_query(export, tuple(meta_contexts))
    )
    rtype, payload = replies[-1]
    if rtype != p.REP_ACK:
        raise _option_error(proto, "SET_META_CONTEXT", rtype, payload)
    contexts: dict[str, int] = {}
    for rt, data in replies[:-1]:
        if rt != p.REP_META_CONTEXT:
            raise NbdProtocolError(f"{proto.name}: unexpected reply {rt} to SET_META_CONTEXT")
        ctx_id, ctx_name = p.parse_meta_context(data)
        contexts[ctx_name] = ctx_id
    missing = [c for c in meta_contexts if c not in contexts]
    if missing:
        raise NbdConnectionError(
            f"{proto.name}: server does not offer metadata context(s): {', '.join(missing)}"
        )
    return contexts


async def _go(proto: _Protocol, export: str, contexts: dict[str, int]) -> _Export:
    replies = await _option(proto, p.OPT_GO, p.pack_go(export, (p.INFO_BLOCK_SIZE,)))
    rtype, payload = replies[-1]
    if rtype != p.REP_ACK:
        raise _option_error(proto, f"export '{export}'", rtype, payload)
    size = flags = None
    block_size = BlockSize()
    for rt, data in replies[:-1]:
        if rt != p.REP_INFO or len(data) < 2:
            raise NbdProtocolError(f"{proto.name}: unexpected reply {rt} to GO")
        (info,) = struct.unpack(">H", data[:2])
        if info == p.INFO_EXPORT:
            size, flags = p.parse_info_export(data[2:])
        elif info == p.INFO_BLOCK_SIZE:
            block_size = p.parse_block_size(data[2:])
    if size is None or flags is None:
        raise NbdProtocolError(f"{proto.name}: GO succeeded without NBD_INFO_EXPORT")
    return _Export(size, flags, block_size, contexts)


async def _handshake(
    proto: _Protocol,
    address: Address,
    export: str,
    meta_contexts: Sequence[str],
    tls: ssl.SSLContext | None,
) -> _Export:
    await _negotiate(proto, address, tls)
    rtype, _ = (await _option(proto, p.OPT_STRUCTURED_REPLY))[-1]
    proto.structured = rtype == p.REP_ACK
    contexts = await _set_meta_contexts(proto, export, meta_contexts) if meta_contexts else {}
    return await _go(proto, export, contexts)


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
    proto = await _open(address, name, timeout)
    try:
        async with asyncio.timeout(timeout):
            ex = await _handshake(proto, address, export, meta_contexts, tls)
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
    return NbdClient(proto, export, ex.size, ex.flags, ex.block_size, ex.contexts, timeout)


async def list_meta_contexts(
    address: Address, export: str, queries: Sequence[str] = (), timeout: float = 30.0
) -> list[str]:
    """Names of the metadata contexts the server offers for `export`
    (NBD_OPT_LIST_META_CONTEXT), then a soft disconnect (NBD_OPT_ABORT)."""
    name = f"{address} export '{export}'"
    proto = await _open(address, name, timeout)
    try:
        async with asyncio.timeout(timeout):
            await _negotiate(proto, address, None)
            rtype, payload = (await _option(proto, p.OPT_STRUCTURED_REPLY))[-1]
            if rtype != p.REP_ACK:
                raise _option_error(proto, "STRUCTURED_REPLY", rtype, payload)
            replies = await _option(
                proto, p.OPT_LIST_META_CONTEXT, p.pack_meta_context_query(export, tuple(queries))
            )
            rtype, payload = replies[-1]
            if rtype != p.REP_ACK:
                raise _option_error(proto, "LIST_META_CONTEXT", rtype, payload)
            names = [p.parse_meta_context(data)[1] for _, data in replies[:-1]]
            proto.send(p.pack_option(p.OPT_ABORT))
            return names
    except WireError as exc:
        raise NbdProtocolError(f"{name}: protocol violation: {exc}") from exc
    finally:
        if proto.transport is not None:
            proto.transport.close()
