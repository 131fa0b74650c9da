"""The NBD handshake (fixed newstyle option haggling), up to the
transmission phase, and NBD_OPT_LIST_META_CONTEXT."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from virtbackupd.adapters.nbd import protocol as p
from virtbackupd.adapters.nbd.addresses import Address, TcpAddress, UnixAddress
from virtbackupd.adapters.nbd.protocol import BlockSize, WireError
from virtbackupd.adapters.nbd.receiver import Connection
from virtbackupd.errors import NbdConnectionError, NbdProtocolError


async def open_connection(address: Address, name: str, timeout: float) -> Connection:
    loop = asyncio.get_running_loop()
    proto = Connection(name)
    try:
        async with asyncio.timeout(timeout):
            if isinstance(address, UnixAddress):
                await loop.create_unix_connection(lambda: proto, address.path)
            else:
                await loop.create_connection(lambda: proto, address.host, address.port)
    except (OSError, TimeoutError) as exc:
        raise NbdConnectionError(f"{name}: cannot connect: {exc or 'timed out'}") from exc
    return proto


async def _option(proto: Connection, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
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


def _option_error(proto: Connection, what: str, rtype: int, payload: bytes) -> NbdConnectionError:
    name = p.REP_ERRORS.get(rtype, f"reply type {rtype:#x}")
    msg = payload.decode("utf-8", errors="replace")
    return NbdConnectionError(f"{proto.name}: {what} refused: {name}{': ' + msg if msg else ''}")


async def _negotiate(
    proto: Connection,
    address: Address,
    tls: ssl.SSLContext | None,
) -> Connection:
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
class ExportInfo:
    size: int
    flags: int
    block_size: BlockSize
    contexts: dict[str, int]


async def _set_meta_contexts(
    proto: Connection, export: str, meta_contexts: Sequence[str]
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


async def _go(proto: Connection, export: str, contexts: dict[str, int]) -> ExportInfo:
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
    return ExportInfo(size, flags, block_size, contexts)


async def handshake(
    proto: Connection,
    address: Address,
    export: str,
    meta_contexts: Sequence[str],
    tls: ssl.SSLContext | None,
) -> ExportInfo:
    await _negotiate(proto, address, tls)
    rtype, _ = (await _option(proto, p.OPT_STRUCTURED_REPLY))[-1]
    proto.structured = rtype == p.REP_ACK
    contexts = await _set_meta_contexts(proto, export, meta_contexts) if meta_contexts else {}
    return await _go(proto, export, contexts)


async def list_meta_contexts(
    address: Address, export: str, queries: Sequence[str] = (), timeout: float = 30.0
) -> list[str]:
    """Names of the metadata contexts the server offers for `export`
    (NBD_OPT_LIST_META_CONTEXT), then a soft disconnect (NBD_OPT_ABORT)."""
    name = f"{address} export '{export}'"
    proto = await open_connection(address, name, timeout)
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
