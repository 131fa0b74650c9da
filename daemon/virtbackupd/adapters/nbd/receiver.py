"""Receiving side of one NBD connection: an :class:`asyncio.BufferedProtocol`.

Small messages are parsed out of a scratch buffer; the data of a READ reply
goes straight into the caller's buffer (no copy), but only after the chunk's
offset and length were checked against the request (and earlier chunks). A
protocol violation drops the connection and fails every outstanding request
with :class:`NbdProtocolError`; a request that failed is never reported as
data. Sending (``send_message``) slices payloads as the socket drains.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from virtbackupd.adapters.nbd import protocol as p
from virtbackupd.adapters.nbd.protocol import Extent, WireError
from virtbackupd.errors import NbdConnectionError, NbdProtocolError, NbdServerError

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


@dataclass
class PendingRequest:
    handle: int
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


class Connection(asyncio.BufferedProtocol):
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
        self.pending: dict[int, PendingRequest] = {}
        self.last_progress = self.loop.time()
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.send_lock = asyncio.Lock()
        # current reply being received
        self.state = _HEADER
        self.req: PendingRequest | None = None
        self.chunk_flags = 0
        self.chunk_type = 0
        self.chunk_len = 0
        self.small: bytearray | None = None
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

    def _lookup(self, handle: int) -> PendingRequest:
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

    # C901: one branch per structured reply chunk type of the NBD spec, each checked
    def _chunk_payload(self, payload: bytes) -> None:  # noqa: C901 (see above)
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

    def _check_chunk(self, req: PendingRequest, off: int, size: int) -> int:
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

    def _receive_into(self, req: PendingRequest, rel: int, size: int) -> None:
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

    def _complete_req(self, req: PendingRequest) -> None:
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
        del self.pending[req.handle]
        self.req = None
        if req.future.done():  # the caller gave up (cancelled); nothing to deliver
            return
        if req.error is not None:
            req.future.set_exception(req.error)
        else:
            req.future.set_result(req.extents if req.cmd == p.CMD_BLOCK_STATUS else None)

    def _server_error(self, req: PendingRequest, error: int, message: str) -> NbdServerError:
        return NbdServerError(self.name, req.describe(), p.errno_name(error), message)
