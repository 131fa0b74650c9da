"""The copy engine between real qemu-nbd exports: full copies of three
kinds of source are byte-identical, incrementals reproduce the source, and
the digest does not depend on how the copy was cut."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from testbed.tools import qemu_img_compare, qemu_io, run
from virtbackupd.adapters import qemu_img, qemu_nbd
from virtbackupd.engine.datapath.copy import (
    CopyOptions,
    CopyResult,
    RateLimit,
    ZeroMode,
    copy_export,
)

MiB = 1024 * 1024


def _fill(img: Path, kind: str, size: int) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
    if kind == "random":
        qemu_io(img, f"write -s /dev/urandom 0 {size}")
    elif kind == "half":
        qemu_io(img, f"write -s /dev/urandom 0 {size // 2}")
    elif kind == "fragmented":
        # 64 KiB data every 192 KiB, some zero clusters between.
        cmds = [
            f"write -P 0x{(i % 250) + 1:02x} {i * 192 * 1024} 65536"
            for i in range(size // (192 * 1024))
        ]
        cmds += [
            f"write -z {i * 192 * 1024 + 65536} 65536" for i in range(0, size // (192 * 1024), 7)
        ]
        qemu_io(img, *cmds)


async def _copy(
    tmp: Path,
    src: Path,
    dst: Path,
    *,
    bitmap: str | None = None,
    options: CopyOptions | None = None,
    connections: int = 1,
) -> CopyResult:
    async with (
        qemu_nbd.serve(src, runtime_dir=tmp, bitmaps=[bitmap] if bitmap else []) as s,
        qemu_nbd.serve(dst, runtime_dir=tmp, readonly=False) as t,
    ):
        return await copy_export(
            s.address,
            s.name,
            t.address,
            t.name,
            dirty_bitmap=bitmap,
            options=options,
            connections=connections,
        )


@pytest.mark.parametrize("kind", ["random", "half", "fragmented"])
async def test_full_copy_is_byte_identical(tmp_path: Path, kind: str) -> None:
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    size = 24 * MiB
    _fill(src, kind, size)
    await qemu_img.create(dst, size)
    result = await _copy(tmp_path, src, dst, connections=2)
    qemu_img_compare(src, dst)
    allocated = {"random": size, "half": size // 2}.get(kind)
    if allocated is not None:
        assert result.bytes_read == allocated, "holes are never read"
    assert result.bytes_written == result.bytes_read
    assert result.bytes_zeroed == 0, "a fresh target gets no WRITE_ZEROES"


async def test_incremental_into_overlay_reproduces_source(tmp_path: Path) -> None:
    """Dirty extents (data and zeroes) land in a qcow2 overlay over the full
    copy; zeroes are written so the backing file does not show through."""
    src, full, inc = tmp_path / "src.qcow2", tmp_path / "full.qcow2", tmp_path / "inc.qcow2"
    _fill(src, "half", 32 * MiB)
    await qemu_img.create(full, 32 * MiB)
    await _copy(tmp_path, src, full)
    run("qemu-img", "bitmap", "--add", src, "since-full")
    qemu_io(src, "write -P 0x99 1M 64k", "write -z 2M 1M", "discard 4M 1M", "write -P 0x9a 20M 3M")
    await qemu_img.create(inc, backing="full.qcow2")  # relative backing file
    result = await _copy(
        tmp_path,
        src,
        inc,
        bitmap="since-full",
        options=CopyOptions(zero_mode=ZeroMode.WRITE_ZEROES),
    )
    qemu_img_compare(src, inc)
    dirty = 64 * 1024 + MiB + MiB + 3 * MiB
    assert result.bytes_read + result.bytes_zeroed == dirty
    assert result.bytes_read == 64 * 1024 + 3 * MiB
    info = await qemu_img.info(inc)
    assert info.backing_filename == "full.qcow2"


async def test_digest_does_not_depend_on_how_the_copy_was_cut(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    _fill(src, "fragmented", 16 * MiB)
    digests = set()
    for i, opts in enumerate(
        [
            CopyOptions(),
            CopyOptions(status_window=3 * MiB + 4096, in_flight=3),
            CopyOptions(status_window=MiB, in_flight=1, zero_mode=ZeroMode.WRITE_ZEROES),
        ]
    ):
        dst = tmp_path / f"dst{i}.qcow2"
        await qemu_img.create(dst, 16 * MiB)
        result = await _copy(tmp_path, src, dst, options=opts)
        qemu_img_compare(src, dst)
        digests.add(result.digest)
    assert len(digests) == 1


async def test_a_copy_without_digest_is_identical_and_records_no_pieces(tmp_path: Path) -> None:
    """Restores copy with digest=False (their watch checks the recorded
    pieces instead): the bytes are the same, no piece is recorded."""
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    _fill(src, "fragmented", 8 * MiB)
    await qemu_img.create(dst, 8 * MiB)
    result = await _copy(tmp_path, src, dst, options=CopyOptions(digest=False))
    qemu_img_compare(src, dst)
    assert result.bytes_read > 0
    assert (result.digest, result.pieces) == ("", b"")


async def test_digest_changes_with_content(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    _fill(src, "half", 8 * MiB)
    await qemu_img.create(dst, 8 * MiB)
    first = await _copy(tmp_path, src, dst)
    qemu_io(src, "write -P 0x01 4096 4096")  # 4 KiB: a random byte may already be 0x01
    second = await _copy(tmp_path, src, dst)
    assert first.digest != second.digest


async def test_bandwidth_limit_and_progress(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    _fill(src, "random", 8 * MiB)
    await qemu_img.create(dst, 8 * MiB)
    seen = []
    async with (
        qemu_nbd.serve(src, runtime_dir=tmp_path) as s,
        qemu_nbd.serve(dst, runtime_dir=tmp_path, readonly=False) as t,
    ):
        result = await copy_export(
            s.address,
            s.name,
            t.address,
            t.name,
            options=CopyOptions(bandwidth=8 * MiB, request_size=MiB, progress_interval=0.1),
            progress=lambda p: seen.append(p.bytes_read),
        )
    # 8 MiB at 8 MiB/s: a 2 MiB burst is free, the other 6 MiB take 0.75 s.
    assert result.duration >= 0.7
    assert seen[-1] == 8 * MiB
    assert len(seen) >= 3


async def test_a_shared_limit_leaves_an_idle_disks_share_to_the_others(tmp_path: Path) -> None:
    """A domain's `bandwidth:` is one budget over its disks: a disk with
    nothing to copy does not keep half of it (an even split took 1.75 s
    here; shared, 0.75 s), and together they never exceed it."""
    busy, idle = tmp_path / "busy.qcow2", tmp_path / "idle.qcow2"
    _fill(busy, "random", 16 * MiB)
    await qemu_img.create(idle, 16 * MiB)
    limit = RateLimit(16 * MiB, MiB)
    options = CopyOptions(request_size=MiB, shared_limit=limit)

    async def copy(src: Path) -> float:
        dst = tmp_path / f"{src.stem}-copy.qcow2"
        await qemu_img.create(dst, 16 * MiB)
        folder = tmp_path / src.stem
        folder.mkdir()
        async with (
            qemu_nbd.serve(src, runtime_dir=folder) as s,
            qemu_nbd.serve(dst, runtime_dir=folder, readonly=False) as t,
        ):
            result = await copy_export(s.address, s.name, t.address, t.name, options=options)
        return result.duration

    took_busy, _ = await asyncio.gather(copy(busy), copy(idle))
    # 16 MiB at 16 MiB/s: a 4 MiB burst is free, the other 12 MiB take 0.75 s.
    assert 0.7 <= took_busy < 1.4, took_busy


async def test_cancelled_copy_leaves_nothing_running(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    _fill(src, "random", 32 * MiB)
    await qemu_img.create(dst, 32 * MiB)
    before = set(asyncio.all_tasks())
    task = asyncio.create_task(
        _copy(tmp_path, src, dst, options=CopyOptions(bandwidth=4 * MiB, request_size=MiB))
    )
    await asyncio.sleep(1.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert set(asyncio.all_tasks()) - before - {asyncio.current_task()} == set()
    # Both qemu-nbd processes were stopped: the images are free again.
    run("qemu-img", "info", dst)
    assert not any(p.suffix == ".sock" for p in tmp_path.rglob("*"))
    assert dst.exists()


async def test_image_info_is_typed_and_follows_the_chain(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    await qemu_img.create(base, 4 * MiB)
    await qemu_img.create(top, 8 * MiB, backing="base.qcow2")
    await qemu_img.bitmap(top, "virtbackupd-x", add=True)
    info = await qemu_img.info(top)
    assert (info.format, info.virtual_size, info.backing_filename) == (
        "qcow2",
        8 * MiB,
        "base.qcow2",
    )
    assert info.bitmaps == {"virtbackupd-x": frozenset({"auto"})}
    chain = await qemu_img.info_chain(top)
    assert [Path(i.filename).name for i in chain] == ["top.qcow2", "base.qcow2"]
    assert chain[1].backing_filename is None and chain[1].bitmaps == {}
