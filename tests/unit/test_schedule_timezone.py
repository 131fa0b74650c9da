"""Schedules take a time zone (issue 24, item 8): `schedule.timezone` in
the daemon config, by default the host's local time as cron's; a name the
zone database does not know is an error naming the file and the field;
the scheduler, the catch-up at start, the full/incremental merge and
`status` all read the expressions in that zone."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from virtbackupd.adapters.scheduler import Schedules
from virtbackupd.cli import status as status_view
from virtbackupd.config.daemon import load_config, local_zone
from virtbackupd.core.policy import Level
from virtbackupd.core.records import BackupRecord, BackupStatus
from virtbackupd.daemon.decisions import missed_request, scheduled_request
from virtbackupd.daemon.status_file import DaemonStatus, DomainState
from virtbackupd.errors import ConfigError

BERLIN = ZoneInfo("Europe/Berlin")


def u(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


def _config(tmp: Path, text: str) -> Path:
    path = tmp / "vb.yaml"
    path.write_text(f"state_dir: {tmp}\n{text}")
    return path


@pytest.mark.parametrize(
    ("text", "zone"),
    [
        ("schedule:\n  timezone: Europe/Berlin\n", BERLIN),
        ("schedule: {timezone: UTC}\n", ZoneInfo("UTC")),
        ("schedule: {timezone: America/New_York}\n", ZoneInfo("America/New_York")),
    ],
)
def test_a_named_zone(tmp_path: Path, text: str, zone: ZoneInfo) -> None:
    assert load_config(_config(tmp_path, text)).schedule_timezone == zone


def test_the_default_is_the_hosts_local_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    assert local_zone() == ZoneInfo("Asia/Tokyo")
    assert load_config(_config(tmp_path, "")).schedule_timezone == ZoneInfo("Asia/Tokyo")
    local = load_config(_config(tmp_path, "schedule: {timezone: local}\n"))
    assert local.schedule_timezone == ZoneInfo("Asia/Tokyo")
    monkeypatch.delenv("TZ")
    assert load_config(_config(tmp_path, "")).schedule_timezone == local_zone()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("Mars/Olympus_Mons", "'Mars/Olympus_Mons'"),
        ("../../etc/passwd", "'../../etc/passwd'"),
        ("Europe", "'Europe'"),  # a folder of the database, not a zone
        ("'+02:00'", "'+02:00'"),
        ("5", "5"),
        ("''", "non-empty string"),
    ],
)
def test_a_bad_zone_names_the_file_and_the_field(tmp_path: Path, value: str, words: str) -> None:
    path = _config(tmp_path, f"schedule:\n  timezone: {value}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    text = str(exc.value)
    assert text.startswith(f"{path}:3: schedule.timezone: "), text
    assert words in text, text
    assert "\n" not in text


def test_the_scheduler_reads_its_expressions_in_its_zone() -> None:
    schedules = Schedules(lambda uuid, level: None, zone=BERLIN)
    schedules.sync({("u1", "full"): "30 2 * * *"})
    nxt = schedules.next_run("u1", "full", u(3, 28, 23))
    assert nxt is not None
    assert nxt.astimezone(UTC) == u(3, 29, 1)  # skipped 02:30: at the change, 03:00 CEST
    assert nxt.strftime("%H:%M %Z") == "03:00 CEST"
    # A reload that changes the zone makes the jobs again in the new one.
    schedules.set_zone(ZoneInfo("UTC"))
    assert schedules.next_run("u1", "full", u(3, 28, 23)) is None  # gone until the next sync
    schedules.sync({("u1", "full"): "30 2 * * *"})
    assert schedules.next_run("u1", "full", u(3, 28, 23)) == u(3, 29, 2, 30)


def _rec(started: datetime, level: Level) -> BackupRecord:
    return BackupRecord(
        f"{started:%Y%m%dT%H%M%S}.000Z-0000",
        "uuid",
        "web",
        level,
        BackupStatus.COMPLETE,
        None,
        None,
        started,
    )


def test_a_run_missed_across_the_change_is_caught_up_in_the_zone() -> None:
    """Daily 02:30 local; last backup 03-28 02:40 UTC (03:40 CET); the
    daemon comes back at 01:30 UTC on 03-29: the run moved to 03:00 CEST
    (01:00 UTC) was missed. In UTC reading it would not be due until 02:30."""
    history = [_rec(u(3, 28, 2, 40), Level.FULL)]
    sched = {"incremental": "30 2 * * *"}
    assert missed_request(sched, history, u(3, 29, 1, 30), BERLIN) is Level.INCREMENTAL
    assert missed_request(sched, history, u(3, 29, 1, 30), UTC) is None


def test_a_full_moved_by_the_change_still_merges_with_the_incremental() -> None:
    """Full at 02:30 (moved to 03:00 CEST on 03-29), hourly incremental:
    at 03:00 CEST both fire, one full serves both."""
    sched = {"full": "30 2 * * *", "incremental": "0 * * * *"}
    asked = scheduled_request(Level.INCREMENTAL, u(3, 29, 1), sched, None, BERLIN)
    assert asked is Level.FULL
    assert (
        scheduled_request(Level.INCREMENTAL, u(3, 29, 2), sched, None, BERLIN) is Level.INCREMENTAL
    )


def test_status_says_the_zone_and_shows_next_runs_in_it() -> None:
    nxt = datetime(2026, 3, 29, 3, 0, tzinfo=BERLIN).isoformat()
    daemon = DaemonStatus(
        pid=1,
        started=u(3, 28, 12).isoformat(),
        libvirt_uri="qemu:///system",
        libvirt_connected=True,
        domains={"uuid": DomainState("web", "/p.yaml", {"full": nxt})},
        schedule_timezone="Europe/Berlin",
    )
    row = status_view.DomainRow("web", "uuid", "/p.yaml", True, next_runs={"full": nxt})
    text = status_view.render(daemon, [row], [], [], as_json=False)
    assert "schedules in Europe/Berlin" in text, text
    assert "next: full 2026-03-29 03:00 CEST" in text, text
    data = status_view.render(daemon, [row], [], [], as_json=True)
    assert '"schedule_timezone": "Europe/Berlin"' in data
    assert '"full": "2026-03-29T03:00:00+02:00"' in data
    # A status file of an older daemon (no zone in it) reads as UTC, as it was.
    old = daemon.as_json()
    del old["schedule_timezone"]
    assert DaemonStatus.from_json(old).schedule_timezone == "UTC"
