"""Restoring a backup: standalone images from a backup chain, optionally
defined as a new domain, written back over a shut-off domain's disks or
onto a block device, or run at once from the repository while its disks
move out (live restore).

- chain: reading one disk through its chain of layers, checked against
  the pieces every layer recorded (also `verify`'s reading while a prune
  is pending);
- context: what a restore shares (the backup, its disks, progress), the
  running-domain guard;
- images: standalone images in a folder (`--to`), all or nothing;
- in_place: onto a block device (`--to-device`) or over a domain's own
  disks (`--in-place`);
- define: a new domain from the backup's saved, untrusted definition;
- live, live_settle, live_access, live_check: a live restore's start, the
  rounds that move and check its disks, QEMU's access to the chain, the
  check of a moved disk through QEMU.

The names most callers use are re-exported here (`restore.restore_to_dir`).
"""

from virtbackupd.engine.restore.chain import NOTHING_RESTORED, load_chain
from virtbackupd.engine.restore.context import (
    FORMATS,
    ProgressFn,
    RestoreContext,
    RestoredDisk,
    disks_of,
    of_disk,
    running_user,
)
from virtbackupd.engine.restore.images import check_target_folder, restore_image, restore_to_dir
from virtbackupd.engine.restore.in_place import (
    forget_checkpoints,
    restore_in_place,
    restore_to_device,
)

__all__ = [
    "FORMATS",
    "NOTHING_RESTORED",
    "ProgressFn",
    "RestoreContext",
    "RestoredDisk",
    "check_target_folder",
    "disks_of",
    "forget_checkpoints",
    "load_chain",
    "of_disk",
    "restore_image",
    "restore_in_place",
    "restore_to_device",
    "restore_to_dir",
    "running_user",
]
