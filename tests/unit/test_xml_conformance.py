"""Conformance of the XML model with libvirt's own test corpus and schemas
(shared/libvirt-testdata; see its README for what the harness fills in)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from virtbackupd.core.backup_xml import Backup, align_disks
from virtbackupd.core.checkpoint_xml import (
    Checkpoint,
    CheckpointDisk,
    CheckpointDiskMode,
    parent_of,
)
from virtbackupd.core.domain_xml import DomainDisk
from virtbackupd.errors import XMLError
from xmltools import canonical, corpus, schema_errors

CP_IN = corpus("qemudomaincheckpointxml2xmlin")
CP_OUT = corpus("qemudomaincheckpointxml2xmlout")
BK_IN = corpus("domainbackupxml2xmlin")
BK_OUT = corpus("domainbackupxml2xmlout")


def _internal(path: Path) -> bool:
    """Files holding libvirt-internal status XML (see corpus README)."""
    return path.name.startswith("internal-") or path.name == "backup-pull-internal-invalid.xml"


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.mark.parametrize("path", CP_OUT, ids=_ids(CP_OUT))
def test_checkpoint_out_files_round_trip_byte_for_byte(path: Path) -> None:
    text = path.read_text()
    cp = Checkpoint.from_xml(text, str(path), internal=_internal(path))
    assert cp.to_xml() == text


@pytest.mark.parametrize("path", BK_OUT, ids=_ids(BK_OUT))
def test_backup_out_files_round_trip_byte_for_byte(path: Path) -> None:
    text = path.read_text()
    backup = Backup.from_xml(text, str(path), internal=_internal(path))
    assert backup.to_xml() == text


VALID_CP_IN = [p for p in CP_IN if "invalid" not in p.name]


@pytest.mark.parametrize("path", VALID_CP_IN, ids=_ids(VALID_CP_IN))
def test_checkpoint_in_files_format_to_the_same_document(path: Path) -> None:
    text = path.read_text()
    assert canonical(Checkpoint.from_xml(text, str(path)).to_xml()) == canonical(text)


@pytest.mark.parametrize("path", BK_IN, ids=_ids(BK_IN))
def test_backup_in_files_format_to_the_same_document(path: Path) -> None:
    text = path.read_text()
    backup = Backup.from_xml(text, str(path), internal=_internal(path))
    assert canonical(backup.to_xml()) == canonical(text)


def _fake_domain(backup: Backup) -> list[DomainDisk]:
    """libvirt's genericxml2xmltest: one qcow2 file disk per listed disk,
    plus 'vdextradisk', each with source /fake/NAME.qcow2."""
    names = [d.name for d in backup.disks] + ["vdextradisk"]
    return [DomainDisk(n, "disk", "file", f"/fake/{n}.qcow2", "qcow2") for n in names]


@pytest.mark.parametrize("path", BK_IN, ids=_ids(BK_IN))
def test_align_disks_reproduces_libvirt_output(path: Path) -> None:
    backup = Backup.from_xml(path.read_text(), str(path), internal=_internal(path))
    aligned = align_disks(backup, _fake_domain(backup), "SUFFIX")
    expected = (path.parent.parent / "domainbackupxml2xmlout" / path.name).read_text()
    assert aligned.to_xml() == expected


def _checkpoint_harness(cp: Checkpoint, name: str) -> Checkpoint:
    """What qemudomaincheckpointxml2xmltest.c hard-codes after parsing."""
    size = name == "size.xml"
    created = 1553648510 if size else 1525889631
    cp = replace(cp, creation_time=created, name=cp.name or str(created))
    if name in ("disk-default.xml", "sample.xml", "size.xml"):
        cp = replace(cp, parent="1525111885")
    disks = list(cp.disks) or [CheckpointDisk("vda", CheckpointDiskMode.BITMAP)]
    disks[0] = replace(
        disks[0],
        checkpoint=CheckpointDiskMode.BITMAP,
        bitmap=cp.name,
        size=1048576 if size else None,
    )
    return replace(cp, disks=tuple(disks))


@pytest.mark.parametrize("path", VALID_CP_IN, ids=_ids(VALID_CP_IN))
def test_checkpoint_in_plus_harness_values_gives_out(path: Path) -> None:
    cp = _checkpoint_harness(Checkpoint.from_xml(path.read_text(), str(path)), path.name)
    expected = (path.parent.parent / "qemudomaincheckpointxml2xmlout" / path.name).read_text()
    assert cp.to_xml() == expected


# --- files named *invalid* ------------------------------------------------
# Decision per file (see docs/xml-model.md):


def test_checkpoint_disk_without_name_is_rejected() -> None:
    """disk-invalid.xml: a <disk/> without name= cannot say which disk it
    means; rejected with the element named (libvirt rejects it too)."""
    path = next(p for p in CP_IN if p.name == "disk-invalid.xml")
    with pytest.raises(XMLError, match="disk-invalid.xml: <disk> in <disks> needs a name"):
        Checkpoint.from_xml(path.read_text(), str(path))


def test_checkpoint_name_that_is_not_a_safe_file_name_is_rejected() -> None:
    """name-invalid.xml: '../escape' would escape a directory when used as a
    file name (qcow2 bitmap, backup folder); rejected with the rule."""
    path = next(p for p in CP_IN if p.name == "name-invalid.xml")
    with pytest.raises(XMLError, match=r"checkpoint name '\.\./escape' is not allowed"):
        Checkpoint.from_xml(path.read_text(), str(path))


@pytest.mark.parametrize("name", ["internal-active-invalid.xml", "internal-inactive-invalid.xml"])
def test_internal_checkpoint_status_is_rejected_unless_asked_for(name: str) -> None:
    """<active> is libvirt's status XML: refused in user XML, round-trips
    with internal=True, and libvirt's schema flags it."""
    path = next(p for p in CP_OUT if p.name == name)
    text = path.read_text()
    with pytest.raises(XMLError, match="<active> is internal to libvirt"):
        Checkpoint.from_xml(text, str(path))
    assert Checkpoint.from_xml(text, str(path), internal=True).to_xml() == text
    assert schema_errors("domaincheckpoint", text) is not None


