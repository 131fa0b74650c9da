"""Hostile input, second round (a tester's findings on main):

- `restore --to DIR --force` without `--define` never replaces a file a
  running domain has as a disk (it did: QEMU then wrote to a deleted
  file), and replaces nothing existing when libvirt cannot be asked;
- a repository's texts reach no terminal raw: an attempt's error is
  escaped where it is read, a domain name with control or bidi/format
  characters is refused;
- option values that tracebacked, held a backup forever or split the
  one-line error are usage errors of one line.

A real repository (testbed.repo_builder), the real CLI in this process;
libvirt is its own test driver (test:///default, in-process, shared by
every connection of the process while one is open: the domain defined
here is what the CLI's connection sees)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from testbed.repo_builder import BuiltDomain, MiB, build_chain
from virtbackupd.cli.main import main

UNSAFE = ("\x1b", "\x07", "\r", "\n", "\x9b", "\x7f", "\x00", "\u202e", "\u200f")


@pytest.fixture
def built(tmp_path: Path) -> BuiltDomain:
    return asyncio.run(build_chain(tmp_path / "b", 1, 2 * MiB))


def _config(built: BuiltDomain, uri: str = "test:///default") -> Path:
    tmp = built.tmp
    policies = tmp / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "p.yaml").write_text(f"domains: [{built.name}]\nretention: {{keep_last: 5}}\n")
    config = tmp / "vb.yaml"
    config.write_text(
        f"state_dir: {built.state_db.parent}\nbackup_root: {built.root}\n"
        f"runtime_dir: {built.runtime}\npolicy_dirs: [{policies}]\npriority: normal\n"
        f"libvirt_uri: '{uri}'\n"
    )
    return config


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def _one_line(err: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert 1 <= len(lines) <= 2, err


# --- 1. --to DIR --force over a running domain's disk -----------------------------------------


@pytest.fixture
def running_on(tmp_path: Path) -> Iterator[Path]:
    """DIR/vda.qcow2, a disk of a running domain of test:///default."""
    to = tmp_path / "to"
    to.mkdir()
    image = to / "vda.qcow2"
    image.write_bytes(b"in use by a running guest")
    conn = libvirt.open("test:///default")
    dom = conn.defineXML(
        f"<domain type='test'><name>vbtest-inputs-user</name><memory>1024</memory>"
        f"<os><type>hvm</type></os><devices><disk type='file' device='disk'>"
        f"<source file='{image}'/><target dev='vda'/></disk></devices></domain>"
    )
    dom.create()
    try:
        yield image
    finally:
        dom.destroy()
        dom.undefine()
        conn.close()


