"""Finding the domain an operator names: the catalogue first, then
libvirt (a renamed domain, a domain never backed up)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.store import Store
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.records import DomainRecord
from virtbackupd.errors import DomainNotFoundError, InputError, VirtBackupError


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


async def domains_named(
    store: Store, config: DaemonConfig, name_or_uuid: str
) -> list[DomainRecord]:
    """Every domain a name or UUID stands for in the catalogue: a UUID is
    one domain; a name is every domain that has borne it (`list NAME`
    shows the backups of a VM re-created under its old name, whose UUID
    is new). Unknown to the catalogue: as domain_of."""
    dom = await store.domain(name_or_uuid)
    if dom is not None:
        return [dom]
    return await store.domains_named(name_or_uuid) or [await domain_of(store, config, name_or_uuid)]


async def the_domain(
    store: Store, config: DaemonConfig, name_or_uuid: str, backup_id: str | None
) -> DomainRecord:
    """The one domain `restore`, `verify` and `mount` act on. A name that
    several domains have borne is settled by --backup (its domain), else
    by libvirt (the domain that bears the name now, if it has backups:
    said on stderr, with how to take another); otherwise it is an input
    error listing the UUIDs to choose from."""
    found = await domains_named(store, config, name_or_uuid)
    if len(found) == 1:
        return found[0]
    if backup_id is not None:
        for d in found:
            if await store.backups(d.uuid, backup_id=backup_id):
                return d
        return found[-1]  # the backup is unknown: the caller says so
    now, _ = await libvirt_domains_or_why(config.libvirt_uri)
    bearer = next((u for n, u in now or [] if n == name_or_uuid), None)
    for d in found:
        if d.uuid == bearer and await store.backups(d.uuid):
            others = ", ".join(x.uuid for x in found if x.uuid != d.uuid)
            print(
                f"virtbackup: note: several domains have borne the name {name_or_uuid}; "
                f"taking {d.uuid}, the one libvirt has under it now (others: {others}; "
                "give a UUID or --backup ID to take theirs)",
                file=sys.stderr,
            )
            return d
    raise InputError(
        f"several domains have borne the name {name_or_uuid}: "
        f"{describe_domains(found, now)}; give the UUID instead of the name "
        "(or --backup ID); `virtbackup list NAME` shows whose backups are whose"
    )


def describe_domains(found: Sequence[DomainRecord], now: Sequence[tuple[str, str]] | None) -> str:
    """`UUID (defined now as NAME | no longer defined)` for each, or
    without the state when libvirt was not reachable."""
    names = {u: n for n, u in now} if now is not None else None
    parts = []
    for d in found:
        if names is None:
            parts.append(d.uuid)
        elif d.uuid in names:
            parts.append(f"{d.uuid} (defined now as {names[d.uuid]})")
        else:
            parts.append(f"{d.uuid} (no longer defined)")
    return ", ".join(parts)