@pytest.mark.parametrize("subdir", ["domainbackupxml2xmlin", "domainbackupxml2xmlout"])
def test_internal_backup_status_is_rejected_unless_asked_for(subdir: str) -> None:
    """backup-pull-internal-invalid.xml: per-disk state= and <privateData>
    are libvirt's status XML: refused in user XML, accepted with
    internal=True, and libvirt's schema flags them."""
    path = next(p for p in corpus(subdir) if p.name == "backup-pull-internal-invalid.xml")
    text = path.read_text()
    with pytest.raises(XMLError, match="internal to libvirt"):
        Backup.from_xml(text, str(path))
    Backup.from_xml(text, str(path), internal=True)
    assert schema_errors("domainbackup", text) is not None


# --- libvirt's installed schemas --------------------------------------------


NEWER_THAN_SCHEMA = {"backup-pull-fd.xml"}  # transport='fd' came after libvirt 9.0


@pytest.mark.parametrize(
    "path", [p for p in CP_OUT + BK_OUT if "invalid" not in p.name], ids=lambda p: p.name
)
def test_corpus_output_validates_against_installed_schema(path: Path) -> None:
    rng = "domaincheckpoint" if "checkpoint" in path.parent.name else "domainbackup"
    errors = schema_errors(rng, path.read_text())
    if path.name in NEWER_THAN_SCHEMA:
        assert errors is not None and "server" in errors
    else:
        assert errors is None, errors


@pytest.mark.parametrize("path", CP_OUT, ids=_ids(CP_OUT))
def test_the_parent_is_read_as_the_model_reads_it(path: Path) -> None:
    """parent_of (what the checkpoint listing uses instead of asking
    libvirt) agrees with the strict model on libvirt's own documents."""
    text = path.read_text()
    assert parent_of(text, str(path)) == Checkpoint.from_xml(text, internal=_internal(path)).parent
