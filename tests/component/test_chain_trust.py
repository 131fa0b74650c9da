"""Trust follows the chain, on repositories built without libvirt
(testbed.repo_builder): a damaged layer fails the verify of every backup
that restores through it and makes their restores refuse, naming the
damaged backup and disk; damage the restore never reads does not count;
every point restores byte-identical; format-1 backups still read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.repo_builder import BuiltDomain, MiB
from testbed.tools import flip_byte, qemu_img_compare, qemu_img_info, qemu_io, run
from virtbackupd.adapters.qcow2_reader import Qcow2Chain, Qcow2UnsupportedError
from virtbackupd.adapters.repository import (
    MANIFEST,
    RepositoryFormatError,
    read_manifest,
)
from virtbackupd.adapters.store import Store
from virtbackupd.core.policy import Retention
from virtbackupd.engine.datapath.copy import CopyOptions
from virtbackupd.engine.restore import RestoreContext, restore_to_dir
from virtbackupd.engine.upkeep.prune import prune_domain
from virtbackupd.engine.upkeep.verify import verify_backup
from virtbackupd.errors import RestoreError


async def two_points(tmp: Path) -> BuiltDomain:
    """A full and an incremental. vda's full holds a 2 MiB piece at 0
    (which the incremental's 64 KiB write at 512 KiB partly hides), one at
    4 MiB (visible through the incremental) and one at 8 MiB (which the
    incremental's write hides whole)."""
    b = BuiltDomain(tmp, {"vda": 16 * MiB, "vdb": 8 * MiB})
    async with Store.open(b.state_db) as store:
        b.write("vda", 0, 2 * MiB, 0x11)
        b.write("vda", 4 * MiB, MiB, 0x12)
        b.write("vda", 8 * MiB, MiB, 0x14)
        b.write("vdb", 0, MiB, 0x13)
        await b.backup(store)
        b.write("vda", 512 * 1024, 64 * 1024, 0x21)
        b.write("vda", 8 * MiB, MiB, 0x22)
        await b.backup(store)
    return b


async def restore(
    b: BuiltDomain, backup_id: str, out: Path, allow_damaged: bool = False
) -> list[Path]:
    ctx = RestoreContext(b.folder(backup_id), ("vda", "vdb"), b.runtime, None, allow_damaged)
    done = await restore_to_dir(ctx, out, "raw")
    return [d.path for d in done]


async def test_a_flipped_byte_in_the_full_fails_its_incrementals(tmp_path: Path) -> None:
    b = await two_points(tmp_path)
    full, inc = b.ids
    flip_byte(b.image(full, "vda"), 4 * MiB + 100)

    verdict = await verify_backup(b.folder(inc), b.runtime)
    assert not verdict.ok and verdict.layer_ok
    assert verdict.damaged_ancestors == (full,)
    assert any(full in p and "digest" in p for p in verdict.ancestor_problems), verdict
    own = await verify_backup(b.folder(full), b.runtime)
    assert not own.ok and [d.disk for d in own.disks if not d.ok] == ["vda"]

    out = tmp_path / "out"
    with pytest.raises(RestoreError) as refused:
        await restore(b, inc, out)
    assert f"backup {full} disk vda" in str(refused.value)
    assert not out.exists() or not list(out.iterdir())  # no image, no partial

    # All or nothing: damage in the second disk leaves the first unwritten too.
    flip_byte(b.image(full, "vda"), 4 * MiB + 100)  # vda whole again
    flip_byte(b.image(full, "vdb"), 100)
    with pytest.raises(RestoreError, match=f"backup {full} disk vdb"):
        await restore(b, inc, out)
    assert not out.exists() or not list(out.iterdir())
    flip_byte(b.image(full, "vdb"), 100)  # back as it was
    flip_byte(b.image(full, "vda"), 4 * MiB + 100)  # damaged again

    # --allow-damaged writes what can be read: the reference but for that byte.
    await restore(b, inc, out, allow_damaged=True)
    got, want = (out / "vda.raw").read_bytes(), b.refs[inc]["vda"].read_bytes()
    assert [i for i in range(len(want)) if got[i] != want[i]] == [4 * MiB + 100]
    qemu_img_compare(b.refs[inc]["vdb"], out / "vdb.raw", "raw", "raw")


async def test_damage_only_counts_where_the_restore_reads(tmp_path: Path) -> None:
    b = await two_points(tmp_path)
    full, inc = b.ids
    # In a piece the incremental's write hides whole: never read through it.
    flip_byte(b.image(full, "vda"), 8 * MiB + 100)
    await restore(b, inc, tmp_path / "inc")
    qemu_img_compare(b.refs[inc]["vda"], tmp_path / "inc" / "vda.raw", "raw", "raw")
    with pytest.raises(RestoreError, match=f"backup {full} disk vda"):
        await restore(b, full, tmp_path / "full")
    # In a piece the incremental hides in part: the rest is read, so the
    # piece is checked whole, from the full's own view.
    flip_byte(b.image(full, "vda"), 8 * MiB + 100)  # back as it was
    flip_byte(b.image(full, "vda"), MiB)
    with pytest.raises(RestoreError, match=f"backup {full} disk vda"):
        await restore(b, inc, tmp_path / "inc2")


async def test_every_point_restores_byte_identical(tmp_path: Path) -> None:
    b = BuiltDomain(tmp_path, {"vda": 12 * MiB})

    def zero_then_write() -> None:
        b.zero("vda", 0, 64 * 1024)
        b.write("vda", 6 * MiB, 4096, 0x33)

    async with Store.open(b.state_db) as store:
        steps: list[Callable[[], None]] = [
            lambda: b.write("vda", 0, 3 * MiB, 0x31),
            lambda: b.zero("vda", MiB, 512 * 1024),
            lambda: b.write("vda", 10 * MiB, 2 * MiB, 0x32),
            zero_then_write,
        ]
        for step in steps:
            step()
            await b.backup(store)
    for i, backup_id in enumerate(b.ids):
        fmt = "qcow2" if i % 2 else "raw"
        out = tmp_path / f"r{i}"
        done = await restore_to_dir(
            RestoreContext(b.folder(backup_id), ("vda",), b.runtime), out, fmt
        )
        assert not done[0].damage
        qemu_img_compare(b.refs[backup_id]["vda"], out / f"vda.{fmt}", "raw", fmt)
        assert (await verify_backup(b.folder(backup_id), b.runtime)).ok


async def test_a_chain_of_mixed_grids_restores_verifies_and_merges(tmp_path: Path) -> None:
    """Backups made before the copy's request size (the digest's grid) went
    from 4 MiB to 2 MiB sit below newer ones: each layer is checked on its
    own recorded grid, in a restore, a verify and a merge."""
    b = BuiltDomain(tmp_path, {"vda": 24 * MiB})
    async with Store.open(b.state_db) as store:
        b.write("vda", 0, 20 * MiB, 0x41)
        await b.backup(store, grid=4 * MiB)
        b.write("vda", 3 * MiB, 5 * MiB, 0x42)
        b.zero("vda", 12 * MiB, 3 * MiB)
        await b.backup(store, grid=2 * MiB)
        b.write("vda", 7 * MiB, 2 * MiB, 0x43)
        await b.backup(store)
        grids = [read_manifest(b.folder(i)).disks[0].grid for i in b.ids]
        assert grids == [4 * MiB, 2 * MiB, CopyOptions().request_size]
        for i, backup_id in enumerate(b.ids):
            out = tmp_path / f"r{i}"
            done = await restore_to_dir(
                RestoreContext(b.folder(backup_id), ("vda",), b.runtime), out, "raw"
            )
            assert not done[0].damage
            qemu_img_compare(b.refs[backup_id]["vda"], out / "vda.raw", "raw", "raw")
            assert (await verify_backup(b.folder(backup_id), b.runtime)).ok
        # A chain limit of 1: the 2 MiB layer is merged into the 4 MiB full.
        await prune_domain(store, b.repo.domain_dir(b.uuid), Retention(), 1, b.runtime)
        parents = {r.id: r.parent for r in await store.backups(b.uuid)}
    parent = parents[b.ids[2]]
    assert parent is not None and parents[parent] is None, parents
    for backup_id in b.ids:
        out = tmp_path / f"merged-{backup_id}"
        await restore_to_dir(RestoreContext(b.folder(backup_id), ("vda",), b.runtime), out, "raw")
        qemu_img_compare(b.refs[backup_id]["vda"], out / "vda.raw", "raw", "raw")
        assert (await verify_backup(b.folder(backup_id), b.runtime)).ok


async def test_format_1_backups_still_verify_and_restore(tmp_path: Path) -> None:
    """Written before piece files existed: read, and checked by a digest
    pass of their own."""
    b = await two_points(tmp_path)
    for backup_id in b.ids:
        path = b.folder(backup_id) / MANIFEST
        data = json.loads(path.read_text())
        data["format"] = "virtbackupd-backup/1"
        del data["format_version"]
        for d in data["disks"]:
            (b.folder(backup_id) / d.pop("pieces")).unlink()
        path.write_text(json.dumps(data))
        assert read_manifest(b.folder(backup_id)).version == 1
    full, inc = b.ids
    assert (await verify_backup(b.folder(inc), b.runtime)).ok
    await restore(b, inc, tmp_path / "ok")
    qemu_img_compare(b.refs[inc]["vda"], tmp_path / "ok" / "vda.raw", "raw", "raw")
    flip_byte(b.image(full, "vda"), 4 * MiB + 100)
    with pytest.raises(RestoreError, match=f"backup {full} disk vda"):
        await restore(b, inc, tmp_path / "bad")


async def test_a_newer_or_damaged_manifest_is_refused_by_name(tmp_path: Path) -> None:
    b = await two_points(tmp_path)
    path = b.folder(b.ids[1]) / MANIFEST
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format_version": 3}))
    with pytest.raises(RepositoryFormatError, match="format 3.*upgrade virtbackupd"):
        read_manifest(path.parent)
    path.write_text(json.dumps({**data, "level": "sideways"}))
    with pytest.raises(RepositoryFormatError, match=r"field level: 'sideways' is not one of"):
        read_manifest(path.parent)
    del data["disks"][0]["digest"]
    path.write_text(json.dumps(data))
    with pytest.raises(RepositoryFormatError, match=r"field disks\[0\]\.digest: missing"):
        read_manifest(path.parent)
    # A damaged piece file is named by verify (the images are fine).
    pieces = b.folder(b.ids[0]) / "vdb.pieces"
    pieces.write_bytes(pieces.read_bytes()[:-1])
    verdict = await verify_backup(b.folder(b.ids[0]), b.runtime)
    assert not verdict.ok
    assert any("vdb.pieces" in p for d in verdict.disks for p in d.problems)
    run("true")


async def test_a_large_zero_range_a_newer_backup_writes_into(tmp_path: Path) -> None:
    """The full's ZERO range is recorded whole (here 95 MiB, more than one
    NBD read); an incremental writes into its middle. The restore checks
    the rest of it from the full's own view, and finds bytes that appeared
    there."""
    b = BuiltDomain(tmp_path, {"vda": 96 * MiB})
    async with Store.open(b.state_db) as store:
        b.write("vda", 0, MiB, 0x71)
        await b.backup(store)
        b.write("vda", 50 * MiB, MiB, 0x72)
        await b.backup(store)
    full, inc = b.ids
    out = tmp_path / "ok"
    await restore_to_dir(RestoreContext(b.folder(inc), ("vda",), b.runtime), out, "raw")
    qemu_img_compare(b.refs[inc]["vda"], out / "vda.raw", "raw", "raw")
    qemu_io(b.image(full, "vda"), f"write -P 0x66 {70 * MiB} 4096")
    with pytest.raises(RestoreError, match=f"backup {full} disk vda: .*should read as zeroes"):
        await restore_to_dir(
            RestoreContext(b.folder(inc), ("vda",), b.runtime), tmp_path / "bad", "raw"
        )


async def test_an_image_the_reader_refuses_restores_through_qemu_nbd(tmp_path: Path) -> None:
    """Restores read chains in our own process; an image using a part of
    qcow2 that reader does not read (here extended L2 entries, as a copy
    of the repository made by hand might) is read through qemu-nbd
    instead, still checked against the recorded pieces."""
    b = BuiltDomain(tmp_path, {"vda": 12 * MiB})
    async with Store.open(b.state_db) as store:
        b.write("vda", 0, 3 * MiB, 0x31)
        await b.backup(store)
        b.write("vda", 5 * MiB, MiB, 0x32)
        await b.backup(store)
    inc = b.ids[-1]
    image = b.image(inc, "vda")
    backing = qemu_img_info(image)["backing-filename"]
    rewritten = image.with_name("x.qcow2")
    run("qemu-img", "convert", "-O", "qcow2", "-o", "extended_l2=on", "-B", backing,
        "-F", "qcow2", image, rewritten)  # fmt: skip
    rewritten.replace(image)
    with pytest.raises(Qcow2UnsupportedError):
        Qcow2Chain.open(image)
    done = await restore_to_dir(
        RestoreContext(b.folder(inc), ("vda",), b.runtime), tmp_path / "out", "raw"
    )
    assert not done[0].damage
    qemu_img_compare(b.refs[inc]["vda"], tmp_path / "out" / "vda.raw", "raw", "raw")
    # The pieces are still checked on that path: a flipped byte is refused.
    flip_byte(image, 5 * MiB + 10)
    with pytest.raises(RestoreError, match=f"backup {inc} disk vda"):
        await restore_to_dir(
            RestoreContext(b.folder(inc), ("vda",), b.runtime), tmp_path / "bad", "raw"
        )