def test_force_never_replaces_a_running_domains_disk(
    built: BuiltDomain, running_on: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(built)
    argv = ["-c", str(config), "restore", built.name, "--to", str(running_on.parent), "--force"]
    rc, _, err = _run(argv, capsys)
    assert rc == 1, err
    _one_line(err)
    assert "is a disk of running domain vbtest-inputs-user" in err, err
    assert running_on.read_bytes() == b"in use by a running guest"


def test_force_replaces_a_file_no_running_domain_uses(
    built: BuiltDomain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    to = tmp_path / "to"
    to.mkdir()
    (to / "vda.qcow2").write_bytes(b"old")
    config = _config(built)
    rc, _, err = _run(
        ["-c", str(config), "restore", built.name, "--to", str(to), "--force"], capsys
    )
    assert rc == 0, err
    assert (to / "vda.qcow2").read_bytes() != b"old"


def test_force_replaces_nothing_when_libvirt_cannot_say(
    built: BuiltDomain, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    to = tmp_path / "to"
    to.mkdir()
    (to / "vda.qcow2").write_bytes(b"old")
    config = _config(built, f"qemu+unix:///system?socket={tmp_path / 'no-libvirt.sock'}")
    rc, _, err = _run(
        ["-c", str(config), "restore", built.name, "--to", str(to), "--force"], capsys
    )
    assert rc == 1, err
    _one_line(err)
    assert "libvirt cannot tell" in err, err
    assert (to / "vda.qcow2").read_bytes() == b"old"
    # Nothing to replace: libvirt is not needed.
    rc, _, err = _run(
        ["-c", str(config), "restore", built.name, "--to", str(tmp_path / "new"), "--force"],
        capsys,
    )
    assert rc == 0, err


# --- 2. a repository's texts on a terminal ----------------------------------------------------

ATTEMPT_ID = "20260101T000000.000Z-abcd"
ERROR_CASES = [
    ("screen clear, title, forged line", "\x1b[2J\x1b]0;pwned\x07\nvirtbackup: FAKE all good\r"),
    ("C1 CSI", "x\x9b2Jy"),
    ("bidi override", "ok \u202egnp.exe"),
    ("DEL and NUL", "a\x7fb\x00c"),
]


def _attempt(built: BuiltDomain, name: str, error: str) -> None:
    folder = built.root / built.uuid / ".attempts"
    folder.mkdir(exist_ok=True)
    (folder / f"{ATTEMPT_ID}.json").write_text(
        json.dumps(
            {
                "format": "virtbackupd-attempt",
                "format_version": 1,
                "backup_id": ATTEMPT_ID,
                "domain": {"name": name, "uuid": built.uuid},
                "level": "full",
                "started": "2026-01-01T00:00:00+00:00",
                "finished": "2026-01-01T00:01:00+00:00",
                "error": error,
                "parent": None,
            }
        )
    )


def _no_unsafe(text: str) -> None:
    assert not any(c in text for c in UNSAFE if c != "\n"), repr(text)
    for line in text.splitlines():
        assert "FAKE" not in line or "\\x" in line, repr(text)


@pytest.mark.parametrize(("case", "error"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_an_attempts_error_is_shown_escaped(
    built: BuiltDomain, capsys: pytest.CaptureFixture[str], case: str, error: str
) -> None:
    _attempt(built, built.name, error)
    config = _config(built)
    rc, out, err = _run(["-c", str(config), "list", "--all"], capsys)
    assert rc == 0, err
    _no_unsafe(out + err)
    assert ATTEMPT_ID in out, out
    # every command shows the same text: the JSON carries the escaped form
    rc, out, err = _run(["-c", str(config), "list", "--all", "--json"], capsys)
    assert rc == 0, err
    _no_unsafe(out + err)
    assert "\\x" in out or "\\u" in out, out


@pytest.mark.parametrize("bad", ["vm\u202eexe", "vm\x1b[2J", "vm\x85", "vm\u2066x"])
def test_a_name_with_control_or_format_characters_is_refused(
    built: BuiltDomain, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    _attempt(built, bad, "failed")
    config = _config(built)
    _, out, err = _run(["-c", str(config), "list", "--all"], capsys)
    _no_unsafe(out + err)
    assert ATTEMPT_ID not in out, out
    assert "name" in err, err


# --- 3. option values ------------------------------------------------------------------------

RATES = ["1e309", "1e308", "inf", "-inf", "nan", "0.0000001", "0", "-1", "1000001", "x"]


@pytest.mark.parametrize("rate", RATES)
def test_a_move_rate_out_of_range_is_one_usage_line(
    built: BuiltDomain, tmp_path: Path, capsys: pytest.CaptureFixture[str], rate: str
) -> None:
    config = _config(built)
    argv = ["-c", str(config), "restore", built.name, "--to", str(tmp_path / "r")]
    argv += ["--define", "x", "--live", f"--move-rate={rate}"]
    rc, _, err = _run(argv, capsys)
    assert rc == 2, err
    _one_line(err)
    assert "--move-rate" in err and "1 to 1000000" in err, err
    assert not (tmp_path / "r").exists()


def test_a_long_time_zone_is_cut_in_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "vb.yaml"
    config.write_text(f"state_dir: {tmp_path}\nschedule: {{timezone: {'Z' * 5000}}}\n")
    rc, _, err = _run(["-c", str(config), "list"], capsys)
    assert rc == 2, err
    _one_line(err)
    assert len(err) < 400, len(err)


@pytest.mark.parametrize("name", ["x\ny", "x\x1b[2Jy", "x\u202ey", "x\ry"])
def test_a_define_name_with_control_characters_is_refused_on_one_line(
    built: BuiltDomain, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    config = _config(built)
    argv = ["-c", str(config), "restore", built.name, "--to", str(tmp_path / "r")]
    rc, _, err = _run([*argv, "--define", name], capsys)
    assert rc == 2, err
    _one_line(err)
    _no_unsafe(err)
    assert "--define" in err, err
    assert not (tmp_path / "r").exists()
