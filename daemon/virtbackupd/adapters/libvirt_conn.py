"""libvirt, for the engine: blocking calls run in a small executor, never
on the event loop. The only module (with the daemon's event adapter) that
imports libvirt.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt

from virtbackupd.core.checkpoint_xml import parent_of
from virtbackupd.core.live_move import backed_targets
from virtbackupd.errors import (
    CheckpointInconsistentError,
    DomainNotFoundError,
    LibvirtError,
)

T = TypeVar("T")


def _silence(_ctx: object, _err: object) -> None:
    """Without a handler libvirt prints every error to stderr; we raise them."""


libvirt.registerErrorHandler(_silence, None)


@dataclass(frozen=True)
class DomainRef:
    name: str
    uuid: str


@dataclass(frozen=True)
class StoredCheckpoint:
    name: str
    parent: str | None
    xml: str


class Libvirt:
    """One connection. Use ``async with await Libvirt.open(uri) as lv``."""

    def __init__(self, conn: Any, executor: ThreadPoolExecutor, uri: str) -> None:
        self._conn = conn
        self._executor = executor
        self.uri = uri

    @classmethod
    async def open(cls, uri: str) -> Libvirt:
        executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="libvirt")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, libvirt.open, uri)
        except libvirt.libvirtError as exc:
            executor.shutdown(wait=False)
            raise LibvirtError(f"cannot connect to {uri}: {exc.get_error_message()}") from exc
        return cls(conn, executor, uri)

    async def __aenter__(self) -> Libvirt:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._call(self._conn.close)
        self._executor.shutdown(wait=False)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except libvirt.libvirtError as exc:
            raise _translate(exc) from exc

    # --- domains -------------------------------------------------------------------
    async def _lookup(self, ref: DomainRef | str) -> Any:
        key = ref.uuid if isinstance(ref, DomainRef) else ref

        def find() -> Any:
            try:
                return self._conn.lookupByUUIDString(key)
            except libvirt.libvirtError:
                pass
            try:
                return self._conn.lookupByName(key)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    raise DomainNotFoundError(f"no domain named or with UUID '{key}'") from exc
                raise

        return await self._call(find)

    async def domain(self, name_or_uuid: str) -> DomainRef:
        dom = await self._lookup(name_or_uuid)
        return DomainRef(dom.name(), dom.UUIDString())

    async def domains(self) -> list[DomainRef]:
        doms = await self._call(self._conn.listAllDomains, 0)
        return [DomainRef(d.name(), d.UUIDString()) for d in doms]

    async def is_running(self, ref: DomainRef) -> bool:
        dom = await self._lookup(ref)
        return bool(await self._call(dom.isActive))

    async def xml(self, ref: DomainRef, inactive: bool = False) -> str:
        dom = await self._lookup(ref)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(await self._call(dom.XMLDesc, flags))

    async def disk_capacity(self, ref: DomainRef, target: str) -> int:
        """The virtual size of a disk (virDomainGetBlockInfo: what QEMU
        shows the guest when running, the image's size when shut off)."""
        dom = await self._lookup(ref)
        capacity, _allocation, _physical = await self._call(dom.blockInfo, target, 0)
        return int(capacity)

    async def exists(self, name_or_uuid: str) -> bool:
        try:
            await self._lookup(name_or_uuid)
        except DomainNotFoundError:
            return False
        return True

    async def domain_capabilities(
        self, virt_type: str | None, arch: str | None, machine: str | None
    ) -> str:
        """virConnectGetDomainCapabilities: the host's emulator (never a
        stored definition's) and firmware for a guest of this kind; None
        asks for the host's default."""
        return str(
            await self._call(self._conn.getDomainCapabilities, None, arch, machine, virt_type, 0)
        )

    async def define(self, xml: str) -> DomainRef:
        dom = await self._call(self._conn.defineXML, xml)
        return DomainRef(dom.name(), dom.UUIDString())

    async def undefine(self, ref: DomainRef) -> None:
        """Remove a shut-off domain's definition with its checkpoint and
        snapshot metadata (images are left alone)."""
        dom = await self._lookup(ref)
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        )
        await self._call(dom.undefineFlags, flags)

    async def start(self, ref: DomainRef) -> None:
        dom = await self._lookup(ref)
        await self._call(dom.create)

    async def destroy(self, ref: DomainRef) -> None:
        dom = await self._lookup(ref)
        if await self._call(dom.isActive):
            await self._call(dom.destroy)

    # --- block jobs (a live restore's move) --------------------------------------------
    async def block_pull(self, ref: DomainRef, disk: str, bandwidth: int = 0) -> None:
        """Start QEMU's block stream on `disk`: every byte of its backing
        chain is copied into the top image, which then stands alone.
        `bandwidth` in bytes/s (0: unlimited)."""
        dom = await self._lookup(ref)
        await self._call(
            dom.blockPull, disk, bandwidth, libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES
        )

    async def block_job(self, ref: DomainRef, disk: str) -> tuple[int, int] | None:
        """(done, total) of the block job running on `disk`, None if none."""
        dom = await self._lookup(ref)
        info = await self._call(dom.blockJobInfo, disk, 0)
        if not info:
            return None
        return int(info.get("cur", 0)), int(info.get("end", 0))

    async def disks_with_backing(self, ref: DomainRef) -> set[str]:
        """The disks for which the running QEMU still reads a backing file
        (libvirt's live XML, which it updates when a pull ends). The image
        file's header says less: QEMU rewrites it before its cached data
        reach the file."""
        return backed_targets(await self.xml(ref))

    async def run_id(self, ref: DomainRef) -> int:
        """libvirt's id of the domain's running QEMU: a new one at each start."""
        dom = await self._lookup(ref)
        return int(await self._call(dom.ID))

    async def flush_by_pause(self, ref: DomainRef) -> None:
        """Make QEMU write everything it holds for the domain's images to
        the files: pausing a domain flushes every image (QEMU's vm_stop), a
        block job's end does not. Paused for milliseconds; a paused domain
        was flushed when it paused and is left as it is."""
        dom = await self._lookup(ref)
        state, _ = await self._call(dom.state)
        if state != libvirt.VIR_DOMAIN_RUNNING:
            return
        await self._call(dom.suspend)
        await asyncio.shield(self._call(dom.resume))

    async def qemu_ended(self, ref: DomainRef) -> str | None:
        """Why a shut-off domain's QEMU ended, when not by a shutdown or
        destroy: "crashed" (QEMU died: a segfault, a kill) or "failed" (it
        did not start); None otherwise or while it runs."""
        dom = await self._lookup(ref)
        state, reason = await self._call(dom.state)
        if state != libvirt.VIR_DOMAIN_SHUTOFF:
            return None
        return {
            libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",
            libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
        }.get(reason)

    # --- checkpoints -------------------------------------------------------------------
    async def checkpoints(self, ref: DomainRef) -> list[StoredCheckpoint]:
        dom = await self._lookup(ref)

        def collect() -> list[StoredCheckpoint]:
            out = []
            for cp in dom.listAllCheckpoints(0):
                xml = cp.getXMLDesc(0)
                out.append(StoredCheckpoint(cp.getName(), parent_of(xml), xml))
            return out

        return await self._call(collect)

    async def checkpoint_xml(self, ref: DomainRef, name: str) -> str:
        dom = await self._lookup(ref)
        return str(await self._call(lambda: dom.checkpointLookupByName(name).getXMLDesc(0)))

    async def delete_checkpoint(
        self, ref: DomainRef, name: str, metadata_only: bool = False
    ) -> None:
        dom = await self._lookup(ref)
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0

        def delete() -> None:
            try:
                cp = dom.checkpointLookupByName(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                    return  # already gone
                raise
            cp.delete(flags)

        await self._call(delete)

    async def redefine_checkpoint(self, ref: DomainRef, xml: str) -> None:
        dom = await self._lookup(ref)
        await self._call(
            dom.checkpointCreateXML, xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        )

    # --- guest agent ------------------------------------------------------------------
    async def fs_freeze(self, ref: DomainRef) -> int:
        """Freeze the guest's file systems through the guest agent; the
        number frozen. Raises LibvirtError when no agent answers."""
        dom = await self._lookup(ref)
        return int(await self._call(dom.fsFreeze, None, 0))

    async def fs_thaw(self, ref: DomainRef) -> None:
        dom = await self._lookup(ref)
        await self._call(dom.fsThaw, None, 0)

    # --- backup jobs -------------------------------------------------------------------
    async def job_active(self, ref: DomainRef) -> bool:
        dom = await self._lookup(ref)
        try:
            info = await self._call(dom.jobInfo)
        except LibvirtError as exc:
            if exc.code == libvirt.VIR_ERR_OPERATION_INVALID:  # not running: no job
                return False
            raise
        return bool(info[0] != libvirt.VIR_DOMAIN_JOB_NONE)

    async def backup_begin(
        self,
        ref: DomainRef,
        backup_xml: str,
        checkpoint_xml: str | None,
        reuse_scratch: bool = False,
    ) -> None:
        """Start a backup job. `reuse_scratch`: the scratch files named in
        the XML exist and libvirt must use them as they are (it neither
        creates nor deletes them)."""
        dom = await self._lookup(ref)
        flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL if reuse_scratch else 0
        await self._call(dom.backupBegin, backup_xml, checkpoint_xml, flags)

    async def backup_xml(self, ref: DomainRef) -> str:
        dom = await self._lookup(ref)
        return str(await self._call(dom.backupGetXMLDesc, 0))

    async def abort_job(self, ref: DomainRef, timeout: float = 30) -> None:
        """End the job (a pull backup never ends by itself) and wait until
        libvirt reports no job."""
        dom = await self._lookup(ref)
        try:
            await self._call(dom.abortJob)
        except LibvirtError as exc:
            if exc.code != libvirt.VIR_ERR_OPERATION_INVALID:  # no job: fine
                raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await self.job_active(ref):
            if loop.time() > deadline:
                raise LibvirtError(f"backup job of {ref.name} did not end within {timeout}s")
            await asyncio.sleep(0.05)

    async def completed_job_failed(self, ref: DomainRef) -> str | None:
        """The error of the last completed job, if libvirt reports one."""
        dom = await self._lookup(ref)
        try:
            stats = await self._call(dom.jobStats, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except LibvirtError:
            return None
        msg = stats.get("errmsg")
        ok = stats.get("success", True)
        if not ok and msg:
            return str(msg)
        return None


def _translate(exc: libvirt.libvirtError) -> LibvirtError:
    msg = exc.get_error_message() or str(exc)
    code = exc.get_error_code() or 0
    if "checkpoint inconsistent" in msg or "missing or broken bitmap" in msg:
        return CheckpointInconsistentError(msg, code)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFoundError(msg, code)
    return LibvirtError(msg, code)
