"""Finding the domain an operator names: the catalogue first, then
libvirt (a renamed domain, a domain never backed up)."""

from __future__ import annotations

from datetime import UTC, datetime

from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.records import DomainRecord
from virtbackupd.errors import DomainNotFoundError, VirtBackupError


async def domain_of(store: Store, config: DaemonConfig, name_or_uuid: str) -> DomainRecord:
    """The domain by UUID or name: the catalogue first, then libvirt (a
    renamed domain is found under its new name, a domain never backed up
    is known). Unknown everywhere: an input error."""
    dom = await store.domain(name_or_uuid) or await store.domain_by_name(name_or_uuid)
    if dom is not None:
        return dom
    try:
        async with await Libvirt.open(config.libvirt_uri) as lv:
            ref = await lv.domain(name_or_uuid)
    except DomainNotFoundError:
        raise DomainNotFoundError(
            f"no domain '{name_or_uuid}': libvirt does not know it and no backups of it "
            "are recorded (`virtbackup list` shows the recorded ones)"
        ) from None
    except VirtBackupError as exc:
        raise DomainNotFoundError(
            f"no backups are recorded for a domain '{name_or_uuid}', and libvirt cannot be "
            f"asked for it ({exc})"
        ) from exc
    now = datetime.now(UTC)
    return await store.domain(ref.uuid) or DomainRecord(ref.uuid, ref.name, now, now, None)


async def libvirt_domains(uri: str) -> list[tuple[str, str]] | None:
    """(name, uuid) of every domain, or None when libvirt is unreachable."""
    return (await libvirt_domains_or_why(uri))[0]


async def libvirt_domains_or_why(uri: str) -> tuple[list[tuple[str, str]] | None, str | None]:
    """(name, uuid) of every domain and None; or None and why libvirt
    cannot be asked."""
    try:
        async with await Libvirt.open(uri) as lv:
            return [(d.name, d.uuid) for d in await lv.domains()], None
    except VirtBackupError as exc:
        return None, str(exc)
