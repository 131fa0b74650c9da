"""`virtbackup policy check`: the policy files, and the policies against
the domains libvirt has. Run before any config is read: it reads the
config itself, and checks the files it is given without one."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from virtbackupd.adapters.libvirt_conn import Libvirt
from virtbackupd.cli.commands import Command, Needs, Session
from virtbackupd.cli.domains import libvirt_domains
from virtbackupd.config.daemon import DaemonConfig, config_path, load_config
from virtbackupd.config.policy import load_policies, missing_dirs, policy_files
from virtbackupd.core.domain_xml import parse_domain
from virtbackupd.core.plan import nothing_to_back_up
from virtbackupd.core.policy import Policy, coverage
from virtbackupd.errors import ConfigError, DomainNotFoundError, VirtBackupError


def add_arguments(p: argparse.ArgumentParser) -> None:
    polsub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    chk = polsub.add_parser(
        "check", help="validate policy files (exit 0 if all are valid, 2 if not)"
    )
    chk.add_argument("files", nargs="*", type=Path, help="default: the config's policy_dirs")


async def run(args: argparse.Namespace, _: Session) -> int:
    """`policy check`, its only subcommand (argparse requires one)."""
    return await policy_check(args)


async def policy_check(args: argparse.Namespace) -> int:
    """Errors: a file that does not load, a domain two policies govern, a
    governed domain none of whose disks its policy would back up (each of
    its backups would fail).
    Warnings: a pattern that matches no domain, a missing or empty policy
    folder, libvirt unreachable (then only the files are checked)."""
    warnings: list[str] = []
    files = list(args.files)
    config: DaemonConfig | None = None
    try:
        config = load_config(config_path(args.config))
    except ConfigError:
        if not files:
            raise  # no file named and no config: nothing to check
    if not files:
        assert config is not None
        for d in missing_dirs(config.policy_dirs):
            warnings.append(
                f"{d}: the policy folder does not exist (the daemon refuses to start without it)"
            )
        files = policy_files(config.policy_dirs)
        if not files:
            dirs = ", ".join(str(d) for d in config.policy_dirs)
            warnings.append(f"no policy files (*.yaml) in {dirs}: no domain would be backed up")
    loaded = load_policies(files)
    policies = loaded.policies
    errors = [str(e) for e in loaded.errors]
    uri = config.libvirt_uri if config is not None else "qemu:///system"
    domains = await libvirt_domains(uri)
    if domains is None:
        warnings.append(f"libvirt at {uri} is unreachable: policies not checked against domains")
    else:
        cov = coverage(policies, domains)
        errors += cov.errors
        warnings += cov.warnings
        errors += await _nothing_backed_up(uri, cov.governed, {u: n for n, u in domains})
    for e in errors:
        print(f"virtbackup: error: {e}", file=sys.stderr)
    for w in warnings:
        print(f"virtbackup: warning: {w}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "valid": [str(p.source) for p in policies],
                    "errors": errors,
                    "warnings": warnings,
                }
            )
        )
    else:
        for p in policies:
            print(f"ok: {p.source}")
    return 2 if errors else 0


async def _nothing_backed_up(
    uri: str, governed: Mapping[str, Policy], names: Mapping[str, str]
) -> list[str]:
    """A governed domain whose every disk its policy skips: an error, not
    a warning, because every scheduled backup of it would fail."""
    out = []
    try:
        async with await Libvirt.open(uri) as lv:
            for uuid, policy in governed.items():
                try:
                    ref = await lv.domain(uuid)
                    xml = await lv.xml(ref, inactive=True)
                except DomainNotFoundError:
                    continue  # undefined since the listing
                why = nothing_to_back_up(
                    parse_domain(xml, f"domain XML of {ref.name}").disks, policy
                )
                if why is not None:
                    out.append(
                        f"{policy.source}: domain '{names.get(uuid, uuid)}' would have nothing "
                        f"backed up: {why}; back up a disk of it (disks.raw: full, include, "
                        "exclude) or leave it out (exclude_domains)"
                    )
    except VirtBackupError as exc:
        out.append(f"libvirt at {uri}: cannot read the governed domains' disks: {exc}")
    return out


COMMAND = Command("policy", "policy files", add_arguments, run, needs=Needs.NOTHING)
