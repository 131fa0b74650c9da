"""The part of the qcow2 format (QEMU's docs/interop/qcow2.txt) that the
backup writer produces, as offsets and bytes (no I/O).

A backup image is written once, front to back: the header cluster is
reserved, data clusters and L2 tables are appended in the order they
arrive, and at the end the L1 table, the refcount blocks and the refcount
table are appended and the header is filled in. Every host cluster below
the end is then in use exactly once, so every refcount is 1 and every
allocated L2/L1 entry carries the "copied" flag (refcount exactly one).

What is used of the format, and nothing else: version 3, 64 KiB clusters
(QEMU's default, so merges and restores see the images they always saw),
16-bit refcounts, standard L2 entries (data, and "reads as zeroes" in
overlays), an optional backing file name with its format extension. No
snapshots, compression, encryption, bitmaps, extended L2 entries or
external data files: the header sets no feature bit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8  # one L2 table maps 512 MiB of the disk
REFCOUNT_ORDER = 4  # 16-bit refcounts
REFCOUNTS_PER_BLOCK = CLUSTER * 8 >> REFCOUNT_ORDER
HEADER_LENGTH = 112  # version 3 fields, compression_type, padding to 8
MAX_BACKING_NAME = 1023

COPIED = 1 << 63  # L1/L2 entry: the cluster's refcount is exactly one
ZERO = 1  # L2 entry, bit 0: the cluster reads as zeroes (not from the backing file)
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55: the host offset

_MAGIC = b"QFI\xfb"
_BACKING_FORMAT = 0xE2792ACA  # header extension: backing file format name
_END = 0  # header extension: end of the area


def clusters(nbytes: int) -> int:
    """Clusters needed to hold `nbytes`."""
    return -(-nbytes // CLUSTER)


def l1_entries(virtual_size: int) -> int:
    """L1 entries that map a disk of `virtual_size` bytes."""
    return -(-clusters(virtual_size) // L2_ENTRIES)


def data_entry(host: int) -> int:
    """The L2 entry of a guest cluster stored at host offset `host`."""
    return host | COPIED


def table_entry(host: int) -> int:
    """The L1 entry of an L2 table stored at `host`."""
    return host | COPIED


def zeroed(entry: int) -> int:
    """`entry` made to read as zeroes. A cluster that had a host cluster
    keeps it (still referenced once, so no cluster leaks); one that had
    none becomes a zero cluster that hides its backing file."""
    return (entry & (OFFSET_MASK | COPIED)) | ZERO


@dataclass(frozen=True)
class Tail:
    """Where the metadata appended after the data goes (host offsets)."""

    l1_offset: int
    l1_clusters: int
    refblocks_offset: int
    refblocks: int
    reftable_offset: int
    reftable_clusters: int

    @property
    def end_cluster(self) -> int:
        """The first cluster past the image: every cluster below is in use."""
        return self.reftable_offset // CLUSTER + self.reftable_clusters


def tail_layout(used_clusters: int, l1_size: int) -> Tail:
    """The tail of an image whose first `used_clusters` clusters hold the
    header, data and L2 tables: the L1 table, then refcount blocks that
    count every cluster (themselves and the refcount table included), then
    the refcount table. Their number is the smallest that covers all."""
    l1_clusters = max(1, clusters(l1_size * 8))
    start = used_clusters + l1_clusters
    blocks = table = 0
    while True:
        total = start + blocks + table
        need_blocks = -(-total // REFCOUNTS_PER_BLOCK)
        need_table = max(1, clusters(need_blocks * 8))
        if (need_blocks, need_table) == (blocks, table):
            break
        blocks, table = need_blocks, need_table
    return Tail(
        l1_offset=used_clusters * CLUSTER,
        l1_clusters=l1_clusters,
        refblocks_offset=start * CLUSTER,
        refblocks=blocks,
        reftable_offset=(start + blocks) * CLUSTER,
        reftable_clusters=table,
    )


def refcount_block(index: int, end_cluster: int) -> bytes:
    """Refcount block `index`: 1 for every cluster below `end_cluster`."""
    first = index * REFCOUNTS_PER_BLOCK
    ones = max(0, min(REFCOUNTS_PER_BLOCK, end_cluster - first))
    return b"\x00\x01" * ones + bytes(CLUSTER - 2 * ones)


def reftable(tail: Tail) -> bytes:
    """The refcount table: the offsets of the refcount blocks, padded to its clusters."""
    entries = b"".join(
        struct.pack(">Q", tail.refblocks_offset + i * CLUSTER) for i in range(tail.refblocks)
    )
    return entries.ljust(tail.reftable_clusters * CLUSTER, b"\x00")


def header(
    virtual_size: int,
    l1_size: int,
    tail: Tail,
    backing: str | None = None,
    backing_format: str = "qcow2",
) -> bytes:
    """The first cluster: header, extensions, the backing file name."""
    extensions = b""
    name = b""
    if backing is not None:
        name = backing.encode()
        if not 0 < len(name) <= MAX_BACKING_NAME:
            raise ValueError(f"backing file name must be 1-{MAX_BACKING_NAME} bytes: {backing!r}")
        fmt = backing_format.encode()
        extensions += struct.pack(">II", _BACKING_FORMAT, len(fmt)) + _pad8(fmt)
    extensions += struct.pack(">II", _END, 0)
    name_offset = HEADER_LENGTH + len(extensions) if name else 0
    fixed = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        _MAGIC,
        3,  # version
        name_offset,
        len(name),
        CLUSTER_BITS,
        virtual_size,
        0,  # crypt_method: none
        l1_size,
        tail.l1_offset,
        tail.reftable_offset,
        tail.reftable_clusters,
        0,  # nb_snapshots
        0,  # snapshots_offset
        0,  # incompatible_features: none
        0,  # compatible_features: none
        0,  # autoclear_features: none
        REFCOUNT_ORDER,
        HEADER_LENGTH,
    )
    fixed += bytes(HEADER_LENGTH - len(fixed))  # compression_type 0 (zlib), padding
    return (fixed + extensions + name).ljust(CLUSTER, b"\x00")


def _pad8(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)
