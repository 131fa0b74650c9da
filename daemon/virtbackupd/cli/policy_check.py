"""`virtbackup policy check`: the policy files, and the policies against
the domains libvirt has."""

from __future__ import annotations

import argparse
import json
import sys

from virtbackupd.cli.domains import libvirt_domains
from virtbackupd.config.daemon import DaemonConfig, config_path, load_config
from virtbackupd.config.policy import load_policies, missing_dirs, policy_files
from virtbackupd.core.policy import coverage
from virtbackupd.errors import ConfigError


async def policy_check(args: argparse.Namespace) -> int:
    """Errors: a file that does not load, a domain two policies govern.
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
