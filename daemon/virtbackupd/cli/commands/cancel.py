"""`virtbackup cancel DOMAIN`: end the domain's running backup.

A live owner (the daemon or a CLI `backup`) is asked through a request
file (engine.locks) and cleans up itself, as on any failure; this waits
until its record says it ended. An owner that died (SIGKILL, OOM, a
crash: engine.locks.backup_owner_alive) cannot answer: then the clean-up
is done here, from the backup's undo log, by the code a failing job runs
(engine.recovery.leftovers through engine.domain_job), and the backup is recorded
failed, "interrupted". An owner that dies while this waits is noticed the
same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.cli.commands import Command, Session
from virtbackupd.cli.domains import domain_of
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.records import BackupRecord, BackupStatus, DomainRecord
from virtbackupd.engine.domain_job import domain_job
from virtbackupd.engine.locks import backup_owner_alive, clear_cancel, request_cancel
from virtbackupd.errors import VirtBackupError

#: How long `cancel` waits for a live job to finish its clean-up.
CANCEL_WAIT_S = 120


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="domain name or UUID")


async def run(args: argparse.Namespace, session: Session) -> int:
    config, store = session.config, session.store
    dom = await domain_of(store, config, args.domain)
    running = [j for j in await store.running_progress() if j.domain_uuid == dom.uuid]
    if not running:
        print(f"virtbackup: no backup of {dom.name} is running", file=sys.stderr)
        return 1
    ids = {j.backup_id for j in running}
    dead = not backup_owner_alive(config.runtime_dir, dom.uuid)
    if not dead:
        request_cancel(config.runtime_dir, dom.uuid)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while not dead:
            left = [b for b in await store.backups(dom.uuid) if b.id in ids]
            if all(b.status is not BackupStatus.RUNNING for b in left):
                return _said(args, dom, left, "cancelled backup")
            if time.monotonic() > deadline:
                print(
                    f"virtbackup: the backup of {dom.name} has not ended {CANCEL_WAIT_S} s "
                    "after the cancel request; `virtbackup status` shows it",
                    file=sys.stderr,
                )
                return 1
            await asyncio.sleep(0.3)
            dead = not backup_owner_alive(config.runtime_dir, dom.uuid)
        # Gone: having ended its backup on our request (it records that,
        # then exits, between two of our looks), or died without a word.
        left = [b for b in await store.backups(dom.uuid) if b.id in ids]
        if all(b.status is not BackupStatus.RUNNING for b in left):
            clear_cancel(config.runtime_dir, dom.uuid)
            return _said(args, dom, left, "cancelled backup")
        clear_cancel(config.runtime_dir, dom.uuid)  # nobody is left to read it
    await _clean_after_dead_owner(config, store, dom, running[0].backup_id)
    left = [b for b in await store.backups(dom.uuid) if b.id in ids]
    if any(b.status is BackupStatus.RUNNING for b in left):
        print(
            f"virtbackup: the process of backup {', '.join(sorted(ids))} of {dom.name} died; "
            "its undo log names libvirt steps and libvirt cannot be reached: the domain's "
            "next backup (or `cancel` once libvirt answers) takes them back",
            file=sys.stderr,
        )
        return 1
    return _said(args, dom, left, "cleaned up backup", " (its process had died)")


async def _clean_after_dead_owner(
    config: DaemonConfig, store: Store, dom: DomainRecord, backup_id: str
) -> None:
    """The domain's leftovers, undone as the next backup would: with
    libvirt (its pull job aborted, its checkpoint deleted) when libvirt
    answers and knows the domain; else what needs nothing of libvirt."""
    rec = await store.backup(backup_id)
    repo = (
        Repository.of_backup(Path(rec.path))
        if rec is not None and rec.path
        else Repository(config.backup_root)
    )
    try:
        lv = await Libvirt.open(config.libvirt_uri)
    except VirtBackupError:
        lv = None
    try:
        if lv is not None:
            try:
                async with domain_job(
                    config, store, repo, dom.uuid, dom.name, "cancel", libvirt=lv
                ):
                    return
            except VirtBackupError as exc:
                print(f"virtbackup: warning: {exc}; cleaning without libvirt", file=sys.stderr)
        async with domain_job(config, store, repo, dom.uuid, dom.name, "cancel"):
            pass
    finally:
        if lv is not None:
            await lv.close()


def _said(
    args: argparse.Namespace, dom: DomainRecord, left: list[BackupRecord], what: str, why: str = ""
) -> int:
    for b in left:
        if args.json:
            print(json.dumps(b.as_json(), indent=2))
        else:
            print(f"{what} {b.id} of {dom.name}{why}: {b.status.value} ({b.error})")
    return 0


COMMAND = Command(
    "cancel",
    "cancel the running backup of a domain (cleaned up like any failure)",
    add_arguments,
    run,
)
