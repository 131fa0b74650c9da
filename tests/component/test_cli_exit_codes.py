"""Every command's bad input ends as docs/cli.md says (issue 24, item 7):
the exit code it gives (2 bad input: usage, config, an unknown domain,
backup, disk or time, a --to that cannot hold images; 1 the operation
failed), one line on stderr, no traceback. The new pinning table; older
single cases live in test_hostile_manifests, test_config, test_reindex.

A real repository (testbed.repo_builder: two backups of one domain), the
real CLI in this process. Commands that need libvirt ask libvirt's own
test driver (test:///default, in-process): what is pinned here is the
CLI's answer to input, and "no such domain" is libvirt's real answer."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from testbed.repo_builder import BuiltDomain, MiB, build_chain
from virtbackupd.cli.main import build_parser, main

NO_VM = "no-such-vm"
NO_ID = "20200101T000000.000Z-beef"
TO = ["restore", "{vm}", "--to"]
TO_DEV = ["restore", "{vm}", "--to-device"]
TO_R = ["restore", "{vm}", "--to", "{tmp}/r"]  # a restore that would write into {tmp}/r


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltDomain:
    return asyncio.run(build_chain(tmp_path_factory.mktemp("repo"), 2, 4 * MiB))


@pytest.fixture(scope="module")
def config(built: BuiltDomain, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("config")
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(f"domains: [{built.name}]\nretention: {{keep_last: 5}}\n")
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("x")
    (tmp / "broken.yaml").write_text("domains: [x]\nretention: {keep_lats: 1}\n")
    config = tmp / "vb.yaml"
    config.write_text(
        f"state_dir: {built.state_db.parent}\nbackup_root: {built.root}\n"
        f"runtime_dir: {built.runtime}\npolicy_dirs: [{policies}]\npriority: normal\n"
        "libvirt_uri: 'test:///default'\n"
    )
    return config


#: (case, argv after `-c CONFIG`, exit code docs/cli.md gives, words the
#: line must hold). {vm}, {tmp}, {id0} are filled in.
CASES: list[tuple[str, list[str], int, str]] = [
    # usage (argparse)
    ("no command", [], 2, "--help"),
    ("unknown command", ["frobnicate"], 2, "invalid choice"),
    ("missing domain", ["backup"], 2, "required"),
    ("abbreviated option", ["backup", "{vm}", "--ful"], 2, "--ful"),
    ("bad --format", [*TO_R, "--format", "vmdk"], 2, "vmdk"),
    ("bad --move-rate", [*TO_R, "--live", "--move-rate", "-1"], 2, "MiB/s"),
    ("--backup and --at", [*TO_R, "--backup", "x", "--at", "y"], 2, "not allowed"),
    ("two targets", [*TO_R, "--in-place"], 2, "not allowed"),
    # unknown domain
    ("backup unknown domain", ["backup", NO_VM], 2, NO_VM),
    ("list unknown domain", ["list", NO_VM], 2, NO_VM),
    ("checkpoints unknown domain", ["checkpoints", NO_VM], 2, NO_VM),
    ("restore unknown domain", ["restore", NO_VM, "--to", "{tmp}/r"], 2, NO_VM),
    ("mount unknown domain", ["mount", NO_VM, "{tmp}/m"], 2, NO_VM),
    ("verify unknown domain", ["verify", NO_VM], 2, NO_VM),
    ("prune unknown domain", ["prune", NO_VM], 2, NO_VM),
    ("cancel unknown domain", ["cancel", NO_VM], 2, NO_VM),
    ("forget-checkpoints unknown domain", ["forget-checkpoints", NO_VM], 2, NO_VM),
    # unknown or hostile backup id
    ("restore unknown backup", [*TO_R, "--backup", NO_ID], 2, NO_ID),
    ("restore backup id a path", [*TO_R, "--backup", "../x"], 2, "../x"),
    ("mount unknown backup", ["mount", "{vm}", "{tmp}/m", "--backup", NO_ID], 2, NO_ID),
    ("verify unknown backup", ["verify", "{vm}", "--backup", NO_ID], 2, NO_ID),
    ("verify backup id a path", ["verify", "--backup", "../x"], 2, "../x"),
    # time and disk
    ("restore --at before the first", [*TO_R, "--at", "2001-01-01T00:00"], 2, "2001"),
    ("restore --at not a time", [*TO_R, "--at", "yesterday"], 2, "yesterday"),
    ("mount --at before the first", ["mount", "{vm}", "{tmp}/m", "--at", "2001-01-01"], 2, "2001"),
    ("restore unknown disk", [*TO_R, "--disk", "sdz"], 2, "sdz"),
    # where to
    ("restore --to a file", ["restore", "{vm}", "--to", "{tmp}/a-file"], 2, "a-file"),
    ("restore --to under /proc", ["restore", "{vm}", "--to", "/proc/x"], 2, "/proc/x"),
    ("restore --to under /sys", ["restore", "{vm}", "--to", "/sys/x"], 2, "/sys/x"),
    ("restore --to below a file", [*TO, "{tmp}/a-file/r"], 2, "a-file"),
    ("restore --to under /dev", [*TO, "/dev/x"], 2, "/dev/x"),
    ("restore --to-device without --disk", [*TO_DEV, "/dev/null"], 2, "--disk"),
    ("restore --to-device no device", [*TO_DEV, "{tmp}/none", "--disk", "vda"], 2, "none"),
    ("restore --to-device a file", [*TO_DEV, "{tmp}/a-file", "--disk", "vda"], 2, "a-file"),
    ("mount on a file", ["mount", "{vm}", "{tmp}/a-file"], 2, "a-file"),
    ("restore --define, no --to", ["restore", "{vm}", "--in-place", "--define", "n"], 2, "--to"),
    ("restore --live without --define", [*TO_R, "--live"], 2, "--define"),
    ("mount on a non-empty folder", ["mount", "{vm}", "{tmp}/full"], 2, "full"),
    ("umount of no mount", ["umount", "{tmp}"], 2, "not"),
    # operations that fail
    ("cancel with none running", ["cancel", "{vm}"], 1, "{vm}"),
    # config and policies
    ("policy check of no file", ["policy", "check", "{tmp}/none.yaml"], 2, "none.yaml"),
    ("policy check of a broken file", ["policy", "check", "{tmp}/broken.yaml"], 2, "keep_lats"),
]  # fmt: skip

#: Without a usable config every command is input error 2 naming the file.
CONFIGLESS = ["list", "status", "backup {vm}", "verify", "prune", "reindex", "policy check"]


def _fill(arg: str, built: BuiltDomain, tmp: Path) -> str:
    return arg.format(vm=built.name, tmp=tmp, id0=built.ids[0])


def _one_line(err: str) -> None:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    # Reconciling the catalogue may say what it fixed first; the error is last.
    assert 1 <= len(lines) <= 2, err


@pytest.mark.parametrize(
    ("argv", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gives_the_documented_exit_code_and_one_line(
    built: BuiltDomain,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    words: str,
) -> None:
    tmp = config.parent
    capsys.readouterr()
    try:
        rc = main(["-c", str(config), *(_fill(a, built, tmp) for a in argv)])
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    assert rc == code, (rc, out, err)
    _one_line(err)
    assert _fill(words, built, tmp) in err, err
    assert not (tmp / "r").exists() or not any((tmp / "r").iterdir())


@pytest.mark.parametrize("command", CONFIGLESS)
@pytest.mark.parametrize(
    "problem", ["missing", "bad value", "a folder", "not yaml", "unknown time zone"]
)
def test_without_a_usable_config_every_command_is_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, problem: str
) -> None:
    config = tmp_path / "vb.yaml"
    if problem == "bad value":
        config.write_text(f"state_dir: {tmp_path}\npriority: fastest\n")
    elif problem == "a folder":
        config.mkdir()
    elif problem == "unknown time zone":
        config.write_text(f"state_dir: {tmp_path}\nschedule: {{timezone: Mars/Olympus}}\n")
    elif problem == "not yaml":
        config.write_text("state_dir: [unclosed\n")
    rc = main(["-c", str(config), *command.format(vm="vm").split()])
    err = capsys.readouterr().err
    assert rc == 2, err
    _one_line(err)
    assert str(config) in err, err


def test_the_table_covers_every_command() -> None:
    parser = build_parser()
    commands = next(
        set(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    covered = {c[1][0] for c in CASES if c[1]} | {c.split()[0] for c in CONFIGLESS}
    assert commands <= covered, commands - covered
