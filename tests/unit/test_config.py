"""Daemon config and policy files: defaults, relative paths, and an error
naming file, line, key and expectation for every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtbackupd.config.daemon import config_path, load_config
from virtbackupd.config.policy import load_policies, load_policy, parse_rate, policy_files
from virtbackupd.core.backup_documents import RawDisks
from virtbackupd.core.policy import EventAction, Quiesce, policy_for
from virtbackupd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_shipped_examples_load() -> None:
    cfg = load_config(REPO / "config" / "virtbackupd.yaml")
    assert cfg.libvirt_uri == "qemu:///system"
    assert cfg.libvirt_timeout == 120
    assert cfg.state_db == Path("/var/lib/virtbackupd/state.db")
    assert cfg.max_concurrent_backups == 2
    pol = load_policy(REPO / "config" / "policies.d" / "example.yaml")
    assert pol.domains == ("web01", "db-*")
    assert pol.exclude_disks == frozenset()
    assert pol.retention.keep_weekly == 4
    assert pol.on_shutdown is EventAction.INCREMENTAL
    assert pol.bandwidth == 200 * 1024 * 1024
    assert pol.quiesce is Quiesce.AUTO


def test_schedule_timing(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "vb.yaml", "schedule: {jitter: 0, busy_retry: 3}\n"))
    assert (cfg.schedule_jitter, cfg.busy_retry) == (0, 3)
    cfg = load_config(write(tmp_path, "vb2.yaml", "priority: low\n"))
    assert (cfg.schedule_jitter, cfg.busy_retry) == (30, 15)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "etc/vb.yaml", "state_dir: ../var\npolicy_dirs: [policies]\n")
    )
    assert cfg.state_dir == tmp_path / "etc" / ".." / "var"
    assert cfg.backup_root == cfg.state_dir / "backups", "backup_root follows state_dir"
    assert cfg.policy_dirs == (tmp_path / "etc" / "policies",)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTBACKUPD_CONFIG", "/env.yaml")
    assert config_path("/cli.yaml") == Path("/cli.yaml")
    assert config_path(None) == Path("/env.yaml")
    monkeypatch.delenv("VIRTBACKUPD_CONFIG")
    assert config_path(None) == Path("/etc/virtbackupd/virtbackupd.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("libvirt_url: x\n", ":1: libvirt_url: unknown key (expected one of: libvirt_uri,"),
        ("max_concurrent_backups: 0\n", ":1: max_concurrent_backups: expected an integer >= 1"),
        ("libvirt_timeout: 0\n", ":1: libvirt_timeout: expected an integer >= 1"),
        ("max_concurrent_backups: two\n", "expected an integer >= 1, got str 'two'"),
        ("\nlog:\n  format: xml\n", ":3: log.format: expected one of auto, journal, json, console"),
        ("policy_dirs: /etc\n", "policy_dirs: expected a list of strings"),
        ("state_dir: [\n", "not valid YAML"),
        ("libvirt_uri: a\nlibvirt_uri: b\n", ":2: libvirt_uri: given twice"),
        ("schedule:\n  jitter: 60\n", ":2: schedule.jitter: 60 is not below 60 (seconds)"),
        ("schedule:\n  jitter: -1\n", "schedule.jitter: expected an integer >= 0"),
        ("schedule: {busy_retry: 0}\n", ":1: schedule.busy_retry: expected an integer >= 1"),
        ("schedule: {retry: 5}\n", "schedule.retry: unknown key (expected one of: jitter,"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "vb.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(str(path))
    assert message in str(exc.value)


def test_missing_config_says_how_to_give_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="-c PATH or \\$VIRTBACKUPD_CONFIG"):
        load_config(tmp_path / "nope.yaml")


POLICY = """\
domains: ["web*"]
uuids: [0B1CBD0E-1C2F-4A57-9B43-5B1F1E0F7A01]
exclude_domains: [web-test]
disks: {include: [vda], raw: full}
schedule: {full: "0 2 * * 0", incremental: "*/5 * * * *", verify: "30 3 * * 6"}
chain: {max_incrementals: 5}
events: {on_shutdown: full, on_define: none}
quiesce: never
bandwidth: 1.5GiB
target: ../elsewhere
"""


def test_policy_values(tmp_path: Path) -> None:
    pol = load_policy(write(tmp_path, "p/web.yaml", POLICY))
    assert pol.uuids == ("0b1cbd0e-1c2f-4a57-9b43-5b1f1e0f7a01",)
    assert pol.include_disks == frozenset({"vda"})
    assert pol.raw is RawDisks.FULL
    assert pol.incremental_schedule == "*/5 * * * *"
    assert pol.verify_schedule == "30 3 * * 6"
    assert pol.max_incrementals == 5
    assert pol.on_define is EventAction.NONE
    assert pol.bandwidth == int(1.5 * 1024**3)
    assert pol.target == tmp_path / "p" / ".." / "elsewhere"
    assert pol.retention.keeps_everything
    assert pol.matches("web01", "x")
    assert not pol.matches("web-test", "x")
    assert pol.matches("db", "0b1cbd0e-1c2f-4a57-9b43-5b1f1e0f7a01")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("domains: [a]\nschedule: {full: '61 * * * *'}\n", ":2: schedule.full: expected a cron"),
        ("domains: [a]\nschedule: {full: '* * *'}\n", "3 fields instead of 5"),
        ("domains: [a]\nretention: {keep_dayly: 3}\n", "retention.keep_dayly: unknown key"),
        (
            "domains: [a]\nretention: {keep_last: -1}\n",
            "retention.keep_last: expected an integer >= 0",
        ),
        ("domains: [a]\nquiesce: sometimes\n", "quiesce: expected one of auto, always, never"),
        (
            "domains: [a]\nevents: {on_shutdown: backup}\n",
            "events.on_shutdown: expected one of none",
        ),
        ("domains: [a]\ndisks: {raw: copy}\n", "disks.raw: expected one of skip, full"),
        ("domains: [a]\nbandwidth: fast\n", "bandwidth: expected a rate such as 200MiB"),
        ("domains: a\n", "domains: expected a list of strings"),
        ("uuids: [not-a-uuid]\n", ":1: uuids[0]: expected a UUID"),
        ("disks: {}\n", "a policy must name domains"),
        ("", "empty policy"),
        ("domains: [a]\ncolor: red\n", ":2: color: unknown key"),
    ],
)
def test_policy_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_policy(path)
    assert str(exc.value).startswith(str(path))
    assert message in str(exc.value)


def test_no_is_a_word_not_false(tmp_path: Path) -> None:
    """YAML 1.1 reads bare `none`... fine, but `no` would be false; choices
    still get the word the operator wrote."""
    pol = load_policy(write(tmp_path, "p.yaml", "domains: [a]\nquiesce: never\n"))
    assert pol.quiesce is Quiesce.NEVER


def test_overlapping_policies(tmp_path: Path) -> None:
    a = write(tmp_path, "d/a.yaml", "domains: ['web*']\n")
    b = write(tmp_path, "d/b.yaml", "domains: ['web01', 'web*']\n")
    c = write(tmp_path, "d/c.yaml", "domains: [db]\nschedule: {full: nonsense}\n")
    loaded = load_policies(policy_files([tmp_path / "d"]))
    policies, errors = loaded.policies, loaded.errors
    assert [p.source for p in policies] == [a, b]
    messages = [str(e) for e in errors]
    assert any(str(c) in m and "schedule.full" in m for m in messages)
    assert any("'web*' is also in" in m for m in messages)
    with pytest.raises(ConfigError, match="matched by more than one policy"):
        policy_for("web01", "u", policies)
    assert policy_for("db", "u", policies) is None


def test_parse_rate() -> None:
    assert parse_rate("200MiB") == 200 * 1024**2
    assert parse_rate("10 M/s") == 10 * 1024**2
    assert parse_rate("4096") == 4096
    with pytest.raises(ValueError):
        parse_rate("0")


def test_policy_check_command_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from virtbackupd.cli.main import main as cli

    good = write(tmp_path, "good.yaml", "domains: [a]\n")
    bad = write(tmp_path, "bad.yaml", "domains: [b]\nquiesce: maybe\n")
    assert cli(["policy", "check", str(good)]) == 0
    assert f"ok: {good}" in capsys.readouterr().out
    assert cli(["policy", "check", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: quiesce: expected one of auto, always, never" in err
    assert cli(["--json", "policy", "check", str(bad)]) == 2
    out = capsys.readouterr().out
    assert '"errors"' in out


def test_backup_ids_sort_in_time_order_within_a_second() -> None:
    from datetime import UTC, datetime

    from virtbackupd.adapters.repository import new_backup_id
    from virtbackupd.core.backup_documents import checkpoint_name

    t = datetime(2026, 11, 23, 20, 15, 0, 5000, tzinfo=UTC)
    ids = [new_backup_id(t.replace(microsecond=us)) for us in (5000, 6000, 999000)]
    assert ids == sorted(ids)
    assert ids[0].startswith("20261123T201500.005Z-")
    checkpoint_name(ids[0])  # a valid checkpoint name


def test_every_problem_of_a_file_is_reported_in_line_order(tmp_path: Path) -> None:
    """`policy check` used to stop at the first problem of a file."""
    path = write(
        tmp_path,
        "p.yaml",
        "domains: [a]\n"
        "colour: red\n"
        "schedule: {full: '61 * * * *', incremental: '0 2 * * 8'}\n"
        "quiesce: sometimes\n"
        "retention: {keep_last: -1, keep_dayly: 2}\n",
    )
    loaded = load_policies([path])
    policies, errors = loaded.policies, loaded.errors
    assert policies == []
    lines = [str(e) for e in errors]
    assert len(lines) == 6, lines
    assert [m.split(":")[1] for m in lines] == ["2", "3", "3", "4", "5", "5"]
    assert "colour: unknown key" in lines[0]
    assert "schedule.full" in lines[1] and "schedule.incremental" in lines[2]
    assert "day of week: 8 is outside 0-7" in lines[2]
    assert "quiesce" in lines[3]
    assert {"retention.keep_last", "retention.keep_dayly"} == {
        m.split(": ")[1].rstrip(":") for m in lines[4:]
    }


def test_policies_against_the_domains_libvirt_has(tmp_path: Path) -> None:
    from virtbackupd.core.policy import coverage

    a = load_policy(write(tmp_path, "a.yaml", "domains: ['web*', 'mail']\n"))
    b = load_policy(write(tmp_path, "b.yaml", "domains: ['web01']\n"))
    c = load_policy(write(tmp_path, "c.yaml", "uuids: ['0b1cbd0e-1c2f-4a57-9b43-5b1f1e0f7a01']\n"))
    cov = coverage([a, b, c], [("web01", "u1"), ("web02", "u2"), ("db", "u3")])
    assert len(cov.errors) == 1
    assert "web01" in cov.errors[0] and str(a.source) in cov.errors[0]
    assert str(b.source) in cov.errors[0]
    assert any("'mail' matches no domain" in w for w in cov.warnings)
    assert any("0b1cbd0e" in w for w in cov.warnings)
    assert set(cov.governed) == {"u2"}
    assert cov.unmanaged == ("db",)


def test_shipped_example_policy_excludes_nothing_a_vm_must_have() -> None:
    """The example works on any VM: it excludes no disk (an exclude of a
    disk a VM lacks is harmless now, but the example should not need it)."""
    pol = load_policy(REPO / "config" / "policies.d" / "example.yaml")
    assert pol.exclude_disks == frozenset()
    assert pol.include_disks == frozenset()
