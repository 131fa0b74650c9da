"""The repository's format as pure core values (core.repository_format):
each record goes to JSON and back without any file, validation names the
source and the field, and the per-operation compatibility check says which
format versions each operation (read, restore, append, prune) accepts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest

from virtbackupd.core.extents import Kind, Range
from virtbackupd.core.merge_plan import Consolidate, Rebase, Remove
from virtbackupd.core.policy import Level
from virtbackupd.core.records import DiskRecord
from virtbackupd.core.repository_format.attempts import FailedAttempt
from virtbackupd.core.repository_format.codec import (
    Fields,
    FormatError,
    RepositoryFormatError,
    decode_json,
)
from virtbackupd.core.repository_format.holds import Hold, HoldKind
from virtbackupd.core.repository_format.identity import identity_from_json, identity_json
from virtbackupd.core.repository_format.manifest import Manifest
from virtbackupd.core.repository_format.prune_journal import PruneJournal
from virtbackupd.core.repository_format.undo import UndoKind, UndoLog, UndoStep
from virtbackupd.core.repository_format.versions import (
    MANIFEST_VERSIONS,
    Operation,
    check_manifest_version,
)

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
UUID = "0b1cbd0e-1c2f-4a57-9b43-5b1f1e0f7a01"
A, B = "20261207T000000.000Z-000a", "20261207T000000.000Z-000b"
# Only a name for messages: nothing below opens it.
SOURCE = Path("/nonexistent/repository/manifest.json")


def roundtrip(data: Mapping[str, object]) -> object:
    """What a backend hands the codec: the bytes it stored, decoded."""
    return decode_json(SOURCE, json.dumps(data).encode())


def test_every_record_goes_to_json_and_back_without_a_file() -> None:
    disk = DiskRecord(
        "vda", "vda.qcow2", 1 << 20, 5, 6, 7, "ab" * 32, 1 << 16,
        (Range(0, 4096, Kind.DATA),), "vda.pieces", True,
    )  # fmt: skip
    m = Manifest(A, "vm", UUID, Level.FULL, "first", "cp1", None, None, NOW, NOW, (disk,))
    assert Manifest.from_json(roundtrip(m.to_json()), SOURCE) == m

    journal = PruneJournal(
        (Rebase(B, A, A, {"vda": (Range(0, 4096, Kind.DATA),)}), Consolidate(B, A, {}), Remove(A)),
        {A: "cp1"},
    )
    assert PruneJournal.from_json(roundtrip(journal.to_json()), SOURCE) == journal

    domain_dir = Path("/srv/backups") / UUID
    log = UndoLog(
        B, "vm", UUID, Level.INCREMENTAL, NOW,
        (UndoStep(UndoKind.PARTIAL, str(domain_dir / f"{B}.partial")),
         UndoStep(UndoKind.CHECKPOINT, name="cp2")),
        parent=A,
    )  # fmt: skip
    assert UndoLog.from_json(roundtrip(log.to_json()), SOURCE, domain_dir) == log

    attempt = FailedAttempt(B, "vm", UUID, Level.FULL, NOW, NOW, "it broke", A)
    again = FailedAttempt.from_json(
        roundtrip(attempt.to_json()), SOURCE, file_id=B, folder_uuid=UUID
    )
    assert again == attempt

    hold = Hold("h1", HoldKind.MOUNT, UUID, A, NOW, "mounted at /mnt", disks=("vda",))
    assert Hold.from_json(roundtrip(hold.to_json()), SOURCE, Path("/srv/backups")) == hold

    assert identity_from_json(roundtrip(identity_json(UUID)), SOURCE) == UUID


def test_where_a_record_is_stored_is_checked_against_what_it_says() -> None:
    """The storage passes what it knows (the id an attempt is stored
    under, the domain folder an undo log's partial folder must be in)."""
    attempt = FailedAttempt(B, "vm", UUID, Level.FULL, NOW, NOW, "x").to_json()
    with pytest.raises(RepositoryFormatError, match=f"field backup_id: '{B}' is not the file"):
        FailedAttempt.from_json(roundtrip(attempt), SOURCE, file_id=A, folder_uuid=UUID)
    elsewhere = Path("/elsewhere")
    log = UndoLog(
        B, "vm", UUID, Level.FULL, NOW, (UndoStep(UndoKind.PARTIAL, f"{elsewhere}/{B}.partial"),)
    )
    with pytest.raises(RepositoryFormatError, match=r"field steps\[0\]\.path"):
        UndoLog.from_json(roundtrip(log.to_json()), SOURCE, Path("/srv/backups") / UUID)
    UndoLog.from_json(roundtrip(log.to_json()), SOURCE, elsewhere)


def test_a_codec_error_is_the_callers_kind_and_names_source_and_field() -> None:
    class OtherError(FormatError):
        pass

    f = Fields({"outer": {"n": "x"}}, Path("/run/x.json"), error=OtherError)
    with pytest.raises(OtherError, match=r"^/run/x\.json: field outer\.n: 'x' is not a int$"):
        f.sub("outer").integer("n")
    with pytest.raises(RepositoryFormatError, match="not valid JSON"):
        decode_json(SOURCE, b"{")


@pytest.mark.parametrize("operation", list(Operation))
@pytest.mark.parametrize("version", [1, 2])
def test_every_operation_takes_both_formats_written_so_far(
    operation: Operation, version: int
) -> None:
    check_manifest_version(SOURCE, version, operation)


@pytest.mark.parametrize(
    ("version", "operation", "table", "message"),
    [
        # A newer format: reading it says which is the newest this one reads.
        (3, Operation.READ, MANIFEST_VERSIONS,
         "written in repository format 3, newer than this virtbackupd reads (up to 2); "
         "upgrade virtbackupd to read it"),
        (0, Operation.READ, MANIFEST_VERSIONS, "unknown repository format 0"),
        (3, Operation.RESTORE, MANIFEST_VERSIONS,
         "written in repository format 3; this virtbackupd can restore from backups of format "
         "1, 2 only; upgrade virtbackupd to do it"),
        # A format still read, but no longer pruned or appended to (as a
        # later version may decide): the operation names what it takes.
        (1, Operation.PRUNE, {**MANIFEST_VERSIONS, Operation.PRUNE: frozenset({2})},
         "written in repository format 1; this virtbackupd can prune backups of format 2 only"),
        (1, Operation.APPEND, {**MANIFEST_VERSIONS, Operation.APPEND: frozenset({2})},
         "written in repository format 1; this virtbackupd can take incrementals on backups "
         "of format 2 only"),
    ],
)  # fmt: skip
def test_an_operation_refuses_a_version_it_does_not_take_by_file_and_version(
    version: int, operation: Operation, table: Mapping[Operation, frozenset[int]], message: str
) -> None:
    with pytest.raises(RepositoryFormatError) as caught:
        check_manifest_version(SOURCE, version, operation, table)
    assert str(caught.value) == f"{SOURCE}: {message}"
    assert "\n" not in str(caught.value)
