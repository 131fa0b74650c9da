"""Which policy files `status` flags against what the daemon enforces
(cli.status.policy_file_notes), and that a status without libvirt or the
daemon never calls a domain "no longer defined" (cli.status.build_rows)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from virtbackupd.cli.status import build_rows, policy_file_notes
from virtbackupd.config.policy import LoadedPolicies
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.daemon.status_file import DaemonStatus, DomainState, EnforcedFile

OK = EnforcedFile("aa", loaded=True)
BAD_AT_START = EnforcedFile("bb", loaded=False)


@pytest.mark.parametrize(
    ("enforced", "on_disk", "rejected", "expected"),
    [
        # no daemon: only rejected files are news
        (None, {"p": "aa"}, {}, {}),
        (None, {"p": "aa"}, {"p": "p:2: bad"}, {"p": "rejected: p:2: bad"}),
        # the daemon's own files, unchanged
        ({"p": OK}, {"p": "aa"}, {}, {}),
        # edited, not reloaded
        ({"p": OK}, {"p": "cc"}, {}, {"p": "changed on disk"}),
        # broken on disk; the daemon keeps the version it loaded
        ({"p": OK}, {"p": "cc"}, {"p": "p:2: bad"}, {"p": "enforces the version it loaded"}),
        # rejected when the daemon started too: its domains are skipped
        ({"p": BAD_AT_START}, {"p": "bb"}, {"p": "p:2: bad"}, {"p": "skips the domains"}),
        # removed, or new since the daemon loaded its policies
        ({"p": OK}, {}, {}, {"p": "removed from disk"}),
        ({}, {"q": "dd"}, {}, {"q": "new on disk"}),
        ({}, {"q": "dd"}, {"q": "q:1: bad"}, {"q": "rejected on disk (q:1: bad)"}),
    ],
)
def test_policy_file_notes(
    enforced: dict[str, EnforcedFile] | None,
    on_disk: dict[str, str],
    rejected: dict[str, str],
    expected: dict[str, str],
) -> None:
    notes = policy_file_notes(enforced, on_disk, rejected)
    assert set(notes) == set(expected)
    for f, words in expected.items():
        assert words in notes[f]


NOW = datetime(2026, 1, 2, tzinfo=UTC)
UUID = "11111111-2222-3333-4444-555555555555"
BACKUP = BackupRecord("b1", UUID, "vm", Level.FULL, BackupStatus.COMPLETE, "cp1", None, NOW, NOW)
NOTHING = LoadedPolicies([], [], [])


def test_without_libvirt_or_daemon_being_defined_is_not_known() -> None:
    rows, _ = build_rows(NOW, [BACKUP], NOTHING, None, None)
    assert rows[0].defined is None
    rows, _ = build_rows(NOW, [BACKUP], NOTHING, [], None)
    assert rows[0].defined is False  # libvirt answered and has no such domain


def test_a_running_daemon_gives_the_policy_it_enforces() -> None:
    daemon = DaemonStatus(
        1, "t", "qemu:///system", True, {UUID: DomainState("vm", "/p.yaml", {"full": "x"})}
    )
    notes = {"/p.yaml": "rejected on disk: /p.yaml:2: bad; the daemon enforces ..."}
    rows, _ = build_rows(NOW, [BACKUP], NOTHING, None, daemon, file_notes=notes)
    assert rows[0].policy == "/p.yaml"
    assert rows[0].next_runs == {"full": "x"}
    assert rows[0].policy_on_disk == notes["/p.yaml"]
