"""Entry point of the `virtbackup` command.

Global options go before or after the command: ``virtbackup [-c CONFIG]
[--json] COMMAND ...`` or ``virtbackup COMMAND ... [-c CONFIG] [--json]``
(given twice, the later one wins). No option is taken from an
abbreviation. Every failure ends with one clear line on stderr and a
non-zero exit: 1 for a failed operation, 2 for bad input (usage, config,
an unknown domain, backup, disk or time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from virtbackupd import __version__, logs
from virtbackupd.adapters import host_folders, libvirt_conn, priority
from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.adapters.repository import Repository
from virtbackupd.adapters.store import Store
from virtbackupd.cli import listing
from virtbackupd.cli.catalogue import (
    check_catalogue,
    policy_set,
    reconcile_catalogue,
    reindex_command,
)
from virtbackupd.cli.domains import (
    describe_domains,
    domain_of,
    domains_named,
    libvirt_domains_or_why,
    the_domain,
)
from virtbackupd.cli.progress import ProgressLine, progress_text
from virtbackupd.config.daemon import DaemonConfig, config_path, load_config
from virtbackupd.config.policy import file_digests, policy_files
from virtbackupd.core.policy import Level, Policy, policy_for
from virtbackupd.core.records import BackupRecord, BackupStatus, CheckpointStatus, DomainRecord
from virtbackupd.core.repository_format.names import escaped, is_unsafe_char
from virtbackupd.engine.backup import BackupContext, JobProgress, backup_domain
from virtbackupd.engine.catalogue import Standing, standing
from virtbackupd.engine.domain_job import domain_job
from virtbackupd.engine.leftovers import sweep_runtime
from virtbackupd.engine.locks import backup_owner_alive
from virtbackupd.errors import (
    ConfigError,
    InputError,
    RestoreError,
    UnknownRestorePointError,
    VirtBackupError,
)

if TYPE_CHECKING:  # the commands' own modules load when they run (a quick start)
    from virtbackupd.engine import restore
    from virtbackupd.engine.copy import CopyProgress


class _Parser(argparse.ArgumentParser):
    """No abbreviations (`--ful` is not `--full`, `--forc` not `--force`:
    an option an operator did not write in full is a typo, not a wish),
    and a usage error is one line naming the help. Subparsers are made of
    the same class (argparse's default `parser_class`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """`-c` and `--json`, on the main parser and on every command: habit
    (and docs/operations.md) puts them after the command too. On a command
    their default is SUPPRESS, so one given before the command stays
    unless given again after it (then the later one wins)."""
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="daemon config file (default: $VIRTBACKUPD_CONFIG, else "
        "/etc/virtbackupd/virtbackupd.yaml)",
        **default,
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print machine-readable JSON instead of text",
        **default,
    )


def _commands(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command's parser below `p` (`policy` and `policy check` too)."""
    out = []
    for action in p._actions:  # argparse lists its subparsers nowhere else
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out += [child, *_commands(child)]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="virtbackup",
        description="Operate virtbackupd: back up, list, restore and verify libvirt domains.",
    )
    parser.add_argument("--version", action="version", version=f"virtbackup {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser("backup", help="back up one domain now")
    b.add_argument("domain", help="domain name or UUID")
    b.add_argument("--full", action="store_true", help="take a full backup, whatever the plan says")
    ls = sub.add_parser("list", help="list backups")
    ls.add_argument("domain", nargs="?", help="only this domain (name or UUID)")
    ls.add_argument("--all", action="store_true", help="failed attempts too, with their reasons")
    cp = sub.add_parser("checkpoints", help="checkpoint lineage: libvirt's view and the store's")
    cp.add_argument("domain")
    rs = sub.add_parser(
        "restore",
        help="write standalone images of a backup (optionally define a domain on them)",
    )
    rs.add_argument("domain", help="the backed-up domain (name or UUID, as `list` shows it)")
    _backup_and_disks(rs)
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
    pr = sub.add_parser(
        "prune", help="apply retention and the chain limit: remove and merge old backups"
    )
    pr.add_argument("domain", nargs="?", help="only this domain (name or UUID)")
    pr.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    vf = sub.add_parser("verify", help="check backup images and their recorded digests")
    vf.add_argument("domain", nargs="?", help="only this domain (name or UUID)")
    vf.add_argument("--backup", metavar="ID", help="only this backup")
    vf.add_argument(
        "--filesystems",
        action="store_true",
        help="also check every filesystem found in the backups, read-only "
        "(e2fsck -n, xfs_repair -n, fsck.vfat -n)",
    )
    mt = sub.add_parser(
        "mount", help="show a backup's files read-only below MOUNTPOINT (until `umount`)"
    )
    mt.add_argument("domain", help="the backed-up domain (name or UUID)")
    mt.add_argument("mountpoint", type=Path, help="an empty folder")
    _backup_and_disks(mt)
    um = sub.add_parser("umount", help="release a `virtbackup mount`: mounts, devices, helper")
    um.add_argument("mountpoint", type=Path)
    sub.add_parser("reindex", help="rebuild the state database from the backup repository")
    sub.add_parser("status", help="the daemon, each domain's last good backup, running jobs")
    cn = sub.add_parser(
        "cancel", help="cancel the running backup of a domain (cleaned up like any failure)"
    )
    cn.add_argument("domain", help="domain name or UUID")
    fg = sub.add_parser(
        "forget-checkpoints",
        help="remove virtbackupd's checkpoints and bitmaps from a domain (e.g. before "
        "`virsh snapshot-revert`); backups stay, the next backup is full",
    )
    fg.add_argument("domain", help="domain name or UUID")
    pol = sub.add_parser("policy", help="policy files")
    polsub = pol.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    chk = polsub.add_parser(
        "check", help="validate policy files (exit 0 if all are valid, 2 if not)"
    )
    chk.add_argument("files", nargs="*", type=Path, help="default: the config's policy_dirs")
    for command in _commands(parser):
        _global_options(command, suppress=True)
        # Whose usage error an unknown option is (the innermost wins).
        command.set_defaults(usage_of=command)
    return parser


def _backup_and_disks(p: argparse.ArgumentParser) -> None:
    """`[--backup ID | --at TIME] [--disk T ...]`: which backup, which disks
    (cli.recovery.chosen_backup reads them)."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--backup", metavar="ID", help="this backup (default: the newest)")
    which.add_argument(
        "--at", metavar="TIME", help="the newest backup started at or before TIME (ISO 8601)"
    )
    p.add_argument(
        "--disk", action="append", default=[], metavar="TARGET", help="only this disk (repeat)"
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Named by the command it was given to (`virtbackup list --ful`
        # points at `virtbackup list --help`, not the list of commands).
        getattr(args, "usage_of", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        # One line, as every usage error (the list of commands is --help's).
        print("virtbackup: error: give a command (see `virtbackup --help`)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except VirtBackupError as exc:
        # One line; the code is the class's (InputError and kin: 2).
        return logs.exit_status("virtbackup", exc)
    except KeyboardInterrupt:
        print("virtbackup: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`virtbackup status | head`): stop quietly
        # like any Unix filter; keep Python from complaining at exit too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell shows for such a filter
    except OSError as exc:  # after BrokenPipeError, one of its kind
        # The host refused a file operation that no check foresaw (a full
        # or read-only file system, a vanished folder): its words, one line.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"virtbackup: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 (a bug: its traceback and a request to report it)
        return logs.exit_status("virtbackup", exc)


async def _run(args: argparse.Namespace) -> int:
    if args.command == "policy":
        from virtbackupd.cli.policy_check import policy_check

        return await policy_check(args)
    config = load_config(config_path(args.config))
    # QEMU passes through runtime_dir and scratch_dir to its job folders:
    # made 0711 whatever this shell's umask (an existing one keeps its mode).
    host_folders.make_passable(config.runtime_dir)
    host_folders.make_passable(config.scratch_dir)
    priority.apply(config.priority)
    libvirt_conn.configure(config.libvirt_timeout)
    logs.configure(config.log_level, "json" if args.json else "console")
    await sweep_runtime(config.runtime_dir)  # what killed commands left
    if args.command == "reindex":
        return await reindex_command(args, config)
    async with Store.open(config.state_db) as store:
        await check_catalogue(config, store)
        if args.command in ("list", "status", "verify", "prune", "restore", "mount"):
            await reconcile_catalogue(config, store)
        if args.command in ("mount", "umount"):
            from virtbackupd.cli import recovery

            if args.command == "umount":
                return await recovery.umount(args, config)
            return await recovery.mount(args, config, store)
        if args.command == "list":
            return await _list(args, config, store)
        if args.command == "status":
            return await _status(args, config, store)
        if args.command == "verify":
            return await _verify(args, config, store)
        if args.command == "prune":
            return await _prune(args, config, store)
        if args.command == "cancel":
            from virtbackupd.cli.cancel import cancel

            return await cancel(args, config, store)
        if args.command == "restore" and args.to is not None and not args.define:
            return await _restore(args, config, store, None)
        async with await Libvirt.open(config.libvirt_uri) as lv:
            if args.command == "backup":
                return await _backup(args, config, store, lv)
            if args.command == "checkpoints":
                return await _checkpoints(args, store, lv)
            if args.command == "forget-checkpoints":
                from virtbackupd.cli.forget import forget_checkpoints

                return await forget_checkpoints(args, config, store, lv)
            if args.command == "restore":
                return await _restore(args, config, store, lv)
    raise AssertionError(args.command)


async def _backup(args: argparse.Namespace, config: DaemonConfig, store: Store, lv: Libvirt) -> int:
    ref = await lv.domain(args.domain)
    loaded = policy_set(config, quiet=True)
    refusal = loaded.refusal(ref.name, ref.uuid)
    if refusal is not None:
        raise ConfigError(refusal)
    policy = policy_for(ref.name, ref.uuid, loaded.policies) or Policy(
        source=Path("<command line>"), domains=(ref.name,)
    )
    line = ProgressLine(sys.stderr.isatty() and not args.json)

    def progress(p: JobProgress) -> None:
        line.show(progress_text(p.domain, p.done, p.total, p.rate(), p.eta()))

    try:
        record = await backup_domain(
            BackupContext(config, store, lv, policy),
            ref.uuid,
            want=Level.FULL if args.full else None,
            progress=progress,
        )
    finally:
        line.end()
    if args.json:
        print(json.dumps(record.as_json(), indent=2))
    else:
        print(listing.line(listing.listing([record], show_failed=True)[0]))
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


async def _restore_to_device(
    args: argparse.Namespace,
    config: DaemonConfig,
    store: Store,
    lv: Libvirt,
    repo: Repository,
    dom: DomainRecord,
    record: BackupRecord,
    folder: Path,
) -> int:
    from virtbackupd.adapters import block_devices
    from virtbackupd.engine import restore

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


async def _restore(
    args: argparse.Namespace, config: DaemonConfig, store: Store, lv: Libvirt | None
) -> int:
    from virtbackupd.cli import recovery
    from virtbackupd.core.restored_domain import RestoredImage
    from virtbackupd.engine import restore
    from virtbackupd.engine.restore import define

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
    if args.live:
        if not args.define or args.to is None:
            raise ConfigError("--live needs --to DIR and --define NAME (a new domain runs from it)")
        assert lv is not None
        return await recovery.live(args, config, store, lv)
    if args.to_device is not None and len(args.disk) != 1:
        raise ConfigError("--to-device writes one disk: give it with --disk TARGET")
    if args.to is not None:
        restore.check_target_folder(args.to.absolute())
    chosen = await recovery.chosen_backup(args, config, store)
    # An edited domain.xml is refused before anything is restored.
    saved = (
        define.saved_definition(chosen.folder, args.accept_edited_definition)
        if args.define
        else None
    )
    dom, record, folder, repo, disks = (
        chosen.dom,
        chosen.record,
        chosen.folder,
        chosen.repo,
        chosen.disks,
    )
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

    if args.to_device is not None:
        assert lv is not None
        return await _restore_to_device(args, config, store, lv, repo, dom, record, folder)
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


async def _prune(args: argparse.Namespace, config: DaemonConfig, store: Store) -> int:
    from virtbackupd.cli import recovery
    from virtbackupd.engine.prune import describe, prune_under_policy

    if args.domain:
        domains = [await domain_of(store, config, args.domain)]
    else:
        seen = {b.domain_uuid for b in await store.backups()}
        domains = [d for u in sorted(seen) if (d := await store.domain(u)) is not None]
    loaded = policy_set(config, quiet=True)
    governing = loaded.policies
    refused = False
    results = []
    try:
        lv: Libvirt | None = await Libvirt.open(config.libvirt_uri)
    except VirtBackupError as exc:
        print(f"virtbackup: warning: {exc}; checkpoints of pruned backups stay", file=sys.stderr)
        lv = None
    try:
        await recovery.settle_holds(recovery.repositories(config), lv, config)
        for dom in domains:
            refusal = loaded.refusal(dom.name, dom.uuid)
            if refusal is not None:
                print(f"virtbackup: error: {refusal}; nothing is pruned", file=sys.stderr)
                refused = True
                continue
            policy = policy_for(dom.name, dom.uuid, governing)
            if policy is None:
                print(
                    f"virtbackup: {dom.name}: no policy governs it; nothing is pruned",
                    file=sys.stderr,
                )
                continue
            result = await prune_under_policy(
                config, store, policy, dom.uuid, dom.name, dry_run=args.dry_run, libvirt=lv
            )
            results.append((dom, result))
    finally:
        if lv is not None:
            await lv.close()
    if args.json:
        print(json.dumps([{"domain": d.name, **r.as_json()} for d, r in results], indent=2))
        return 2 if refused else 0
    for dom, r in results:
        head = "would" if r.dry_run else "did"
        if r.replayed:
            print(f"{dom.name}: finished an interrupted prune first")
        for v in r.verdicts:
            why = ", ".join(v.reasons) if v.keep else "no rule keeps it"
            print(f"{dom.name} {v.id}: {'keep' if v.keep else 'prune'} ({why})")
        for op in r.ops:
            print(f"  {head}: {describe(op)}")
    return 2 if refused else 0


async def _verify(args: argparse.Namespace, config: DaemonConfig, store: Store) -> int:
    from virtbackupd.engine.verify import verify_filesystems, verify_recorded

    uuid = (await the_domain(store, config, args.domain, args.backup)).uuid if args.domain else None
    backups = [
        b
        for b in await store.backups(uuid, status=BackupStatus.COMPLETE)
        if args.backup is None or b.id == args.backup
    ]
    if args.backup is not None and not backups:
        # As restore and mount say it: an id that names nothing is input (2).
        raise UnknownRestorePointError(
            f"no complete backup {args.backup}; `virtbackup list` shows the ids"
        )
    failed = False
    out = []
    async for b, v in verify_recorded(config, store, backups):
        row: dict[str, Any] = {"domain": b.domain_name, **v.as_json()}
        fs: list[Any] = []
        notes: list[str] = []
        if args.filesystems:
            try:
                fs, notes = await verify_filesystems(config, store, b)
            except VirtBackupError as exc:
                fs_error = f"filesystems not checked: {exc}"
                notes = [fs_error]
                row["filesystems_error"] = fs_error
            row["filesystems"] = [
                {"volume": f.label, "fstype": f.fstype, "ok": f.ok, "detail": f.detail} for f in fs
            ]
            row["filesystems_not_read"] = notes
        fs_ok = all(f.ok is not False for f in fs) and "filesystems_error" not in row
        failed = failed or not v.ok or not fs_ok
        out.append(row)
        if args.json:
            continue
        state = "ok" if v.ok and fs_ok else "FAILED"
        print(f"{b.domain_name} {b.id}: {state}")
        for p in (*v.problems, *v.ancestor_problems, *v.notes):
            print(f"  {p}")
        for d in v.disks:
            print(f"  {d.disk}: {'ok' if d.ok else 'FAILED'}")
            for p in d.problems:
                print(f"    {p}")
        for f in fs:
            word = {True: "ok", False: "DAMAGED", None: "-"}[f.ok]
            print(f"  {f.label} ({f.fstype or 'nothing known'}): {word}: {f.detail}")
        for n in notes:
            print(f"  {n}")
    if args.json:
        print(json.dumps(out, indent=2))
    return 1 if failed else 0


async def _list(args: argparse.Namespace, config: DaemonConfig, store: Store) -> int:
    """One domain's backups, or a name's: every domain that has borne it,
    each domain's backups together (oldest domain first), and in text a
    line where the UUID changes."""
    doms = await domains_named(store, config, args.domain) if args.domain else [None]
    groups = []
    for dom in doms:
        found = listing.listing(
            await store.backups(dom.uuid if dom else None),
            show_failed=args.all,
            alive=lambda u: backup_owner_alive(config.runtime_dir, u),
        )
        groups.append((dom, found))
    if args.json:
        print(json.dumps([x.as_json() for _, found in groups for x in found], indent=2))
        return 0
    if len(groups) > 1:
        now, _ = await libvirt_domains_or_why(config.libvirt_uri)
    for dom, found in groups:
        if len(groups) > 1 and dom is not None:
            print(f"--- domain {describe_domains([dom], now)}: {len(found)} backups")
        for x in found:
            print(listing.line(x))
    return 0


async def _status(args: argparse.Namespace, config: DaemonConfig, store: Store) -> int:
    from virtbackupd.cli import recovery
    from virtbackupd.cli import status as status_view
    from virtbackupd.daemon.status_file import probe_status

    daemon, daemon_unknown = probe_status(config.runtime_dir)
    # The daemon's view of libvirt's domains when it runs; else ask libvirt.
    domains, libvirt_error = (
        (None, None) if daemon is not None else await libvirt_domains_or_why(config.libvirt_uri)
    )
    seen: dict[Path, Standing] = {}

    def unrestorable(b: BackupRecord) -> str | None:
        s = standing(Path(b.path), seen) if b.path else None
        return None if s is None or s.restorable else s.why()

    on_disk = policy_set(config, quiet=True)
    notes = status_view.policy_file_notes(
        daemon.policy_files if daemon is not None else None,
        file_digests(policy_files(config.policy_dirs)),
        {str(r.source): r.problem for r in on_disk.rejected},
    )
    rows, unmanaged = status_view.build_rows(
        datetime.now(UTC),
        await store.backups(),
        on_disk,
        domains,
        daemon,
        unrestorable,
        notes,
    )
    reach = status_view.Reach(config.libvirt_uri, libvirt_error, daemon_unknown, notes)
    running = [
        replace(j, interrupted=not backup_owner_alive(config.runtime_dir, j.domain_uuid))
        for j in await store.running_progress()
    ]
    try:
        lv: Libvirt | None = await Libvirt.open(config.libvirt_uri)
    except VirtBackupError:
        lv = None  # live restores are then shown without their progress
    try:
        holds = await recovery.hold_lines(config, lv)
    finally:
        if lv is not None:
            await lv.close()
    text = status_view.render(daemon, rows, unmanaged, running, args.json, reach)
    if args.json:
        data = json.loads(text)
        data["holds"] = holds
        print(json.dumps(data, indent=2))
    else:
        print("\n".join([text, *recovery.render_holds(holds)]))
    return 0


async def _checkpoints(args: argparse.Namespace, store: Store, lv: Libvirt) -> int:
    ref = await lv.domain(args.domain)
    libvirt_cps = {c.name: c.parent for c in await lv.checkpoints(ref)}
    stored = {c.name: c for c in await store.checkpoints(ref.uuid)}
    names = sorted(set(libvirt_cps) | set(stored), key=lambda n: (n not in stored, n))
    rows = []
    for n in names:
        s = stored.get(n)
        rows.append(
            {
                "name": n,
                "libvirt": n in libvirt_cps,
                "libvirt_parent": libvirt_cps.get(n),
                "store": s.status.value if s else None,
                "store_parent": s.parent if s else None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    children: dict[str | None, list[str]] = {}
    for r in rows:
        parent = r["libvirt_parent"] if r["libvirt"] else r["store_parent"]
        children.setdefault(parent if parent in names else None, []).append(str(r["name"]))
    by_name = {r["name"]: r for r in rows}
    print(f"{'checkpoint':50} {'libvirt':8} {'store':8}")

    def walk(parent: str | None, depth: int) -> None:
        for n in children.get(parent, []):
            r = by_name[n]
            print(f"{'  ' * depth + n:50} {_in_libvirt(r):8} {r['store'] or 'unknown':8}")
            walk(n, depth + 1)

    walk(None, 0)
    return 0


def _in_libvirt(row: dict[str, object]) -> str:
    """MISSING only where the store expects libvirt to have it: one removed
    on purpose (pruned, restored over, forgotten) is simply gone."""
    if row["libvirt"]:
        return "yes"
    return "MISSING" if row["store"] in (None, CheckpointStatus.ACTIVE.value) else "no"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
