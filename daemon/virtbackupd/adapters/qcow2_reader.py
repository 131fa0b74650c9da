"""Reading a qcow2 image with its backing chain in our own process, as
restores do: what the image shows (its *view*), answered the way an NBD
export of it would answer (block status, reads), without a qemu-nbd.

Reading the chain through a qemu-nbd cost restores 1.5-2x the time of
`qemu-img convert` (docs/performance.md): the server, not the copy, was
the limit. What is read of the format (QEMU's docs/interop/qcow2.txt):
versions 2 and 3, any cluster size, the L1 and L2 tables with standard L2
entries (data, "reads as zeroes", unallocated: the backing file's), the
backing file name and its format extension. Images using anything else
(encryption, an external data file, extended L2 entries, a backing file
that is not qcow2, a header marked corrupt) are refused at open with
:class:`Qcow2UnsupportedError`, so the caller reads them through qemu-nbd
instead; a compressed cluster, which no backup holds, fails the read.
The dirty flag (refcounts not yet settled after a crash of a writer) does
not affect what the tables map, and is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from virtbackupd.adapters.image_files import aligned_for_direct_io
from virtbackupd.adapters.nbd.protocol import (
    CONTEXT_BASE_ALLOCATION,
    STATE_HOLE,
    STATE_ZERO,
    BlockSize,
    Extent,
)
from virtbackupd.errors import VirtBackupError

MAGIC = b"QFI\xfb"
_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # the version 2 fields
_V3 = struct.Struct(">QQQII")
_EXTENSION = struct.Struct(">II")
_BACKING_FORMAT = 0xE2792ACA
_INCOMPAT_CORRUPT = 1 << 1
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_EXTENDED_L2 = 1 << 4
_KNOWN_INCOMPAT = 0b11111  # dirty, corrupt, data file, compression type, extended L2
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COMPRESSED = 1 << 62
ZERO_FLAG = 1
MAX_REQUEST = 32 * 1024 * 1024
MAX_DEPTH = 1000
L2_CACHE = 256  # tables kept per chain (with 64 KiB clusters: 16 MiB, 128 GiB mapped)


class Qcow2UnsupportedError(VirtBackupError):
    """The image uses a part of qcow2 this reader does not read."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        super().__init__(f"{path}: {what}")


class Qcow2ReadError(VirtBackupError):
    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        super().__init__(f"{path}: {what}")


@dataclass
class _Layer:
    path: Path
    fd: int
    direct_fd: int | None  # O_DIRECT where the file system takes it
    size: int
    cluster_bits: int
    l1: array  # type: ignore[type-arg]


@dataclass(frozen=True)
class _Run:
    """A run of the view: `length` bytes at guest `offset`, read from
    `layer` at host `host`, or zeroes (layer None)."""

    offset: int
    length: int
    layer: int | None
    host: int = 0


