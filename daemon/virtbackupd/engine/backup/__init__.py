"""Taking a backup of one domain: a pipeline with one driver.

- entry: the way in (lock, leftovers, slot, the images held), then
- driver: the only code that moves the job's state machine; it plans
  (planning), writes the undo log and the record, makes the folders
  (folders), opens an export (online: libvirt's pull job; offline:
  qemu-nbd on the images), copies (copying) and commits (commit), and on
  any failure replays the undo log;
- context: what the job knows, frozen, that every step reads.
"""

from virtbackupd.engine.backup.commit import disk_records
from virtbackupd.engine.backup.context import BackupContext
from virtbackupd.engine.backup.copying import JobProgress, ProgressFn
from virtbackupd.engine.backup.entry import backup_domain
from virtbackupd.engine.backup.folders import make_job_folder

__all__ = [
    "BackupContext",
    "JobProgress",
    "ProgressFn",
    "backup_domain",
    "disk_records",
    "make_job_folder",
]
