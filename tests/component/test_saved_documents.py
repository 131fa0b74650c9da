"""A backup folder's domain.xml and checkpoint.xml are checked against the
SHA-256 its manifest recorded before they are used: an edited one is
refused (domain.xml) or not trusted (checkpoint.xml); a manifest from
before digests still reads, its documents marked unverified."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from virtbackupd.adapters.repository import (
    CHECKPOINT_XML,
    DOMAIN_XML,
    MANIFEST,
    DocumentDigestError,
    Manifest,
    RepositoryFormatError,
    StoredBackup,
    Trust,
    document_digests,
    read_document,
    read_manifest,
)
from virtbackupd.core.policy import Level
from virtbackupd.engine.restore.define import saved_definition
from virtbackupd.engine.upkeep.catalogue import checkpoint_record
from virtbackupd.errors import InputError

DOMAIN = "<domain type='qemu'><name>vm</name></domain>\n"
CHECKPOINT = (
    "<domaincheckpoint><name>cp1</name><creationTime>1</creationTime>"
    "<disks><disk name='vda' checkpoint='bitmap' bitmap='cp1'/></disks></domaincheckpoint>\n"
)


UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


def backup_folder(tmp: Path, *, digests: bool = True) -> Path:
    folder = tmp / UUID / "20261207T120000.000Z-abcd"
    folder.mkdir(parents=True)
    texts = {DOMAIN_XML: DOMAIN, CHECKPOINT_XML: CHECKPOINT}
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    m = Manifest(
        id=folder.name,
        domain_name="vm",
        domain_uuid=UUID,
        level=Level.FULL,
        reason="",
        checkpoint="cp1",
        parent=None,
        parent_checkpoint=None,
        started=now,
        finished=now,
        disks=(),
        documents=document_digests(texts) if digests else {},
    )
    data = m.to_json()
    if not digests:
        del data["documents"]  # as a manifest written before digests
    (folder / MANIFEST).write_text(json.dumps(data))
    for name, text in texts.items():
        (folder / name).write_text(text)
    return folder


def test_digests_are_recorded_and_read_back(tmp_path: Path) -> None:
    folder = backup_folder(tmp_path)
    m = read_manifest(folder)
    assert set(m.documents) == {DOMAIN_XML, CHECKPOINT_XML}
    doc = read_document(folder, m, DOMAIN_XML)
    assert (doc.text, doc.trust) == (DOMAIN, Trust.VERIFIED)
    assert saved_definition(folder).warnings == ()


def test_an_edited_domain_xml_is_refused_naming_the_file_unless_accepted(tmp_path: Path) -> None:
    folder = backup_folder(tmp_path)
    (folder / DOMAIN_XML).write_text(DOMAIN.replace("vm", "evil"))
    with pytest.raises(DocumentDigestError, match="domain.xml: does not match the SHA-256") as e:
        saved_definition(folder)
    assert isinstance(e.value, InputError)  # exit 2
    assert "--accept-edited-definition" in str(e.value)
    accepted = saved_definition(folder, accept_edited=True)
    assert "evil" in accepted.xml
    assert "edited since the backup" in accepted.warnings[0]


def test_a_manifest_from_before_digests_is_read_and_its_documents_used_unverified(
    tmp_path: Path,
) -> None:
    folder = backup_folder(tmp_path, digests=False)
    m = read_manifest(folder)
    assert m.documents == {}
    assert read_document(folder, m, DOMAIN_XML).trust is Trust.UNRECORDED
    saved = saved_definition(folder)
    assert saved.xml == DOMAIN
    assert "no digest" in saved.warnings[0]
    assert checkpoint_record(StoredBackup(folder, m)) is not None


def test_an_edited_checkpoint_xml_is_not_trusted_for_redefinition(tmp_path: Path) -> None:
    folder = backup_folder(tmp_path)
    m = read_manifest(folder)
    record = checkpoint_record(StoredBackup(folder, m))
    assert record is not None and record.xml == CHECKPOINT
    (folder / CHECKPOINT_XML).write_text(CHECKPOINT.replace("<creationTime>1", "<creationTime>2"))
    # reindex and crash recovery record the backup without it (record_committed).
    with pytest.raises(DocumentDigestError, match="checkpoint.xml: does not match"):
        checkpoint_record(StoredBackup(folder, m))


@pytest.mark.parametrize(
    ("documents", "problem"),
    [
        ({"../etc/shadow": "0" * 64}, r"field documents\.\.\./etc/shadow: not one of"),
        ({"domain.xml": "abc"}, r"field documents\.domain\.xml: 'abc' is not a SHA-256"),
        ({"domain.xml": 5}, r"field documents\.domain\.xml: 5 is not a str"),
        ([], "field documents: .* is not a dict"),
    ],
)
def test_a_bad_documents_field_is_refused_naming_it(
    tmp_path: Path, documents: object, problem: str
) -> None:
    folder = backup_folder(tmp_path)
    data = json.loads((folder / MANIFEST).read_text())
    data["documents"] = documents
    (folder / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(RepositoryFormatError, match=problem):
        read_manifest(folder)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "huge"])
def test_a_document_that_is_not_a_small_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    folder = backup_folder(tmp_path, digests=False)
    path = folder / DOMAIN_XML
    path.unlink()
    if kind == "symlink":
        path.symlink_to("/etc/hostname")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        with path.open("wb") as f:
            f.truncate(9 * 1024 * 1024)
    with pytest.raises(RepositoryFormatError, match="domain.xml: "):
        saved_definition(folder)