class Qcow2Chain:
    """The view of a qcow2 image and its backing files, with the parts of
    an NBD client's interface the copy engine uses (engine.datapath.copy.Source)."""

    def __init__(self, layers: list[_Layer]) -> None:
        self.layers = layers
        self.size = layers[0].size
        self.contexts = frozenset({CONTEXT_BASE_ALLOCATION})
        self.max_request = MAX_REQUEST
        self.block_size = BlockSize(minimum=512, preferred=4096, maximum=MAX_REQUEST)
        self._l2: OrderedDict[tuple[int, int], array] = OrderedDict()  # type: ignore[type-arg]
        self._l2_lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self.layers[0].path)

    @classmethod
    def open(cls, image: Path) -> Qcow2Chain:
        layers: list[_Layer] = []
        path: Path | None = image
        try:
            while path is not None and len(layers) <= MAX_DEPTH:
                # A backing file never through a symlink (its name was
                # checked, the link's target would not be).
                layer, path = _open_layer(path, follow=not layers)
                layers.append(layer)
            _check_depth(image, path)
        except BaseException:
            for layer in layers:
                _close(layer)
            raise
        return cls(layers)

    def close(self) -> None:
        for layer in self.layers:
            _close(layer)
        self.layers = []
        self._l2.clear()

    # --- mapping --------------------------------------------------------------------------

    def _l2_table(self, n: int, index: int) -> array | None:  # type: ignore[type-arg]
        layer = self.layers[n]
        if index >= len(layer.l1):
            return None
        l2_offset = layer.l1[index] & OFFSET_MASK
        if not l2_offset:
            return None
        key = (n, index)
        # Reads run in several worker threads at once: one of them evicting
        # a table while another moves it to the end would fail.
        with self._l2_lock:
            table = self._l2.get(key)
            if table is None:
                cluster = 1 << layer.cluster_bits
                raw = os.pread(layer.fd, cluster, l2_offset)
                if len(raw) != cluster:
                    raise Qcow2ReadError(layer.path, f"L2 table at {l2_offset} is cut short")
                table = _be64(raw)
                self._l2[key] = table
                if len(self._l2) > L2_CACHE:
                    self._l2.popitem(last=False)
            else:
                self._l2.move_to_end(key)
            return table

    def _resolve(self, offset: int) -> tuple[int | None, int, int]:
        """Who shows guest byte `offset`: (layer or None for zeroes, host
        offset of that byte, bytes from it that every layer looked at maps
        the same way: up to the nearest cluster end among them)."""
        bound = 1 << 62
        for n, layer in enumerate(self.layers):
            cluster = 1 << layer.cluster_bits
            within = offset & (cluster - 1)
            bound = min(bound, cluster - within)
            if offset >= layer.size:
                return None, 0, bound  # beyond a (shorter) backing file: zeroes
            entries = cluster // 8
            c = offset >> layer.cluster_bits
            table = self._l2_table(n, c // entries)
            if table is None:
                continue
            entry = table[c % entries]
            if entry & COMPRESSED:
                raise Qcow2ReadError(
                    layer.path,
                    f"guest offset {offset} is a compressed cluster, which restores do not "
                    "read; convert the chain with qemu-img (docs/restore.md)",
                )
            if entry & ZERO_FLAG:
                return None, 0, bound
            host = entry & OFFSET_MASK
            if host:
                return n, host + within, bound
        return None, 0, bound  # unallocated everywhere: zeroes

    def runs(self, offset: int, length: int) -> Iterator[_Run]:
        """The view from `offset` for `length` bytes, as maximal runs."""
        pos, end = offset, offset + length
        cur: _Run | None = None
        while pos < end:
            layer, host, left = self._resolve(pos)
            n = min(left, end - pos)
            if (
                cur is not None
                and cur.layer == layer
                and (layer is None or cur.host + cur.length == host)
            ):
                cur = _Run(cur.offset, cur.length + n, layer, cur.host)
            else:
                if cur is not None:
                    yield cur
                cur = _Run(pos, n, layer, host)
            pos += n
        if cur is not None:
            yield cur

    # --- the NBD-like interface -----------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> dict[str, list[Extent]]:
        """base:allocation as qemu-nbd answers it: data (0) or zeroes
        (ZERO|HOLE), at most 1 GiB of the view per call."""
        length = min(length, self.size - offset, 1 << 30)
        runs = await asyncio.to_thread(list, self.runs(offset, length))
        extents: list[Extent] = []
        for run in runs:
            flags = STATE_ZERO | STATE_HOLE if run.layer is None else 0
            if extents and extents[-1].flags == flags:
                last = extents.pop()
                extents.append(Extent(last.offset, last.length + run.length, flags))
            else:
                extents.append(Extent(run.offset, run.length, flags))
        return {CONTEXT_BASE_ALLOCATION: extents}

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise Qcow2ReadError(
                self.layers[0].path, f"read at {offset}+{len(buf)} beyond the disk"
            )
        await asyncio.to_thread(self._read_into, offset, buf)

    def _read_into(self, offset: int, buf: memoryview) -> None:
        for run in list(self.runs(offset, len(buf))):
            part = buf[run.offset - offset : run.offset - offset + run.length]
            if run.layer is None:
                part[:] = _zeroes(run.length)
                continue
            layer = self.layers[run.layer]
            fd = layer.fd
            if layer.direct_fd is not None and aligned_for_direct_io(run.host, part):
                fd = layer.direct_fd
            got = os.preadv(fd, [part], run.host)
            if got != run.length:
                raise Qcow2ReadError(
                    layer.path, f"data at {run.host} is cut short ({got} of {run.length} bytes)"
                )


@contextlib.contextmanager
def opened(image: Path) -> Iterator[Qcow2Chain]:
    chain = Qcow2Chain.open(image)
    try:
        yield chain
    finally:
        chain.close()


def check_backing_names(image: Path) -> None:
    """Walk the backing chain of `image` by the names in its headers,
    checking each as :class:`Qcow2Chain` does (raising Qcow2ReadError),
    without reading further: for callers about to hand the chain to QEMU's
    tools (`qemu-img info --backing-chain` opens whatever the name says,
    and hangs on a FIFO). A header this reader does not read ends the walk
    quietly: those callers refuse such images themselves. `image` itself
    is a backup's image: a link there (to anything, anywhere) is refused
    too, never followed."""
    path: Path | None = image
    for depth in range(MAX_DEPTH + 1):
        if path is None:
            return
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if depth == 0 and exc.errno == errno.ELOOP:
                raise Qcow2ReadError(
                    path, "is a symbolic link; a backup's images are never followed"
                ) from exc
            raise _open_error(path, exc) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise Qcow2ReadError(path, "is not a regular file")
            head = os.pread(fd, _HEADER.size, 0)
            if len(head) < _HEADER.size or head[:4] != MAGIC:
                return
            _, _, backing_off, backing_len, *_ = _HEADER.unpack_from(head)
            if not backing_off:
                return
            path = path.parent / _backing_name(path, fd, backing_off, backing_len)
        finally:
            os.close(fd)
    _check_depth(image, path)


def _open_error(path: Path, exc: OSError) -> Qcow2ReadError:
    if exc.errno == errno.ELOOP:
        return Qcow2ReadError(
            path, "is a symbolic link; a backing file is never followed through one"
        )
    return Qcow2ReadError(path, f"cannot open: {exc.strerror or exc}")


def _check_depth(image: Path, left: Path | None) -> None:
    if left is not None:
        raise Qcow2ReadError(image, f"its backing chain is over {MAX_DEPTH} files deep (a loop?)")


def _open_layer(path: Path, follow: bool = True) -> tuple[_Layer, Path | None]:
    """One image's header and L1 table, and the path of its backing file."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _open_error(path, exc) from exc
    try:
        return _parse(path, fd)
    except BaseException:
        os.close(fd)
        raise


def _parse(path: Path, fd: int) -> tuple[_Layer, Path | None]:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise Qcow2ReadError(path, "is not a regular file")
    head = os.pread(fd, 4096, 0)
    if len(head) < _HEADER.size or head[:4] != MAGIC:
        raise Qcow2UnsupportedError(path, "not a qcow2 image")
    (_, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off,
     _, _, _, _) = _HEADER.unpack_from(head)  # fmt: skip
    if version not in (2, 3):
        raise Qcow2UnsupportedError(path, f"qcow2 version {version}")
    if crypt:
        raise Qcow2UnsupportedError(path, "encrypted")
    if not 9 <= cluster_bits <= 21:
        raise Qcow2ReadError(path, f"cluster_bits {cluster_bits} is out of range")
    header_length = 72
    if version == 3:
        incompat, _, _, _, header_length = _V3.unpack_from(head, _HEADER.size)
        if incompat & _INCOMPAT_CORRUPT:
            raise Qcow2UnsupportedError(path, "marked corrupt")
        if incompat & (_INCOMPAT_DATA_FILE | _INCOMPAT_EXTENDED_L2 | ~_KNOWN_INCOMPAT):
            raise Qcow2UnsupportedError(path, f"incompatible features {incompat:#x}")
    backing = None
    if backing_off:
        backing = path.parent / _backing_name(path, fd, backing_off, backing_len)
        fmt = _backing_format(head, header_length, (1 << cluster_bits))
        if fmt not in (None, "qcow2"):
            raise Qcow2UnsupportedError(path, f"backing file format {fmt}")
    raw_l1 = os.pread(fd, l1_size * 8, l1_off) if l1_size else b""
    if len(raw_l1) != l1_size * 8:
        raise Qcow2ReadError(path, "L1 table is cut short")
    direct = None
    with contextlib.suppress(OSError):
        direct = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    return _Layer(path, fd, direct, size, cluster_bits, _be64(raw_l1)), backing


def _backing_name(path: Path, fd: int, offset: int, length: int) -> str:
    """The image's backing file name, if it is one of the two forms a
    repository writes: a file beside the image, or ``../<folder>/<file>``
    (the parent backup's image, engine.backup). The image is untrusted
    input: an absolute name, or one climbing anywhere else, would make a
    restore (as root) read a host file as the disk; refused, never
    followed. Checked before the format, so that no such image is handed
    to qemu-nbd instead (which would follow it)."""
    raw = os.pread(fd, min(length, 1024), offset)
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise Qcow2ReadError(path, f"backing file name {raw[:80]!r} is not UTF-8") from None
    parts = name.split("/")
    plain = [p not in ("", ".", "..") and "\x00" not in p for p in parts]
    if length > 1023 or not (
        (len(parts) == 1 and plain[0]) or (len(parts) == 3 and parts[0] == ".." and all(plain[1:]))
    ):
        raise Qcow2ReadError(
            path,
            f"backing file name {name[:120]!r} is absolute or leaves the chain's backup "
            "folders (only <file> or ../<backup folder>/<file> is followed); refused",
        )
    return name


def _backing_format(head: bytes, header_length: int, cluster: int) -> str | None:
    """The backing format header extension, if the image has one."""
    pos = header_length
    limit = min(len(head), cluster)
    while pos + _EXTENSION.size <= limit:
        kind, length = _EXTENSION.unpack_from(head, pos)
        pos += _EXTENSION.size
        if kind == 0:
            return None
        if kind == _BACKING_FORMAT:
            return head[pos : pos + length].decode()
        pos += (length + 7) & ~7
    return None


def _be64(raw: bytes) -> array:  # type: ignore[type-arg]
    table = array("Q", raw)
    if array("H", [1]).tobytes() == b"\x01\x00":  # a little-endian host
        table.byteswap()
    return table


def _close(layer: _Layer) -> None:
    os.close(layer.fd)
    if layer.direct_fd is not None:
        os.close(layer.direct_fd)


_ZERO = bytes(MAX_REQUEST)


def _zeroes(n: int) -> memoryview | bytes:
    return memoryview(_ZERO)[:n] if n <= len(_ZERO) else bytes(n)


__all__ = [
    "Qcow2Chain",
    "Qcow2ReadError",
    "Qcow2UnsupportedError",
    "check_backing_names",
    "opened",
]
