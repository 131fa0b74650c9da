"""The NBD data path against QEMU's own export from a libvirt pull-mode
backup: extent maps agree with nbdinfo, and full + incremental copies of a
real domain's disk reproduce the reference image."""

from __future__ import annotations

from pathlib import Path

import libvirt

from testbed.domains import DomainFactory, GuestDomain, MiB, wait_until
from testbed.guest import GuestWriter
from testbed.tools import nbd_unix_uri, nbdinfo_map, qemu_img_compare
from virtbackupd.adapters import qemu_img, qemu_nbd
from virtbackupd.adapters.nbd.client import UnixAddress, connect
from virtbackupd.core.backup_documents import BackupRequest, build_documents, checkpoint_name
from virtbackupd.core.domain_xml import parse_domain
from virtbackupd.engine.datapath.copy import CopyOptions, CopyResult, ZeroMode, copy_export


def _begin(td: GuestDomain, stamp: str, parent: str | None) -> tuple[str, Path]:
    cp = checkpoint_name(stamp)
    sock = td.workdir / f"{stamp}.sock"
    docs = build_documents(
        parse_domain(td.dom.XMLDesc(0)).disks, BackupRequest(cp, parent, str(sock), str(td.workdir))
    )
    td.dom.backupBegin(docs.backup.to_xml(), docs.checkpoint.to_xml(), 0)
    return cp, sock


def _end(td: GuestDomain) -> None:
    td.dom.abortJob()
    wait_until(lambda: td.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, what="job end")


async def _copy_into(sock: Path, target: Path, tmp: Path, bitmap: str | None) -> CopyResult:
    zero = ZeroMode.WRITE_ZEROES if bitmap else ZeroMode.SKIP
    async with qemu_nbd.serve(target, runtime_dir=tmp, readonly=False) as t:
        return await copy_export(
            UnixAddress(str(sock)),
            "vda",
            t.address,
            t.name,
            dirty_bitmap=bitmap,
            connections=2,
            options=CopyOptions(zero_mode=zero),
        )


async def test_full_and_incremental_copy_from_libvirt_export(
    domains: DomainFactory, tmp_path: Path
) -> None:
    td = domains.create(qcow2_sizes=[64 * MiB])
    guest = GuestWriter(td)
    vda = td.disk("vda")
    assert vda.reference is not None
    guest.write("vda", 0, 3 * MiB, 0x31)
    guest.write("vda", 40 * MiB, MiB, 0x32)

    cp1, sock = _begin(td, "n1", None)
    full = tmp_path / "full.qcow2"
    await qemu_img.create(full, vda.size)
    result = await _copy_into(sock, full, tmp_path, None)
    _end(td)
    qemu_img_compare(vda.reference, full, "raw", "qcow2")
    assert result.bytes_read == 4 * MiB, "only allocated data was read"

    guest.write("vda", MiB, 64 * 1024, 0x41)
    guest.zero("vda", 40 * MiB, 512 * 1024)
    guest.discard("vda", 2 * MiB, 256 * 1024)
    guest.write("vda", 60 * MiB, 2 * MiB, 0x42)

    _, sock2 = _begin(td, "n2", cp1)
    uri = nbd_unix_uri(sock2, "vda")
    # Our client's maps agree with libnbd's on QEMU's export.
    client = await connect(
        UnixAddress(str(sock2)),
        "vda",
        meta_contexts=["base:allocation", "qemu:dirty-bitmap:backup-vda"],
    )
    try:
        for ctx, theirs in (
            ("base:allocation", nbdinfo_map(uri)),
            ("qemu:dirty-bitmap:backup-vda", nbdinfo_map(uri, "qemu:dirty-bitmap:backup-vda")),
        ):
            ours, pos = [], 0
            while pos < client.size:
                ext = (await client.block_status(pos, client.size - pos))[ctx]
                ours += [(e.offset, e.end, e.flags) for e in ext]
                pos = ext[-1].end
            assert _merge(ours) == _merge([(e.offset, e.end, e.type) for e in theirs]), ctx
    finally:
        await client.close()

    inc = tmp_path / "inc.qcow2"
    await qemu_img.create(inc, backing="full.qcow2")
    result = await _copy_into(sock2, inc, tmp_path, "backup-vda")
    _end(td)
    qemu_img_compare(vda.reference, inc, "raw", "qcow2")
    dirty = 64 * 1024 + 512 * 1024 + 256 * 1024 + 2 * MiB
    assert result.bytes_read + result.bytes_zeroed == dirty, "only dirty extents were copied"


def _merge(spans: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for lo, hi, f in spans:
        if out and out[-1][1] == lo and out[-1][2] == f:
            out[-1] = (out[-1][0], hi, f)
        else:
            out.append((lo, hi, f))
    return out
