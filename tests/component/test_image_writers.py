"""The image writers against real qemu-img. Every qcow2 image written
passes `qemu-img check` (no error, no leaked cluster) and reads back, with
plain qemu-img, exactly as a raw reference written alongside it; overlays
hide their backing file where they say zeroes, and merge with
`qemu-img commit` as QEMU's own images do. Raw images read back the same
and keep their zeroes as holes."""

from __future__ import annotations

import asyncio
import mmap
import os
import random
from pathlib import Path

import pytest

from testbed.tools import run
from virtbackupd.adapters.image_files import FileSink
from virtbackupd.adapters.qcow2_writer import Qcow2Writer, new_image
from virtbackupd.adapters.raw_writer import RawWriter, new_raw_image
from virtbackupd.core import qcow2_layout as q
from virtbackupd.errors import ImageWriteError

C = q.CLUSTER
MiB = 1 << 20


class Mirror:
    """A writer and a raw reference file that get the same writes."""

    def __init__(self, writer: Qcow2Writer | RawWriter, reference: Path) -> None:
        self.writer = writer
        self.fd = os.open(reference, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, writer.size)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        os.pwrite(self.fd, data, offset)
        await self.writer.write(offset, data)

    async def zero(self, offset: int, length: int) -> None:
        os.pwrite(self.fd, bytes(length), offset)
        await self.writer.write_zeroes(offset, length)

    def close(self) -> None:
        os.close(self.fd)


def check_and_compare(image: Path, reference: Path) -> None:
    run("qemu-img", "check", "-q", image)
    run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", image, reference)


def data(rnd: random.Random, length: int, zero_clusters: bool = True) -> memoryview:
    """Random bytes, some of whose clusters are all zeroes, in page-aligned
    memory as the copy engine's buffers are: the writers hand them to the
    disk with direct I/O (other tests' `bytes` take the page cache)."""
    out = memoryview(mmap.mmap(-1, length))
    out[:] = rnd.randbytes(length)
    if zero_clusters:
        for c in range(0, length, C):
            if rnd.random() < 0.25:
                out[c : c + C] = bytes(len(out[c : c + C]))
    return out


