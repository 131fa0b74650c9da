"""virtbackupd: backups of libvirt/QEMU domains through checkpoints and NBD.

Layout:
    core/      pure values and functions (XML model, plans, policies, retention,
               the repository format)
    config/    the daemon config and policy files, read into core values
    adapters/  one module per external system (libvirt, NBD, qemu tools, SQLite,
               the repository folder, ...)
    engine/    the jobs: backup, restore, prune, verify, recovery, the copy engine
    cli/       the operator's `virtbackup` command
    daemon/    the `virtbackupd` service
"""

__version__ = "0.1.0"

# Every logger of the package has `notice` (syslog's level 5) whether or not
# logs.configure() ran (tests run the engine in-process): logs sets it up.
from virtbackupd import logs as _logs  # noqa: F401
