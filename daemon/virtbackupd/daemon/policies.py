"""The policies in force: read from the policy folders at start and at
every reload (a broken set at reload keeps the previous one), and which
policy governs a domain."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import structlog

from virtbackupd.config.daemon import DaemonConfig
from virtbackupd.config.policy import (
    LoadedPolicies,
    file_digests,
    load_policies,
    missing_dirs,
    policy_files,
)
from virtbackupd.core.policy import Policy, policy_for
from virtbackupd.daemon.status_file import EnforcedFile
from virtbackupd.errors import ConfigError

log = structlog.get_logger("virtbackupd.daemon")


class PolicyBook:
    def __init__(self) -> None:
        self.policies: list[Policy] = []
        self.rejected: LoadedPolicies | None = None  # the files that did not load, when adopted
        self.enforced: dict[str, EnforcedFile] = {}  # what the adopted policies were read from
        self.last_rejected: list[str] = []  # files (and folders) the last reading refused

    def load(self, config: DaemonConfig, at_start: bool) -> bool:
        """Read the policy folders. At start a missing folder is an error
        (the daemon would silently back up nothing); at reload a broken
        set keeps the previous policies. Returns whether what was read is
        now in force."""
        missing = missing_dirs(config.policy_dirs)
        if missing and at_start:
            raise ConfigError(
                f"{config.source}: policy_dirs: {', '.join(map(str, missing))} does not "
                "exist; create it (and put policy files in it) or fix the path"
            )
        for d in missing:
            log.error("policy folder missing", folder=str(d))
        files = policy_files(config.policy_dirs)
        loaded = load_policies(files)
        policies, errors = loaded.policies, loaded.errors
        for e in errors:
            log.error("policy file rejected", error=str(e))
        self.last_rejected = [str(r.source) for r in loaded.rejected] + [str(d) for d in missing]
        if (errors or missing) and self.policies:
            return False
        self.rejected = loaded
        self.enforced = enforced_files(files, loaded)
        if not files:
            log.warning(
                "no policy files: no domain is backed up",
                folders=[str(d) for d in config.policy_dirs],
            )
        self.policies = policies
        return True

    def in_force(self, governed: Sequence[str]) -> dict[str, list[str]]:
        """What the start and every reload say they loaded: the policy
        files in force, the domains they govern, the files refused."""
        return {
            "files": sorted(str(p.source) for p in self.policies),
            "governed": sorted(governed),
            "rejected": self.last_rejected,
        }

    def for_domain(self, name: str, uuid: str) -> Policy | None:
        """The policy that governs the domain now, or None (said why, when
        a broken file or two matching policies are the reason)."""
        refusal = self.rejected.refusal(name, uuid) if self.rejected is not None else None
        if refusal is not None:
            # A domain no loaded policy governs is not backed up anyway:
            # the "policy file rejected" line said why; one governed by a
            # loaded policy and named by a broken file is skipped, loudly.
            if any(p.matches(name, uuid) for p in self.policies):
                log.error("domain skipped", domain=name, error=refusal)
            return None
        try:
            return policy_for(name, uuid, self.policies)
        except ConfigError as exc:
            log.error("domain skipped", domain=name, error=str(exc))
            return None


def enforced_files(files: Sequence[Path], loaded: LoadedPolicies) -> dict[str, EnforcedFile]:
    """What each policy file of an adopted set held (its SHA-256, read
    again right after loading: an edit in between shows as a change, the
    safe side) and whether it loaded."""
    bad = {str(r.source) for r in loaded.rejected}
    return {f: EnforcedFile(digest, f not in bad) for f, digest in file_digests(files).items()}