async def fill(m: Mirror, rnd: random.Random, writes: int) -> None:
    size = m.writer.size
    for _ in range(writes):
        offset = rnd.randrange(0, size // C) * C
        length = min(rnd.choice([1, 2, 5, 64]) * C, size - offset)
        await m.write(offset, data(rnd, length))


@pytest.mark.parametrize("cached_tables", [1, 64])
async def test_a_full_image_reads_back_as_written(tmp_path: Path, cached_tables: int) -> None:
    """Scattered writes over a 3 GiB disk whose size is not a whole number
    of clusters (the last one partial), rewrites in place, zero clusters
    inside data, zeroing of written clusters; with one cached L2 table
    (every table written out and read back) and with the default."""
    rnd = random.Random(cached_tables)
    size = 3 * 1024 * MiB + 7 * 512
    image, ref = tmp_path / "full.qcow2", tmp_path / "full.raw"
    w = Qcow2Writer(image, size, cached_tables=cached_tables)
    m = Mirror(w, ref)
    await fill(m, rnd, 300)
    tail = size - size % C
    await m.write(tail, rnd.randbytes(size - tail))
    await m.write(0, rnd.randbytes(3 * C))  # maybe over earlier writes
    await m.zero(C, C)  # a written cluster zeroed keeps no stale data
    await m.zero(tail, size - tail)
    await w.flush()
    await w.close()
    m.close()
    check_and_compare(image, ref)
    info = run("qemu-img", "info", "--output=json", image)
    assert f'"virtual-size": {size}' in info


async def test_an_overlay_hides_its_backing_file_and_merges_with_qemu_img_commit(
    tmp_path: Path,
) -> None:
    rnd = random.Random(7)
    size = 1024 * MiB
    base, base_ref = tmp_path / "base.qcow2", tmp_path / "base.raw"
    async with new_image(base, size) as w:
        m = Mirror(w, base_ref)
        await m.write(0, data(rnd, 64 * MiB, zero_clusters=False))
        await fill(m, rnd, 100)
        await w.flush()
        m.close()
    check_and_compare(base, base_ref)

    # The overlay's reference starts as a copy of the base's.
    top, top_ref = tmp_path / "top.qcow2", tmp_path / "top.raw"
    run("cp", "--sparse=always", base_ref, top_ref)
    async with new_image(top, size, backing="base.qcow2") as w:
        m = Mirror(w, top_ref)
        await fill(m, rnd, 60)
        # Zeroes over backing data, as write_zeroes and as zero data.
        await m.zero(2 * MiB, 3 * MiB)
        await m.write(8 * MiB, bytes(2 * C) + rnd.randbytes(C))
        await m.zero(600 * MiB, 1 * MiB + 5 * C)  # in a table of its own
        await w.flush()
        m.close()
    check_and_compare(top, top_ref)
    assert '"backing-filename": "base.qcow2"' in run("qemu-img", "info", "--output=json", top)

    run("qemu-img", "commit", "-q", top)
    check_and_compare(base, top_ref)


async def test_a_sparse_disk_of_two_tib_costs_only_what_is_written(tmp_path: Path) -> None:
    size = 2 << 40
    image, ref = tmp_path / "big.qcow2", tmp_path / "big.raw"
    async with new_image(image, size) as w:
        m = Mirror(w, ref)
        for offset in (0, 700 << 30, size - 3 * C):
            await m.write(offset, random.Random(offset).randbytes(3 * C))
        await w.flush()
        m.close()
    check_and_compare(image, ref)
    # Header, 3 x (L2 table + 3 data clusters), L1 (4096 entries: 32 KiB),
    # one refcount block, the refcount table.
    assert image.stat().st_blocks * 512 <= 16 * C


async def test_writes_it_cannot_take_are_refused_by_name(tmp_path: Path) -> None:
    image = tmp_path / "odd.qcow2"
    async with new_image(image, 10 * MiB) as w:
        with pytest.raises(ImageWriteError, match=r"odd\.qcow2: .*not cluster-aligned"):
            await w.write(512, bytes(C))
        with pytest.raises(ImageWriteError, match="outside the disk"):
            await w.write(10 * MiB, bytes(C))
        await w.flush()
        with pytest.raises(ImageWriteError, match="after the image was finished"):
            await w.write(0, bytes(C))


async def test_a_full_file_system_fails_the_write_with_its_reason(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt)
    try:
        async with new_image(mnt / "img.qcow2", 64 * MiB) as w:
            with pytest.raises(ImageWriteError, match=r"img\.qcow2: cannot write: No space"):
                await w.write(0, random.Random(1).randbytes(4 * MiB))
    finally:
        run("umount", mnt)


async def test_an_unfinished_image_is_no_image(tmp_path: Path) -> None:
    """Until flush the header cluster is zero: nothing opens it as qcow2."""
    image = tmp_path / "cut.qcow2"
    async with new_image(image, 16 * MiB) as w:
        await w.write(0, random.Random(2).randbytes(MiB))
    out = run("qemu-img", "info", "--output=json", image, check=False)
    assert '"format": "qcow2"' not in out


async def test_a_raw_image_reads_back_as_written_and_keeps_zeroes_as_holes(
    tmp_path: Path,
) -> None:
    rnd = random.Random(11)
    size = 256 * MiB + 512
    image, ref = tmp_path / "disk.raw", tmp_path / "ref.raw"
    async with new_raw_image(image, size) as w:
        m = Mirror(w, ref)
        await fill(m, rnd, 200)
        await m.write(size - 512, rnd.randbytes(512))  # the disk's last sector
        await m.write(5 * C + 4096, rnd.randbytes(8192))  # inside a block
        await m.write(200 * MiB, bytes(8 * MiB))  # zero data: holes, punched if need be
        await m.zero(C, 3 * C)  # a hole punched into written data
        await w.flush()
        m.close()
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", image, ref)
    # Written blocks are as many as the reference's non-zero 64 KiB blocks.
    data = ref.read_bytes()
    zero = bytes(C)
    nonzero = sum(1 for o in range(0, size, C) if data[o : o + C] != zero[: size - o])
    assert image.stat().st_blocks * 512 <= nonzero * C + 16 * 4096


async def test_a_file_closed_while_its_write_back_starts_is_closed_after_it(
    tmp_path: Path,
) -> None:
    """Every 64 MiB written through the page cache, a write-back starts in a
    thread while writes go on; closing the file then (a failed copy) must
    not pull the descriptor from under that thread."""
    sink = FileSink(tmp_path / "f", 80 * MiB, direct=False)
    piece = memoryview(random.Random(3).randbytes(MiB))
    for i in range(65):
        await sink.put([(i * MiB, piece)])
    fd = sink.fd
    sink.close()
    for _ in range(500):  # the thread ends; its callback closes the file
        await asyncio.sleep(0.01)
        try:
            os.fstat(fd)
        except OSError:
            break
    else:
        pytest.fail("the file was never closed")
    data = (tmp_path / "f").read_bytes()
    assert data[64 * MiB : 65 * MiB] == piece
