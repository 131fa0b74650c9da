"""The project's error hierarchy.

Every error an operator can see derives from :class:`VirtBackupError`. Adapters
translate foreign exceptions into these (``raise ... from exc``); only the CLI
and the daemon turn them into exit codes and log lines.
"""

from __future__ import annotations


class VirtBackupError(Exception):
    """Root of every error virtbackupd raises on purpose."""


class ConfigError(VirtBackupError):
    """A configuration or policy file is invalid."""


class XMLError(VirtBackupError):
    """A libvirt XML document is malformed or does not fit the model.

    ``document`` names what was being read (a file, or "checkpoint XML of
    domain web01"), so the message says where to look.
    """

    def __init__(self, document: str, problem: str) -> None:
        super().__init__(f"{document}: {problem}")
        self.document = document
        self.problem = problem


class PlanError(VirtBackupError):
    """A backup cannot be planned as asked (no eligible disk, unknown disk, ...)."""
