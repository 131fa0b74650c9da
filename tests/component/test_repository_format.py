"""A real repository read the way docs/repository-format.md says, without
virtbackupd's reader: every JSON file against the schemas in docs/schemas,
every .pieces file parsed from the documented record layout and checked
against the image's bytes read with plain qemu-img, every backing file
where the document puts it."""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xxhash

from testbed.repo_builder import BuiltDomain, MiB
from testbed.tools import qemu_img_info, run
from virtbackupd.adapters.repository import FailedAttempt, Hold, HoldKind, UndoKind, UndoLog
from virtbackupd.adapters.store import Store
from virtbackupd.core.policy import Level, Retention
from virtbackupd.engine.recovery.undo import Undo
from virtbackupd.engine.upkeep.prune import prune_domain

DOCS = Path(__file__).resolve().parents[2] / "docs"


def schema(name: str) -> jsonschema.protocols.Validator:
    data = json.loads((DOCS / "schemas" / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(data)
    cls.check_schema(data)
    validator: jsonschema.protocols.Validator = cls(data, format_checker=cls.FORMAT_CHECKER)
    return validator


def records(blob: bytes) -> list[tuple[int, int, str, bytes]]:
    """The documented layout: >QQ, a kind byte, 16 hash bytes for D."""
    out, pos = [], 0
    while pos < len(blob):
        offset, length = struct.unpack_from(">QQ", blob, pos)
        kind = chr(blob[pos + 16])
        pos += 17
        content = b""
        if kind == "D":
            content, pos = blob[pos : pos + 16], pos + 16
        out.append((offset, length, kind, content))
    return out


class Stop(BaseException):
    pass


@pytest.fixture
async def built(tmp_path: Path) -> BuiltDomain:
    """Four backups, the oldest two merged away by a prune, one failed
    attempt, one undo log of a backup "running", one prune left
    interrupted after its journal was written."""
    b = BuiltDomain(tmp_path, {"vda": 12 * MiB, "vdb": 6 * MiB})
    async with Store.open(b.state_db) as store:
        for i in range(4):
            b.write("vda", (i % 3) * 4 * MiB, MiB + i * 64 * 1024, 0x40 + i)
            if i % 2:
                b.zero("vda", (i % 3) * 4 * MiB, 128 * 1024)
            b.write("vdb", i * MiB, 512 * 1024, 0x50 + i)
            await b.backup(store)
        domain_dir = b.repo.domain_dir(b.uuid)
        await prune_domain(store, domain_dir, Retention(keep_last=3), None, b.runtime)
        now = datetime.now(UTC)
        undo = Undo(b.repo, UndoLog("x-running", b.name, b.uuid, Level.FULL, now))
        undo.note(UndoKind.PARTIAL, b.repo.partial_dir(b.uuid, "x-running"))
        undo.note(UndoKind.CHECKPOINT, name="virtbackupd-x-running")

        def stop(label: str) -> None:
            if label == "journal written":
                raise Stop

        with pytest.raises(Stop):
            await prune_domain(
                store, domain_dir, Retention(keep_last=2), None, b.runtime, step=stop
            )
    b.repo.record_attempt(
        FailedAttempt(
            "20261207T000000.000Z-fa11", b.name, b.uuid, Level.INCREMENTAL, now, now, "it broke"
        )
    )
    newest = b.repo.backups(b.uuid)[-1].manifest.id
    b.repo.add_hold(
        Hold(
            "live-1",
            HoldKind.LIVE_RESTORE,
            b.uuid,
            newest,
            now,
            "live restore of x into /d",
            new_domain="0e6f1a2b-0000-4000-8000-000000000001",
            disks=("vda",),
            directory="/d",
            rate=1 << 20,
            opened=(str(b.root),),  # a hold opens only its repository's folders
            checkpoint="live-restore-guest-writes",
            verified=("vda",),
            trouble="the new domain x crashed during the move",
            failed_run=7,
        )
    )
    b.repo.add_hold(
        Hold(
            "mount-1",
            HoldKind.MOUNT,
            b.uuid,
            newest,
            now,
            "mounted on /m",
            disks=("vda",),
            directory="/m",
            helper_pid=1234,
            state_dir="/run/virtbackupd/mounts/mount-1",
            devices=("/dev/loop7",),
        )
    )
    return b


def test_a_repository_reads_as_documented(built: BuiltDomain, tmp_path: Path) -> None:
    domain_dir = built.repo.domain_dir(built.uuid)
    manifests: dict[str, Any] = {}
    for path in sorted(domain_dir.glob("*/manifest.json")):
        data = json.loads(path.read_text())
        schema("manifest").validate(data)
        assert data["id"] == path.parent.name
        manifests[data["id"]] = data
    assert len(manifests) == 3  # one of four merged away
    assert any(m["absorbed"] for m in manifests.values())
    journal = json.loads((domain_dir / ".prune-journal.json").read_text())
    schema("prune-journal").validate(journal)
    assert [op["op"] for op in journal["ops"]][-1] == "remove"
    for path in (domain_dir / ".undo").glob("*.json"):
        schema("undo").validate(json.loads(path.read_text()))
    attempts = list((domain_dir / ".attempts").glob("*.json"))
    assert attempts
    for path in attempts:
        schema("attempt").validate(json.loads(path.read_text()))
    holds = sorted((domain_dir / ".holds").glob("*.json"))
    assert [p.name for p in holds] == ["live-1.json", "mount-1.json"]
    for path in holds:
        schema("hold").validate(json.loads(path.read_text()))
    assert {h.id: h for h in built.repo.holds(built.uuid)}["mount-1"].helper_pid == 1234
    live = {h.id: h for h in built.repo.holds(built.uuid)}["live-1"]
    assert (live.verified, live.failed_run) == (("vda",), 7)  # read back as written

    for backup_id, m in manifests.items():
        folder = domain_dir / backup_id
        # Each text document is the one its manifest's digest names.
        assert m["documents"], "the test bed's backups record their documents' digests"
        for name, digest in m["documents"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
        for d in m["disks"]:
            image = folder / d["file"]
            info = qemu_img_info(image)
            assert info["format"] == "qcow2" and info["virtual-size"] == d["virtual_size"]
            # Every disk says how its image is stored (what merged into a
            # backup included).
            assert d["standalone"] is (m["parent"] is None), (backup_id, d)
            if d["standalone"]:
                assert "backing-filename" not in info
            else:
                assert info["backing-filename"] == f"../{m['parent']}/{d['file']}"
            blob = (folder / d["pieces"]).read_bytes()
            assert hashlib.sha256(blob).hexdigest() == d["digest"]
            # The view, read with plain qemu-img (the backing chain included).
            raw = tmp_path / f"{backup_id}-{d['name']}.raw"
            run("qemu-img", "convert", "-O", "raw", image, raw)
            view = raw.read_bytes()
            pieces = records(blob)
            assert [p[0] for p in pieces] == sorted(p[0] for p in pieces)
            covered = []
            for offset, length, kind, content in pieces:
                part = view[offset : offset + length]
                if kind == "D":
                    assert offset // d["grid"] == (offset + length - 1) // d["grid"]
                    assert xxhash.xxh3_128(part).digest() == content
                else:
                    assert part == bytes(length)
                covered.append((offset, length, "data" if kind == "D" else "zero"))
            # The pieces are the ranges, cut at grid lines.
            merged: list[list[Any]] = []
            for offset, length, kind in covered:
                if merged and merged[-1][2] == kind and sum(merged[-1][:2]) == offset:
                    merged[-1][1] += length
                else:
                    merged.append([offset, length, kind])
            assert merged == d["ranges"]
