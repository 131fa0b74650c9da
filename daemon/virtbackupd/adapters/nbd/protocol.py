"""NBD wire format: constants, and packing/parsing that needs no I/O.

Everything here is pure so that it can be unit-tested against hand-made
byte strings; client.py does the I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Extent and the block-status flags are core types (the copy plans over
# them); they are the protocol's too, so they are importable from here.
from virtbackupd.core.extents import STATE_DIRTY as STATE_DIRTY
from virtbackupd.core.extents import STATE_HOLE as STATE_HOLE
from virtbackupd.core.extents import STATE_ZERO as STATE_ZERO
from virtbackupd.core.extents import Extent as Extent

# --- magics -------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation: not supported
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags ------------------------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# --- options --------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERRORS = {
    REP_ERR_BIT + 1: "NBD_REP_ERR_UNSUP",
    REP_ERR_BIT + 2: "NBD_REP_ERR_POLICY",
    REP_ERR_BIT + 3: "NBD_REP_ERR_INVALID",
    REP_ERR_BIT + 4: "NBD_REP_ERR_PLATFORM",
    REP_ERR_BIT + 5: "NBD_REP_ERR_TLS_REQD",
    REP_ERR_BIT + 6: "NBD_REP_ERR_UNKNOWN",
    REP_ERR_BIT + 7: "NBD_REP_ERR_SHUTDOWN",
    REP_ERR_BIT + 8: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    REP_ERR_BIT + 9: "NBD_REP_ERR_TOO_BIG",
    REP_ERR_BIT + 10: "NBD_REP_ERR_EXT_HEADER_REQD",
}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- transmission flags ---------------------------------------------------------
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_FAST_ZERO = 1 << 11

# --- commands -------------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3

# --- structured replies ---------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT + 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT + 2

# --- errors ---------------------------------------------------------------------
ERRNO_NAMES = {
    1: "EPERM",
    5: "EIO",
    12: "ENOMEM",
    22: "EINVAL",
    28: "ENOSPC",
    75: "EOVERFLOW",
    95: "ENOTSUP",
    108: "ESHUTDOWN",
}

# --- metadata contexts ------------------------------------------------------------
CONTEXT_BASE_ALLOCATION = "base:allocation"


def dirty_bitmap_context(bitmap: str) -> str:
    return f"qemu:dirty-bitmap:{bitmap}"


#: Largest payload a client may send or ask for when the server advertises
#: no maximum (the spec's "maximum payload of 32M" every server honours).
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
#: Strings (names, messages) are at most 4096 bytes by the spec.
MAX_STRING = 4096

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, type, length
REPLY_HEADER_SIZE = 4  # the magic decides which of the two headers follows


def errno_name(value: int) -> str:
    return ERRNO_NAMES.get(value, f"errno {value}")


def pack_request(flags: int, cmd: int, handle: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length)


def pack_option(option: int, data: bytes = b"") -> bytes:
    return OPTION.pack(IHAVEOPT, option, len(data)) + data


def pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise ValueError(f"NBD string longer than {MAX_STRING} bytes: {s[:40]!r}...")
    return struct.pack(">I", len(raw)) + raw


def pack_go(export: str, infos: tuple[int, ...]) -> bytes:
    return pack_string(export) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def pack_meta_context_query(export: str, queries: tuple[str, ...]) -> bytes:
    return (
        pack_string(export)
        + struct.pack(">I", len(queries))
        + b"".join(pack_string(q) for q in queries)
    )


@dataclass(frozen=True)
class BlockSize:
    """The server's block size constraints (NBD_INFO_BLOCK_SIZE)."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = DEFAULT_MAX_PAYLOAD


class WireError(ValueError):
    """A message does not follow the protocol; the text says how."""


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_block_size(payload: bytes) -> BlockSize:
    """Parse the payload of NBD_INFO_BLOCK_SIZE after its 2-byte type."""
    if len(payload) != 12:
        raise WireError(f"NBD_INFO_BLOCK_SIZE payload is {len(payload)} bytes, expected 12")
    minimum, preferred, maximum = struct.unpack(">III", payload)
    if not _power_of_two(minimum) or minimum > 64 * 1024:
        raise WireError(f"minimum block size {minimum} is not a power of two up to 64 KiB")
    if not _power_of_two(preferred) or preferred < max(minimum, 512):
        raise WireError(f"preferred block size {preferred} is invalid (minimum {minimum})")
    if maximum != 0xFFFFFFFF and (maximum < preferred or maximum % minimum):
        raise WireError(f"maximum block size {maximum} is invalid (minimum {minimum})")
    return BlockSize(minimum, preferred, min(maximum, DEFAULT_MAX_PAYLOAD))


def parse_info_export(payload: bytes) -> tuple[int, int]:
    """Size and transmission flags from NBD_INFO_EXPORT (after the type)."""
    if len(payload) != 10:
        raise WireError(f"NBD_INFO_EXPORT payload is {len(payload)} bytes, expected 10")
    size, flags = struct.unpack(">QH", payload)
    if not flags & TFLAG_HAS_FLAGS:
        raise WireError("transmission flags lack NBD_FLAG_HAS_FLAGS")
    return size, flags


def parse_meta_context(payload: bytes) -> tuple[int, str]:
    if len(payload) < 5 or len(payload) > 4 + MAX_STRING:
        raise WireError(f"NBD_REP_META_CONTEXT payload of {len(payload)} bytes")
    (ctx_id,) = struct.unpack(">I", payload[:4])
    try:
        name = payload[4:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("metadata context name is not UTF-8") from exc
    return ctx_id, name


def parse_error_chunk(payload: bytes, with_offset: bool) -> tuple[int, str, int | None]:
    """(errno, message, offset) of an NBD_REPLY_TYPE_ERROR[_OFFSET] chunk."""
    fixed = 14 if with_offset else 6
    if len(payload) < fixed:
        raise WireError(f"error chunk of {len(payload)} bytes, at least {fixed} expected")
    error, msglen = struct.unpack(">IH", payload[:6])
    if error == 0:
        raise WireError("error chunk with error value 0")
    if msglen != len(payload) - fixed:
        raise WireError(
            f"error chunk message length {msglen} does not fit its {len(payload)} bytes"
        )
    message = payload[6 : 6 + msglen].decode("utf-8", errors="replace")
    offset = struct.unpack(">Q", payload[6 + msglen :])[0] if with_offset else None
    return error, message, offset


def parse_block_status(
    payload: bytes, offset: int, length: int, req_one: bool
) -> tuple[int, list[Extent]]:
    """Context id and extents of an NBD_REPLY_TYPE_BLOCK_STATUS chunk for a
    request of (offset, length). The last extent may run past the request
    (the spec allows it); it is clipped so callers see only what they asked."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise WireError(f"block status chunk of {len(payload)} bytes is not 4 + 8*N (N >= 1)")
    (ctx_id,) = struct.unpack(">I", payload[:4])
    count = (len(payload) - 4) // 8
    if req_one and count != 1:
        raise WireError(f"block status with REQ_ONE returned {count} extents")
    pairs = struct.unpack(f">{2 * count}I", payload[4:])
    extents = []
    pos = offset
    end = offset + length
    for i in range(count):
        ext_len, flags = pairs[2 * i], pairs[2 * i + 1]
        if ext_len == 0:
            raise WireError("block status extent of length 0")
        if pos >= end:
            raise WireError("block status extents run past the requested range")
        extents.append(Extent(pos, min(ext_len, end - pos), flags))
        pos += ext_len
    if req_one and pos > end:
        raise WireError("block status with REQ_ONE returned an extent past the request")
    return ctx_id, extents
