"""adapters.qcow2_reader against QEMU itself: chains made by qemu-img and
qemu-io (cluster sizes that differ between layers, zero clusters, discards,
a backing file shorter than its overlay, version 2 and 3 images) read
byte for byte what `qemu-img convert` reads, and their block status says
zero exactly where `qemu-img map` does; images it does not read are
refused by name at open."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from testbed.tools import qemu_io, run
from virtbackupd.adapters.nbd.protocol import CONTEXT_BASE_ALLOCATION, STATE_ZERO
from virtbackupd.adapters.qcow2_reader import Qcow2Chain, Qcow2UnsupportedError, opened

KiB, MiB = 1024, 1024 * 1024


def make_chain(tmp: Path, seed: int) -> Path:
    rng = random.Random(seed)
    sizes = [24 * MiB, 24 * MiB, 32 * MiB]  # the top grew beyond its backing file
    clusters = [rng.choice(["512", "4k", "64k", "1M", "2M"]) for _ in sizes]
    compat = [rng.choice(["0.10", "1.1"]) for _ in sizes]
    prev: Path | None = None
    for i, size in enumerate(sizes):
        image = tmp / f"l{i}.qcow2"
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                f"cluster_size={clusters[i]},compat={compat[i]}"]  # fmt: skip
        if prev is not None:
            args += ["-b", prev.name, "-F", "qcow2"]
        run(*args, image, str(size))
        cmds = []
        for _ in range(12):
            off = rng.randrange(0, size // (4 * KiB)) * 4 * KiB
            n = rng.choice([4 * KiB, 60 * KiB, 512 * KiB, 3 * MiB])
            n = min(n, size - off)
            what = rng.random()
            if what < 0.6:
                cmds.append(f"write -P {rng.randrange(1, 255)} {off} {n}")
            elif what < 0.85:
                cmds.append(f"write -z {off} {n}")
            else:
                cmds.append(f"discard {off} {n}")
        qemu_io(image, *cmds)
        prev = image
    assert prev is not None
    return prev


@pytest.mark.parametrize("seed", range(8))
async def test_the_view_reads_as_qemu_reads_it(tmp_path: Path, seed: int) -> None:
    top = make_chain(tmp_path, seed)
    reference = tmp_path / "ref.raw"
    run("qemu-img", "convert", "-O", "raw", top, reference)
    want = reference.read_bytes()
    with opened(top) as chain:
        assert chain.size == len(want)
        got = bytearray(chain.size)
        pos, step = 0, random.Random(seed).choice([512 * KiB, 2 * MiB, 3 * MiB + 512])
        while pos < chain.size:
            n = min(step, chain.size - pos)
            await chain.read_into(pos, memoryview(got)[pos : pos + n])
            pos += n
        assert bytes(got) == want
        status = (await chain.block_status(0, chain.size))[CONTEXT_BASE_ALLOCATION]
    # Everything block status calls zero reads as zero; qemu-img map's data
    # parts (allocated somewhere in the chain, not zero) are never called zero.
    for e in status:
        if e.flags & STATE_ZERO:
            assert not any(want[e.offset : e.end]), e
    assert sum(e.length for e in status) == len(want)
    for m in json.loads(run("qemu-img", "map", "--output=json", top)):
        if m["data"] and not m["zero"]:
            lo, hi = m["start"], m["start"] + m["length"]
            for e in status:
                if e.flags & STATE_ZERO and e.offset < hi and e.end > lo:
                    raise AssertionError(f"{e} is data for qemu-img map: {m}")


def test_images_it_does_not_read_are_refused_by_name(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    with pytest.raises(Qcow2UnsupportedError, match="disk.raw: not a qcow2 image"):
        Qcow2Chain.open(raw)
    ext = tmp_path / "ext.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", ext, "1M")
    with pytest.raises(Qcow2UnsupportedError, match="incompatible features"):
        Qcow2Chain.open(ext)
    over_raw = tmp_path / "over-raw.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", raw.name, "-F", "raw", over_raw)
    with pytest.raises(Qcow2UnsupportedError, match="backing file format raw"):
        Qcow2Chain.open(over_raw)


async def test_concurrent_reads_through_a_small_table_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restores read from several threads at once; with more L2 tables
    than the cache keeps (512-byte clusters: one table per 32 KiB), every
    read still returns what QEMU reads."""
    monkeypatch.setattr("virtbackupd.adapters.qcow2_reader.L2_CACHE", 2)
    image = tmp_path / "small-clusters.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", image, "8M")
    qemu_io(image, *(f"write -P {i % 250 + 1} {i * 40 * KiB} 8k" for i in range(200)))
    reference = tmp_path / "ref.raw"
    run("qemu-img", "convert", "-O", "raw", image, reference)
    want = reference.read_bytes()
    got = bytearray(len(want))
    step = 64 * KiB
    with opened(image) as chain:
        for _ in range(3):
            await asyncio.gather(
                *(
                    chain.read_into(pos, memoryview(got)[pos : pos + step])
                    for pos in range(0, len(want), step)
                )
            )
            assert bytes(got) == want
