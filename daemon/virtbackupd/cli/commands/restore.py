"""`virtbackup restore DOMAIN (--to DIR | --in-place | --to-device DEV)`:
write a backup's images into a folder (optionally defining a new domain
on them, or running it at once with --live), over the domain's own
disks, or onto a block device. docs/restore.md says what each promises."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.cli.catalogue import policy_set
from virtbackupd.cli.commands import Command, Needs, Session, backup_and_disks
from virtbackupd.cli.progress import ProgressLine, progress_text
from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.core.repository_format.names import escaped, is_unsafe_char
from virtbackupd.engine.domain_job import domain_job
from virtbackupd.errors import ConfigError, InputError, RestoreError, VirtBackupError

if TYPE_CHECKING:  # loaded when a restore runs (cli.commands says why)
    from virtbackupd.cli.recovery import Chosen
    from virtbackupd.engine import restore
    from virtbackupd.engine.datapath.copy import CopyProgress
    from virtbackupd.engine.restore import define


def add_arguments(rs: argparse.ArgumentParser) -> None:
    rs.add_argument("domain", help="the backed-up domain (name or UUID, as `list` shows it)")
    backup_and_disks(rs)
    where = rs.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", type=Path, metavar="DIR", help="write <DIR>/<disk>.<format>")
    where.add_argument(
        "--in-place",
        action="store_true",
        help="write over the domain's own disks (it must be shut off; its checkpoints go)",
    )
    where.add_argument(
        "--to-device",
        type=Path,
        metavar="DEV",
        help="write one disk (--disk T) onto an existing block device, not in use, as large",
    )
    rs.add_argument("--format", choices=["qcow2", "raw"], default="qcow2", help="default qcow2")
    rs.add_argument("--define", metavar="NAME", help="define a new domain NAME on the images")
    rs.add_argument(
        "--accept-edited-definition",
        action="store_true",
        help="with --define: use the backup's domain.xml even though it no longer matches "
        "the digest its manifest recorded (what could reach the host is still left out)",
    )
    rs.add_argument(
        "--live",
        action="store_true",
        help="with --to and --define: start NAME at once, running from the backup, and move "
        "its disks into DIR while it runs (`status` shows the move)",
    )
    rs.add_argument(
        "--move-rate",
        type=_positive_mib,
        default=0,
        metavar="MIB_S",
        help="with --live: limit the move to this many MiB/s (default: no limit)",
    )
    rs.add_argument(
        "--allow-damaged",
        action="store_true",
        help="write what can be read of a damaged chain (default: refuse, naming the damage)",
    )
    rs.add_argument(
        "--force", action="store_true", help="replace existing files or a shut-off domain NAME"
    )


#: --move-rate bounds, MiB/s (docs/cli.md): below 1 a live restore's
#: backup would be held practically forever; above 1 TiB/s no disk is.
MOVE_RATE_MIN = 1
MOVE_RATE_MAX = 1_000_000


def _positive_mib(text: str) -> int:
    """MiB/s on the command line, bytes/s inside: a finite number from
    MOVE_RATE_MIN to MOVE_RATE_MAX (argparse names the option)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not MOVE_RATE_MIN <= value <= MOVE_RATE_MAX:  # NaN and inf fail too
        raise argparse.ArgumentTypeError(
            f"{text[:32]!r} is not a number of MiB/s from {MOVE_RATE_MIN} to {MOVE_RATE_MAX}"
        )
    return int(value * 1024 * 1024)


def _needs(args: argparse.Namespace) -> Needs:
    """libvirt only to write over the domain, onto a device (is a running
    domain using it?) or to define one: a plain --to restore works with
    libvirt down."""
    return Needs.STORE if args.to is not None and not args.define else Needs.LIBVIRT


async def run(args: argparse.Namespace, session: Session) -> int:
    from virtbackupd.cli import recovery
    from virtbackupd.engine import restore
    from virtbackupd.engine.restore import define

    _refuse_option_mix(args)
    if args.live:
        if not args.define or args.to is None:
            raise ConfigError("--live needs --to DIR and --define NAME (a new domain runs from it)")
        return await _live(args, session)
    if args.to_device is not None and len(args.disk) != 1:
        raise ConfigError("--to-device writes one disk: give it with --disk TARGET")
    if args.to is not None:
        restore.check_target_folder(args.to.absolute())
    chosen = await recovery.chosen_backup(args, session.config, session.store)
    # An edited domain.xml is refused before anything is restored.
    saved = (
        define.saved_definition(chosen.folder, args.accept_edited_definition)
        if args.define
        else None
    )
    if args.to_device is not None:  # (--define needs --to: nothing is saved here)
        return await _restore_to_device(args, session, chosen)
    done, defined = await _write_images(args, session, chosen, saved)
    return _report(args, session.config, chosen, done, defined)


