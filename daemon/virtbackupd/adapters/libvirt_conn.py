"""libvirt, for the engine: blocking calls run in a small executor, never
on the event loop. The only module (with the daemon's event adapter) that
imports libvirt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt

from virtbackupd.core.checkpoint_xml import parent_of
from virtbackupd.core.live_move import backed_targets
from virtbackupd.errors import (
    CheckpointInconsistentError,
    DomainNotFoundError,
    LibvirtError,
    LibvirtTimeoutError,
)

T = TypeVar("T")

# Every connection sends a keepalive after this many idle seconds and is
# closed when that many go unanswered in a row: a dead or hung libvirtd
# then fails the calls waiting on it (after about 5 * (3 + 1) s) instead
# of blocking them forever. Needs a running event loop (event_loop()).
KEEPALIVE = (5, 3)
# The bound of one blocking call (config `libvirt_timeout`), and of a
# connect: the daemon's start must stay within systemd's start timeout.
CALL_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 30.0
# How long a close waits for calls still running on the connection.
CLOSE_WAIT_S = 5.0


def _silence(_ctx: object, _err: object) -> None:
    """Without a handler libvirt prints every error to stderr; we raise them."""


libvirt.registerErrorHandler(_silence, None)

_loop_lock = threading.Lock()
_loop_started = False


def event_loop() -> None:
    """Register libvirt's default event implementation (once, before any
    connection) and run it forever in a daemon thread. Keepalives and
    domain events need it; libvirtaio is not used because it touches the
    asyncio loop from whichever thread makes a libvirt call."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def configure(call_timeout: float) -> None:
    """The bound of every blocking libvirt call of this process (config
    `libvirt_timeout`)."""
    global CALL_TIMEOUT_S
    CALL_TIMEOUT_S = call_timeout


