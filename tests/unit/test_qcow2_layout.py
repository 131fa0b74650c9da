"""The qcow2 layout's arithmetic: tails that count every cluster, headers
that say what the specification asks (docs/interop/qcow2.txt)."""

from __future__ import annotations

import struct

import pytest

from virtbackupd.core import qcow2_layout as q


@pytest.mark.parametrize(
    ("size", "entries"),
    [(0, 0), (1, 1), (512 << 20, 1), ((512 << 20) + 1, 2), (1 << 40, 2048)],
)
def test_l1_entries_map_the_whole_disk(size: int, entries: int) -> None:
    assert q.l1_entries(size) == entries


@pytest.mark.parametrize(
    "used", [1, 2, 100, q.REFCOUNTS_PER_BLOCK - 4, q.REFCOUNTS_PER_BLOCK - 2, 10**6, 4 * 10**7]
)
@pytest.mark.parametrize("l1_size", [1, 2048, 300_000])
def test_the_tail_counts_every_cluster_and_no_more_blocks_than_needed(
    used: int, l1_size: int
) -> None:
    t = q.tail_layout(used, l1_size)
    assert t.l1_offset == used * q.CLUSTER
    assert t.l1_clusters * q.CLUSTER >= l1_size * 8
    assert t.refblocks_offset == t.l1_offset + t.l1_clusters * q.CLUSTER
    assert t.reftable_offset == t.refblocks_offset + t.refblocks * q.CLUSTER
    # The blocks count every cluster up to the end, themselves included ...
    assert t.refblocks * q.REFCOUNTS_PER_BLOCK >= t.end_cluster
    # ... and one block fewer would not.
    assert (t.refblocks - 1) * q.REFCOUNTS_PER_BLOCK < t.end_cluster
    assert t.reftable_clusters * q.CLUSTER >= t.refblocks * 8


def test_refcount_blocks_say_one_up_to_the_end_and_zero_after() -> None:
    end = q.REFCOUNTS_PER_BLOCK + 5
    first, second = q.refcount_block(0, end), q.refcount_block(1, end)
    assert len(first) == len(second) == q.CLUSTER
    assert set(struct.unpack(f">{q.REFCOUNTS_PER_BLOCK}H", first)) == {1}
    counts = struct.unpack(f">{q.REFCOUNTS_PER_BLOCK}H", second)
    assert counts[:5] == (1,) * 5 and set(counts[5:]) == {0}


def test_the_refcount_table_points_at_the_blocks() -> None:
    t = q.tail_layout(3 * q.REFCOUNTS_PER_BLOCK, 1)
    table = q.reftable(t)
    assert len(table) == t.reftable_clusters * q.CLUSTER
    offsets = struct.unpack(f">{t.refblocks}Q", table[: 8 * t.refblocks])
    assert offsets == tuple(t.refblocks_offset + i * q.CLUSTER for i in range(t.refblocks))
    assert set(table[8 * t.refblocks :]) == {0}


@pytest.mark.parametrize("backing", [None, "../20261125T010203Z-abcd/vda.qcow2"])
def test_the_header_fields(backing: str | None) -> None:
    t = q.tail_layout(10, 8)
    h = q.header(4 << 30, 8, t, backing)
    assert len(h) == q.CLUSTER
    (magic, version, name_off, name_len, bits, size, crypt, l1_size, l1_off, rt_off, rt_clu) = (
        struct.unpack(">4sIQIIQIIQQI", h[:60])
    )
    assert (magic, version, bits, size, crypt) == (b"QFI\xfb", 3, 16, 4 << 30, 0)
    assert (l1_size, l1_off, rt_off, rt_clu) == (8, t.l1_offset, t.reftable_offset, 1)
    incompatible, compatible, autoclear, order, length = struct.unpack(">QQQII", h[72:104])
    assert (incompatible, compatible, autoclear, order, length) == (0, 0, 0, 4, 112)
    if backing is None:
        assert (name_off, name_len) == (0, 0)
        assert h[112:120] == bytes(8)  # the end of the extensions at once
    else:
        assert h[name_off : name_off + name_len].decode() == backing
        ext_type, ext_len = struct.unpack(">II", h[112:120])
        assert (ext_type, h[120 : 120 + ext_len]) == (0xE2792ACA, b"qcow2")


def test_a_backing_name_qcow2_cannot_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="1-1023 bytes"):
        q.header(1 << 30, 2, q.tail_layout(1, 2), "x" * 1024)


@pytest.mark.parametrize(
    ("entry", "zeroed"),
    [
        (0, q.ZERO),  # never written: hides the backing file
        (q.data_entry(5 * q.CLUSTER), 5 * q.CLUSTER | q.COPIED | q.ZERO),  # keeps its cluster
        (q.ZERO, q.ZERO),
    ],
)
def test_zeroing_an_entry_never_loses_its_cluster(entry: int, zeroed: int) -> None:
    assert q.zeroed(entry) == zeroed