async def _live(args: argparse.Namespace, session: Session) -> int:
    """--live: the new domain runs from the backup at once while its disks
    move into DIR (engine.live_restore); the backup is held until then."""
    from virtbackupd.cli.recovery import chosen_backup
    from virtbackupd.engine import restore
    from virtbackupd.engine.restore import define
    from virtbackupd.engine.restore import live as live_restore

    config, store, lv = session.config, session.store, session.libvirt
    if args.format != "qcow2":
        raise ConfigError(
            "--live moves the disks into qcow2 images (QEMU's block stream); for raw images "
            "restore without --live, or convert the moved images with qemu-img later"
        )
    c = await chosen_backup(args, config, store)
    # Refused before anything is made when it was edited since the backup.
    saved = define.saved_definition(c.folder, args.accept_edited_definition)
    started = time.monotonic()
    async with domain_job(config, store, c.repo, c.dom.uuid, c.dom.name, "restore"):
        for disk in c.disks:  # the chain's records and images, not its content: quick
            chain = await restore.load_chain(c.folder, disk, config.runtime_dir, args.allow_damaged)
            for line in chain.damage:
                print(f"virtbackup: warning: running despite damage: {line}", file=sys.stderr)
        defined, hold = await live_restore.start_live_restore(
            lv,
            c.repo,
            live_restore.LiveRestore(
                c.folder,
                tuple(c.disks),
                args.to.absolute(),
                args.define,
                saved,
                rate=args.move_rate,
                force=args.force,
            ),
        )
    took = time.monotonic() - started
    ref = defined.ref
    for warning in defined.warnings:
        print(f"virtbackup: warning: {warning}", file=sys.stderr)
    out = {
        "backup": c.record.id,
        "defined": defined.as_json(),
        "running": True,
        "seconds": round(took, 2),
        "hold": hold.id,
        "disks": [{"disk": d, "path": str(live_restore.image_of(hold, d))} for d in c.disks],
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"domain {ref.name} ({ref.uuid}) runs from backup {c.record.id} ({took:.1f} s)")
    for d in c.disks:
        print(f"  {d}: moving into {live_restore.image_of(hold, d)}")
    for line in defined.report():
        print(line)
    print(
        f"  backup {c.record.id} is held until the move ends; "
        "`virtbackup status` shows its progress"
    )
    return 0


def _refuse_option_mix(args: argparse.Namespace) -> None:
    """What the options alone rule out, refused before anything is read."""
    if args.define and not args.to:
        raise ConfigError("--define needs --to DIR (a new domain gets new images)")
    if args.define and any(is_unsafe_char(c) for c in args.define):
        # Echoed in every message after this: a newline would forge a line.
        raise InputError(
            f"--define '{escaped(args.define[:64])}': a domain name without control or "
            "format characters"
        )
    if args.accept_edited_definition and not args.define:
        raise ConfigError("--accept-edited-definition goes with --define NAME")
    if args.move_rate and not args.live:
        raise ConfigError("--move-rate limits a --live restore's move; give --live too")


async def _write_images(
    args: argparse.Namespace,
    session: Session,
    chosen: Chosen,
    saved: define.SavedDefinition | None,
) -> tuple[list[restore.RestoredDisk], define.Defined | None]:
    """--to DIR (defining a domain on the images with --define) or
    --in-place; the disks written and the domain defined."""
    from virtbackupd.core.restored_domain import RestoredImage
    from virtbackupd.engine import restore
    from virtbackupd.engine.restore import define

    config, store, lv = session.config, session.store, session.lv
    dom, folder, repo, disks = chosen.dom, chosen.folder, chosen.repo, chosen.disks
    damaged_ok = bool(args.allow_damaged)
    # Whatever can be known before a byte is copied is refused here; what
    # only libvirt knows refuses the define after the copy, and then the
    # written images are removed (restore_to_dir's before_publish).
    planned = None
    defined: define.Defined | None = None
    if saved is not None:
        assert lv is not None
        to = args.to.absolute()
        images = {d: RestoredImage(to / f"{d}.{args.format}", args.format) for d in disks}
        wanted = define.NewDomain(args.define, images, to, args.force)
        planned = await define.plan_definition(lv, saved, wanted)

    async def define_them(written: Sequence[restore.RestoredDisk]) -> None:
        nonlocal defined
        assert lv is not None
        assert saved is not None
        assert planned is not None
        defined = await define.define_planned(lv, saved, planned)

    if args.to is not None and args.force and planned is None:
        await _refuse_running_targets(config, lv, args.to.absolute(), disks, args.format)
    line = ProgressLine(sys.stderr.isatty() and not args.json)
    # libvirt only to write over the domain itself: a --define restore works
    # for a domain that is gone from libvirt.
    domain_lv = lv if args.in_place else None
    async with domain_job(
        config, store, repo, dom.uuid, dom.name, "restore", libvirt=domain_lv
    ) as job:
        try:
            ctx = restore.RestoreContext(
                folder, tuple(disks), config.runtime_dir, _disk_progress(line), damaged_ok
            )
            if args.in_place:
                assert lv is not None
                assert job.ref is not None
                ref = job.ref
                done = await restore.restore_in_place(lv, store, ref, ctx)
            else:
                done = await restore.restore_to_dir(
                    ctx,
                    args.to.absolute(),
                    args.format,
                    force=args.force,
                    before_publish=define_them if planned is not None else None,
                )
        finally:
            line.end()
    return done, defined


