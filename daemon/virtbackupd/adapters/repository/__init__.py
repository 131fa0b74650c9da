"""The backup repository's storage: the local folder backend
(local_folder.py) and its file primitives (files.py). The format's types
and codec are core.repository_format's; they are importable from here too
for callers written before that split (new code imports them from the
core)."""

from virtbackupd.adapters.repository.files import fsync_path
from virtbackupd.adapters.repository.local_folder import (
    ATTEMPTS_DIR,
    HOLDS_DIR,
    IDENTITY,
    KEPT_ATTEMPTS,
    MANIFEST,
    PRUNE_JOURNAL,
    REFUSED_ADVICE,
    UNDO_DIR,
    Repository,
    document_path,
    has_document,
    read_document,
    read_manifest,
    read_pieces,
    remove_backup,
    write_manifest,
)
from virtbackupd.core.repository_format.attempts import MAX_ERROR_CHARS, FailedAttempt
from virtbackupd.core.repository_format.codec import MAX_JSON_BYTES, RepositoryFormatError
from virtbackupd.core.repository_format.documents import (
    CHECKPOINT_XML,
    DOCUMENTS,
    DOMAIN_XML,
    MAX_DOCUMENT_BYTES,
    Document,
    DocumentDigestError,
    Trust,
    document_digests,
)
from virtbackupd.core.repository_format.holds import Hold, HoldKind
from virtbackupd.core.repository_format.manifest import (
    Manifest,
    allowed_backings,
    next_pieces_name,
    with_pieces,
)
from virtbackupd.core.repository_format.names import (
    BACKUP_ID,
    MAX_NAME_CHARS,
    backing_of,
    disk_file,
    escaped,
    is_backup_id,
    is_plain_name,
    is_unsafe_char,
    new_backup_id,
    pieces_file,
)
from virtbackupd.core.repository_format.pieces import parse_pieces
from virtbackupd.core.repository_format.prune_journal import PruneJournal
from virtbackupd.core.repository_format.storage import StepHook, StoredBackup
from virtbackupd.core.repository_format.undo import UndoKind, UndoLog, UndoStep
from virtbackupd.core.repository_format.versions import (
    ATTEMPT_FORMAT,
    BACKUP_FORMAT,
    FORMAT_VERSION,
    HOLD_FORMAT,
    IDENTITY_FORMAT,
    JOURNAL_FORMAT,
    READABLE_VERSIONS,
    UNDO_FORMAT,
)

__all__ = [
    "ATTEMPTS_DIR",
    "ATTEMPT_FORMAT",
    "BACKUP_FORMAT",
    "BACKUP_ID",
    "CHECKPOINT_XML",
    "DOCUMENTS",
    "DOMAIN_XML",
    "FORMAT_VERSION",
    "HOLDS_DIR",
    "HOLD_FORMAT",
    "IDENTITY",
    "IDENTITY_FORMAT",
    "JOURNAL_FORMAT",
    "KEPT_ATTEMPTS",
    "MANIFEST",
    "MAX_DOCUMENT_BYTES",
    "MAX_ERROR_CHARS",
    "MAX_JSON_BYTES",
    "MAX_NAME_CHARS",
    "PRUNE_JOURNAL",
    "READABLE_VERSIONS",
    "REFUSED_ADVICE",
    "UNDO_DIR",
    "UNDO_FORMAT",
    "Document",
    "DocumentDigestError",
    "FailedAttempt",
    "Hold",
    "HoldKind",
    "Manifest",
    "PruneJournal",
    "Repository",
    "RepositoryFormatError",
    "StepHook",
    "StoredBackup",
    "Trust",
    "UndoKind",
    "UndoLog",
    "UndoStep",
    "allowed_backings",
    "backing_of",
    "disk_file",
    "document_digests",
    "document_path",
    "escaped",
    "fsync_path",
    "has_document",
    "is_backup_id",
    "is_plain_name",
    "is_unsafe_char",
    "new_backup_id",
    "next_pieces_name",
    "parse_pieces",
    "pieces_file",
    "read_document",
    "read_manifest",
    "read_pieces",
    "remove_backup",
    "with_pieces",
    "write_manifest",
]