class Workers(Executor):
    """A fixed pool of *daemon* threads for blocking libvirt calls. A call
    that hangs keeps its thread, but never the process's exit: the
    standard ThreadPoolExecutor joins its threads at exit, so one hung
    call would hold the daemon after SIGTERM forever."""

    def __init__(self, workers: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._pending = 0  # submitted and not yet returned (given up on or not)
        self._idle = threading.Condition()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._idle:
            self._pending += 1
        self._jobs.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn = job
            try:
                if not future.set_running_or_notify_cancel():
                    continue  # its caller gave up before it started
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 (handed to the caller, who raises it)
                    future.set_exception(exc)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Whether every call submitted has returned (within `timeout`),
        including those whose callers gave up on them."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for t in self._threads:
                t.join()


async def bounded(
    executor: Executor, fn: Callable[[], T], call: str, timeout: float, domain: str | None = None
) -> T:
    """Run a blocking libvirt call in `executor`, at most `timeout` seconds."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(executor, fn), timeout)
    except TimeoutError:
        on = f" on domain {domain}" if domain else ""
        raise LibvirtTimeoutError(
            f"libvirt did not answer {call}{on} within {timeout:g} s "
            "(libvirtd hung or unreachable; see `libvirt_timeout` in docs/configuration.md)",
            call,
            domain,
        ) from None


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
    """One connection. Use ``async with await Libvirt.open(uri) as lv``.
    Every call is bounded (CALL_TIMEOUT_S) and the connection keeps alive."""

    def __init__(self, conn: Any, executor: Workers, uri: str, timeout: float) -> None:
        self._conn = conn
        self._executor = executor
        self.uri = uri
        self.timeout = timeout
        # The call that did not answer in time: it still waits in its
        # thread, and libvirt's client does not survive a second call
        # waiting beside it on a dead peer (seen: no keepalive close, then
        # a segfault when the socket closed). The connection is given up.
        self._hung: LibvirtTimeoutError | None = None

    @classmethod
    async def open(cls, uri: str, timeout: float | None = None) -> Libvirt:
        timeout = CALL_TIMEOUT_S if timeout is None else timeout
        event_loop()
        executor = Workers(4, "libvirt")

        def connect() -> Any:
            conn = libvirt.open(uri)
            try:
                conn.setKeepAlive(*KEEPALIVE)
            except libvirt.libvirtError as exc:
                # A driver in this process (test:///default) has no peer
                # to lose and no keepalive; any other refusal is real.
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    conn.close()
                    raise
            return conn

        try:
            conn = await bounded(
                executor, connect, f"a connect to {uri}", min(timeout, CONNECT_TIMEOUT_S)
            )
        except libvirt.libvirtError as exc:
            executor.shutdown(wait=False)
            raise LibvirtError(
                f"cannot connect to {uri}: {exc.get_error_message()}", exc.get_error_code() or 0
            ) from exc
        except LibvirtError:
            executor.shutdown(wait=False)
            raise
        return cls(conn, executor, uri, timeout)

    async def __aenter__(self) -> Libvirt:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection once no call runs on it. A call given up on
        (its bound passed, its task cancelled) may still run in its thread:
        libvirt's client then uses the connection's memory after the close
        (seen: a segfault when the peer went away afterwards; a warning
        "virObjectGetLockableObj ... is not a virObjectLockable instance"
        is the same use after free). Such a connection is left open (to be
        ended by the keepalive or the process's exit), never closed under
        a call."""
        if self._hung is None and await asyncio.to_thread(self._executor.wait_idle, CLOSE_WAIT_S):
            # Best effort: a dead peer must not turn the end of a job into an error.
            with contextlib.suppress(LibvirtError):
                await self._call(self._conn.close, what="close")
        self._executor.shutdown(wait=False)

    async def _call(
        self, fn: Callable[..., T], *args: Any, what: str | None = None, domain: str | None = None
    ) -> T:
        """`domain`: the domain a call that is not a virDomain method is
        about (its errors carry it)."""
        owner = getattr(fn, "__self__", None)
        # virDomainGetName answers from the client's copy: no round trip.
        if isinstance(owner, libvirt.virDomain):
            domain = owner.name()
        call = what or str(getattr(fn, "__name__", "a call"))
        if self._hung is not None:
            raise LibvirtError(
                f"not asking libvirt for {call}: this connection was given up when "
                f"{self._hung.call} did not answer"
            )
        try:
            return await bounded(
                self._executor, functools.partial(fn, *args), call, self.timeout, domain
            )
        except LibvirtTimeoutError as exc:
            self._hung = exc
            raise
        except libvirt.libvirtError as exc:
            raise translate(exc, domain) from exc

    def alive(self) -> bool:
        """Whether the connection is up (libvirt's own view: no round trip;
        the keepalive ends one whose peer stopped answering)."""
        return bool(self._conn.isAlive())

    # --- domains -------------------------------------------------------------------
    async def _lookup(self, ref: DomainRef | str) -> Any:
        key = ref.uuid if isinstance(ref, DomainRef) else ref
        name = ref.name if isinstance(ref, DomainRef) else key

        def find() -> Any:
            try:
                return self._conn.lookupByUUIDString(key)
            except libvirt.libvirtError:
                pass
            try:
                return self._conn.lookupByName(key)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    raise DomainNotFoundError(
                        f"no domain named or with UUID '{key}'",
                        libvirt.VIR_ERR_NO_DOMAIN,
                        domain=name,
                    ) from exc
                raise

        return await self._call(find, what=f"the lookup of domain {key}", domain=name)

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

        return await self._call(
            collect, what=f"the checkpoint listing of {ref.name}", domain=ref.name
        )

    async def checkpoint_xml(self, ref: DomainRef, name: str) -> str:
        dom = await self._lookup(ref)
        return str(
            await self._call(
                lambda: dom.checkpointLookupByName(name).getXMLDesc(0),
                what=f"the XML of checkpoint {name} of {ref.name}",
                domain=ref.name,
            )
        )

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

        await self._call(
            delete, what=f"the deletion of checkpoint {name} of {ref.name}", domain=ref.name
        )

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
                raise LibvirtError(
                    f"backup job of {ref.name} did not end within {timeout}s", domain=ref.name
                )
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


#: libvirt error codes that are errors of their own kind here, told apart
#: by code alone: libvirt's message text is translated (LANG) and reworded
#: between versions. VIR_ERR_CHECKPOINT_INCONSISTENT (109) is what
#: backupBegin and a checkpoint's redefinition report for a missing or
#: broken bitmap (libvirt's qemu_backup.c and qemu_checkpoint.c).
BY_CODE: dict[int, type[LibvirtError]] = {
    libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT: CheckpointInconsistentError,
    libvirt.VIR_ERR_NO_DOMAIN: DomainNotFoundError,
}


def translate(exc: libvirt.libvirtError, domain: str | None = None) -> LibvirtError:
    """Our error for a libvirt error: its class chosen by libvirt's error
    code, with that code and the domain (when the call was about one) as
    its context."""
    msg = exc.get_error_message() or str(exc)
    code = exc.get_error_code() or 0
    return BY_CODE.get(code, LibvirtError)(msg, code, domain=domain)