def _report(
    args: argparse.Namespace,
    config: DaemonConfig,
    chosen: Chosen,
    done: Sequence[restore.RestoredDisk],
    defined: define.Defined | None,
) -> int:
    record, dom = chosen.record, chosen.dom
    out: dict[str, Any] = {
        "backup": record.id,
        "disks": [
            {
                "disk": r.disk,
                "path": str(r.path),
                "format": r.fmt,
                "bytes": r.result.bytes_written,
                "damage": list(r.damage),
            }
            for r in done
        ],
        "in_place": bool(args.in_place),
    }
    governed_by: list[str] = []
    if defined is not None:
        # The copy may match a policy's pattern (web01 -> web01-copy under
        # "web01*"): it is then backed up on that schedule. Said, not
        # silently adopted (first-week run).
        governed_by = sorted(
            str(p.source)
            for p in policy_set(config, quiet=True).policies
            if p.matches(defined.ref.name, defined.ref.uuid)
        )
        out["defined"] = defined.as_json() | {"governed_by": governed_by}
        for warning in defined.warnings:
            print(f"virtbackup: warning: {warning}", file=sys.stderr)
    for r in done:
        for line_ in r.damage:
            print(f"virtbackup: warning: written despite damage: {line_}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for r in done:
        print(f"restored {r.disk} of backup {record.id} -> {r.path} ({r.fmt})")
    if args.in_place:
        print(f"checkpoints of {dom.name} removed: its next backup is full")
    if defined is not None:
        print(f"defined domain {defined.ref.name} ({defined.ref.uuid})")
        for line_ in defined.report():
            print(line_)
        for source in governed_by:
            print(
                f"note: {defined.ref.name} matches the policy in {source}: the daemon backs "
                "it up on that schedule (narrow the policy's `domains` if it should not)"
            )
    return 0


def _disk_progress(line: ProgressLine) -> restore.ProgressFn | None:
    if not line.enabled:
        return None
    started = time.monotonic()

    def show(disk: str, p: CopyProgress) -> None:
        elapsed = time.monotonic() - started
        rate = p.bytes_read / elapsed if elapsed > 0 else 0.0
        total = p.total_estimate
        eta = (total - p.bytes_read) / rate if rate > 0 and total >= p.bytes_read else None
        line.show(progress_text(disk, p.bytes_read, total, rate, eta))

    return show


async def _restore_to_device(args: argparse.Namespace, session: Session, chosen: Chosen) -> int:
    from virtbackupd.adapters import block_devices
    from virtbackupd.engine import restore

    config, store, lv = session.config, session.store, session.libvirt
    repo, dom, record, folder = chosen.repo, chosen.dom, chosen.record, chosen.folder
    device = block_devices.check_block_device(args.to_device)
    user = await restore.running_user(lv, {device})
    if user is not None:
        raise RestoreError(f"{args.to_device} is a disk of running domain {user[0]}")
    why = block_devices.in_use(device)
    if why is not None:
        raise RestoreError(f"{args.to_device} is in use: {why}; nothing was written")
    line = ProgressLine(sys.stderr.isatty() and not args.json)
    disk = args.disk[0]
    async with domain_job(config, store, repo, dom.uuid, dom.name, "restore"):
        try:
            ctx = restore.RestoreContext(
                folder, (disk,), config.runtime_dir, _disk_progress(line), bool(args.allow_damaged)
            )
            done = await restore.restore_to_device(ctx, disk, device)
        finally:
            line.end()
    for damage in done.damage:
        print(f"virtbackup: warning: written despite damage: {damage}", file=sys.stderr)
    out = {
        "backup": record.id,
        "disk": disk,
        "device": str(args.to_device),
        "bytes": done.result.bytes_written,
        "zeroed": done.result.bytes_zeroed,
        "damage": list(done.damage),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"restored {disk} of backup {record.id} -> {args.to_device}")
    return 0


async def _refuse_running_targets(
    config: DaemonConfig, lv: Libvirt | None, to: Path, disks: Sequence[str], fmt: str
) -> None:
    """--to DIR --force (without --define, which checks in plan_definition)
    replaces existing files: never one a running domain has as a disk, or
    QEMU keeps writing to a deleted file and the restore is lost. Only
    libvirt knows; if it cannot be asked, existing files are not replaced."""
    from virtbackupd.engine import restore

    existing = {p for d in disks if (p := to / f"{d}.{fmt}").exists()}
    if not existing:
        return
    if lv is not None:
        user = await restore.running_user(lv, existing)
    else:
        try:
            async with await Libvirt.open(config.libvirt_uri) as own:
                user = await restore.running_user(own, existing)
        except VirtBackupError as exc:
            raise RestoreError(
                f"--force would replace {', '.join(sorted(map(str, existing)))}, but libvirt "
                f"cannot tell whether a running domain uses it ({exc}); nothing was restored"
            ) from exc
    if user is not None:
        raise RestoreError(f"{user[1]} is a disk of running domain {user[0]}; nothing was restored")


COMMAND = Command(
    "restore",
    "write standalone images of a backup (optionally define a domain on them)",
    add_arguments,
    run,
    needs=_needs,
    reconcile=True,
)
