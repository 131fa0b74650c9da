"""A backup's text documents (its domain XML and checkpoint XML): their
names in the manifest, their digests, and whether one read back is the one
written."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from virtbackupd.core.repository_format.codec import RepositoryFormatError
from virtbackupd.errors import InputError

# A backup's documents by their names in the manifest's ``documents`` (the
# storage backend decides where it keeps them; the local folder backend
# uses the name as the file's).
DOMAIN_XML = "domain.xml"  # the domain's (inactive) XML at backup time
CHECKPOINT_XML = "checkpoint.xml"  # libvirt's checkpoint XML, for redefinition
DOCUMENTS = (DOMAIN_XML, CHECKPOINT_XML)

#: A domain or checkpoint XML of a few hundred devices is a few hundred KiB.
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024


class DocumentDigestError(RepositoryFormatError, InputError):
    """A backup's domain.xml or checkpoint.xml is not what was written at
    backup time: it was edited (or damaged) since."""


def document_digests(texts: Mapping[str, str]) -> dict[str, str]:
    """The manifest's ``documents``: SHA-256 of each text file as written."""
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in texts.items()}


class Trust(StrEnum):
    VERIFIED = "verified"  # matches the digest in its manifest
    UNRECORDED = "unrecorded"  # the manifest predates digests: nothing to check
    EDITED = "edited"  # does not match; read only because the caller accepts that


@dataclass(frozen=True)
class Document:
    """A text document of a backup, read for use."""

    path: Path
    text: str
    trust: Trust


def judge_document(
    path: Path,
    data: bytes,
    recorded: Mapping[str, str],
    name: str,
    manifest_name: str,
    *,
    accept_edited: bool = False,
) -> Trust:
    """How far `data` (the document `name` read from `path`) is the one
    written: one that does not match the digest `recorded` in the manifest
    raises DocumentDigestError unless `accept_edited`."""
    digest = recorded.get(name)
    if digest is None:
        return Trust.UNRECORDED
    if hashlib.sha256(data).hexdigest() == digest:
        return Trust.VERIFIED
    if accept_edited:
        return Trust.EDITED
    raise DocumentDigestError(
        path,
        f"does not match the SHA-256 recorded for it in {manifest_name} "
        "(edited or damaged since the backup)",
    )
