"""The engine: the jobs on a domain's backups, built from core's decisions and
the adapters' I/O (docs/architecture.md has the picture).

    backup/    the backup job: one driver, its exports, planning, commit
    restore/   restore to images or devices, restore --define, live restore
    datapath/  the copy engine and reading an image's content back
    recovery/  the undo log's replay and the clean-up after a killed process
    upkeep/    prune, verify, and the catalogue made to say what the folders say

What every job shares sits here: one job per domain at a time (domain_job,
locks), scratch space, the VM-start handshake (vm_starts), and the guest's
file systems seen from the host (guest_view: mount, verify --filesystems).
"""
