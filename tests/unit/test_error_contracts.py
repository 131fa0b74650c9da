"""Errors as contracts (issue 25): every error class's exit code and the
context fields it carries, pinned in one table; bugs are a branch of their
own (not an operator's error), logged and reported with their traceback;
libvirt errors are told apart by code, never by message text; the daemon's
failure lines carry an error's context as journal fields."""

from __future__ import annotations

import asyncio
import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import libvirt
import pytest
import structlog

import virtbackupd
from virtbackupd import errors, logs
from virtbackupd.adapters.journald import JournaldRenderer
from virtbackupd.adapters.libvirt_conn import translate
from virtbackupd.cli.main import main as cli_main
from virtbackupd.config.yamlnodes import FileProblemsError, Source
from virtbackupd.core.job_state import IllegalTransitionError, JobMachine, JobState
from virtbackupd.daemon.main import main as daemon_main
from virtbackupd.errors import (
    REPORT_BUG,
    BackupFailedError,
    CheckpointInconsistentError,
    ConfigError,
    DomainNotFoundError,
    InternalError,
    LibvirtError,
    VirtBackupError,
)

P = Path("/srv/backups/x")
ID = "20261124T073513.258Z-f828"
Make = Callable[[type[Any]], BaseException]


def _classes(root: type[BaseException]) -> dict[str, type[BaseException]]:
    """Every class below `root` in the package (each module imported, so
    that a class wherever it lives is found), by name."""
    for mod in pkgutil.walk_packages(virtbackupd.__path__, "virtbackupd."):
        importlib.import_module(mod.name)
    found: dict[str, type[BaseException]] = {}
    todo = [root]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("virtbackupd."):
                found[sub.__name__] = sub
            todo.append(sub)
    return found


def _message(cls: type[Any]) -> BaseException:
    return cls("what went wrong")  # type: ignore[no-any-return]


def _path_problem(cls: type[Any]) -> BaseException:
    return cls(P, "what went wrong")  # type: ignore[no-any-return]


def _libvirt(cls: type[Any]) -> BaseException:
    return cls("libvirt said no", 55, domain="web01")  # type: ignore[no-any-return]


#: Every operator-facing error class: (exit code, how one is made, the
#: context it then carries). A new class needs its line here.
CONTRACTS: dict[str, tuple[int, Make, Mapping[str, str | int]]] = {
    "VirtBackupError": (1, _message, {}),
    "InputError": (2, _message, {}),
    "ConfigError": (
        2,
        lambda c: c("f.yaml:3: x: bad", path=Path("f.yaml"), line=3),
        {"path": "f.yaml"},
    ),
    "FileProblemsError": (
        2,
        lambda c: c([ConfigError("f.yaml:1: a", path=Path("f.yaml"), line=1)]),
        {"path": "f.yaml"},
    ),
    "XMLError": (1, lambda c: c("checkpoint XML of web01", "no name"), {}),
    "DefinitionMismatchError": (2, lambda c: c("domain.xml", "no disk vdb"), {}),
    "PlanError": (1, _message, {}),
    "NbdError": (1, _message, {}),
    "NbdConnectionError": (1, _message, {}),
    "NbdProtocolError": (1, _message, {}),
    "NbdTimeoutError": (1, _message, {}),
    "NbdServerError": (1, lambda c: c("sock", "READ 0+512", "EIO"), {}),
    "ProcessError": (1, lambda c: c("qemu-img", "failed"), {}),
    "LibvirtError": (1, _libvirt, {"domain": "web01", "libvirt_code": 55}),
    "LibvirtTimeoutError": (
        1,
        lambda c: c("no answer", "backupBegin", "web01"),
        {"domain": "web01"},
    ),
    "DomainNotFoundError": (2, _libvirt, {"domain": "web01", "libvirt_code": 55}),
    "CheckpointInconsistentError": (1, _libvirt, {"domain": "web01", "libvirt_code": 55}),
    "BackupBusyError": (1, _message, {}),
    "DomainStartingError": (1, _message, {}),
    "DaemonRunningError": (2, lambda c: c(P, 42), {"path": str(P)}),
    "DaemonLockFileError": (2, lambda c: c(P, "a FIFO"), {"path": str(P)}),
    "ScratchSpaceError": (1, _message, {}),
    "BackupFailedError": (
        1,
        lambda c: c("backup failed", ID, domain="web01"),
        {"domain": "web01", "backup_id": ID},
    ),
    "RestoreError": (1, _message, {}),
    "DefineRefusedError": (1, _message, {}),
    "UnknownRestorePointError": (2, _message, {}),
    "PruneError": (1, _message, {}),
    "ImageWriteError": (1, _path_problem, {"path": str(P)}),
    "UntrustedFolderError": (2, _path_problem, {"path": str(P)}),
    "FormatError": (1, _path_problem, {"path": str(P)}),
    "RepositoryFormatError": (1, _path_problem, {"path": str(P)}),
    "StatusFileError": (1, _path_problem, {"path": str(P)}),
    "DocumentDigestError": (2, _path_problem, {"path": str(P)}),
    "StoreError": (1, _path_problem, {"path": str(P)}),
    "StoreDamagedError": (1, _path_problem, {"path": str(P)}),
    "Qcow2UnsupportedError": (1, _path_problem, {"path": str(P)}),
    "Qcow2ReadError": (1, _path_problem, {"path": str(P)}),
    "VolumeReadError": (1, _message, {}),
    "ForeignCatalogueError": (1, lambda c: c(P, P.parent, ["r1"], None), {"path": str(P)}),
}

#: Bugs: not VirtBackupError; exit 1 with a traceback.
BUGS: dict[str, Make] = {
    "InternalError": _message,
    "IllegalTransitionError": _message,
}


def test_the_table_names_every_error_class() -> None:
    """A new error class states its contract here (exit code, context)."""
    every = {"VirtBackupError", *_classes(VirtBackupError)}
    assert every == set(CONTRACTS), "add the missing classes to CONTRACTS"
    assert {"InternalError", *_classes(InternalError)} == set(BUGS)


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_each_error_class_has_its_exit_code_and_context(name: str) -> None:
    classes: dict[str, type[BaseException]] = {
        "VirtBackupError": VirtBackupError,
        **_classes(VirtBackupError),
    }
    cls = classes[name]
    code, make, context = CONTRACTS[name]
    exc = make(cls)
    assert isinstance(exc, VirtBackupError)
    assert cls.exit_code == code, name  # type: ignore[attr-defined]
    assert exc.exit_code == code
    assert exc.context == context
    assert str(exc)  # an operator always gets words


@pytest.mark.parametrize("name", sorted(BUGS))
def test_a_bug_is_not_an_operators_error(name: str) -> None:
    """No `except VirtBackupError` takes a bug for a one-line error."""
    classes: dict[str, type[BaseException]] = {
        "InternalError": InternalError,
        **_classes(InternalError),
    }
    cls = classes[name]
    exc = BUGS[name](cls)
    assert not isinstance(exc, VirtBackupError)
    assert isinstance(exc, InternalError)
    assert InternalError.exit_code == 1


def test_an_illegal_move_of_the_job_is_a_bug() -> None:
    with pytest.raises(InternalError):
        JobMachine().advance(JobState.COMPLETE)
    assert issubclass(IllegalTransitionError, InternalError)


def test_context_fields_given_or_set_by_the_subclass() -> None:
    """A field is set when given; a subclass that sets one itself before
    the root's __init__ keeps it; fields left out are not in the context."""
    exc = VirtBackupError("x", domain="web01", disk="vda", path=P, libvirt_code=9)
    assert exc.context == {"domain": "web01", "disk": "vda", "path": str(P), "libvirt_code": 9}
    assert exc.path == P
    assert VirtBackupError("x").context == {}


def test_config_line_is_a_real_field_and_orders_a_files_problems(tmp_path: Path) -> None:
    """ConfigError.line is a declared field (was set by monkeypatching);
    a file's collected problems come in line order."""
    f = tmp_path / "p.yaml"
    f.write_text("a: 1\nb:\n  c: 2\n")
    src = Source.read(f)
    root = src.mapping(src.root, "", ["a", "b"])
    later = src.error(root["b"], "b", "second")
    earlier = src.error(root["a"], "a", "first")
    nowhere = src.error(None, "", "no line")
    assert (earlier.line, later.line, nowhere.line) == (1, 3, None)
    assert earlier.path == f
    src.errors += [later, nowhere, earlier]
    with pytest.raises(FileProblemsError) as raised:
        src.raise_errors()
    assert [e.line for e in raised.value.errors] == [None, 1, 3]


# --- libvirt errors by code -----------------------------------------------------------


def _libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    """libvirt's own exception as the binding raises it: its `err` tuple
    (code, domain, message, level, str1-3, int1-2) from virGetLastError."""
    exc = libvirt.libvirtError(message)
    exc.err = (code, 10, message, 2, None, None, None, 0, 0)
    return exc


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        # libvirt's words in another language: the code decides.
        (
            libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT,
            "Checkpoint inkonsistent: fehlende oder defekte Bitmap 'cp1' für Platte 'vda'",
            CheckpointInconsistentError,
        ),
        (
            libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT,
            "checkpoint inconsistent: missing or broken bitmap 'cp1' for disk 'vda'",
            CheckpointInconsistentError,
        ),
        # The same words under another code are not that error.
        (
            libvirt.VIR_ERR_INTERNAL_ERROR,
            "internal error: missing or broken bitmap 'cp1' (checkpoint inconsistent)",
            LibvirtError,
        ),
        (
            libvirt.VIR_ERR_NO_DOMAIN,
            "Domain not found: no domain with name 'x'",
            DomainNotFoundError,
        ),
        (libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running", LibvirtError),
    ],
)
def test_libvirt_errors_are_told_apart_by_code(
    code: int, message: str, expected: type[LibvirtError]
) -> None:
    ours = translate(_libvirt_error(code, message), "web01")
    assert type(ours) is expected
    assert ours.code == code
    assert ours.context == {"domain": "web01", "libvirt_code": code}
    assert str(ours) == message


# --- what the CLI and the daemon say ---------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigError("vb.yaml:3: state_dir: not a folder"), 2),
        (DomainNotFoundError("no domain named 'x'", 42, domain="x"), 2),
        (BackupFailedError("backup of web01 failed: disk full", ID), 1),
        (errors.DaemonRunningError(P, 7), 2),
    ],
)
def test_an_operators_error_is_one_line_with_its_class_exit_code(
    exc: VirtBackupError, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert logs.exit_status("virtbackup", exc) == code
    err = capsys.readouterr().err
    assert err == f"virtbackup: {exc}\n"


@pytest.mark.parametrize(
    "exc", [IllegalTransitionError("backup job cannot go from planned to complete"), KeyError("k")]
)
def test_a_bug_exits_1_with_its_traceback_and_a_request_to_report_it(
    exc: Exception, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(type(exc)) as raised:
        raise exc
    assert logs.exit_status("virtbackupd", raised.value) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    last = err.splitlines()[-1]
    assert last.startswith(f"virtbackupd: internal error: {type(exc).__name__}")
    assert last.endswith(REPORT_BUG)


def _raising(exc: BaseException) -> Callable[[Any], Any]:
    def run(coro: Any) -> Any:
        coro.close()  # never awaited: closed, not warned about
        raise exc

    return run


def test_the_cli_reports_a_bug_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug anywhere in a command (here: raised as the command runs)."""
    monkeypatch.setattr(asyncio, "run", _raising(IllegalTransitionError("cannot fail")))
    assert cli_main(["list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "IllegalTransitionError: cannot fail" in err
    assert err.splitlines()[-1].endswith(REPORT_BUG)


def test_the_cli_says_a_config_error_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(asyncio, "run", _raising(ConfigError("vb.yaml:2: x: bad")))
    assert cli_main(["list"]) == 2
    assert capsys.readouterr().err == "virtbackup: vb.yaml:2: x: bad\n"


@pytest.mark.parametrize(
    ("exc", "code", "traceback"),
    [
        (errors.DaemonRunningError(P, None), 2, False),
        (ConfigError("vb.yaml: bad"), 2, False),
        (errors.ProcessError("qemu-img", "failed"), 1, False),
        (IllegalTransitionError("x"), 1, True),
    ],
)
def test_the_daemon_exits_by_the_errors_class(
    exc: Exception,
    code: int,
    traceback: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def service(_path: Path) -> Any:
        raise exc

    monkeypatch.setattr("virtbackupd.daemon.service.Service", service)
    assert daemon_main([]) == code
    err = capsys.readouterr().err
    assert ("Traceback" in err) is traceback
    if not traceback:
        assert err == f"virtbackupd: {exc}\n"


# --- the daemon's log lines --------------------------------------------------------------


@pytest.fixture
def console() -> Iterator[None]:
    saved = structlog.get_config()
    logs.configure("info", "console")
    yield
    structlog.configure(**saved)


def test_a_bug_is_logged_with_its_traceback(
    console: None, capsys: pytest.CaptureFixture[str]
) -> None:
    log = structlog.get_logger("test")
    try:
        JobMachine().advance(JobState.COMPLETE)
    except IllegalTransitionError as exc:
        logs.failure(log, "backup crashed", exc, domain="web01")
    err = capsys.readouterr().err
    assert "Traceback" in err and "IllegalTransitionError" in err
    assert "please report it" in err


def test_an_operators_error_is_logged_in_one_line(
    console: None, capsys: pytest.CaptureFixture[str]
) -> None:
    log = structlog.get_logger("test")
    exc = ConfigError("p.yaml:3: retention: unknown key", path=Path("p.yaml"), line=3)
    logs.failure(log, "backup failed", exc, domain="web01")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "p.yaml:3: retention: unknown key" in err


class _Sent:
    def __init__(self) -> None:
        self.entries: list[Mapping[str, Any]] = []

    def send(self, fields: Mapping[str, Any]) -> None:
        self.entries.append(dict(fields))


def test_an_errors_context_becomes_journal_fields() -> None:
    """`journalctl DOMAIN=web01 LIBVIRT_CODE=109` finds the failure line;
    a key the call gives, or its logger has bound, wins over the error's."""
    sent = _Sent()
    log = structlog.wrap_logger(
        structlog.PrintLogger(),
        processors=[JournaldRenderer(sent)],  # type: ignore[arg-type]
        wrapper_class=logs.wrapper_class(logging.INFO),
    )
    exc = CheckpointInconsistentError("missing bitmap", 109, domain="uuid-or-name")
    logs.failure(log, "backup failed", exc, domain="web01", state="exporting")
    bad = errors.ImageWriteError(P, "No space left on device")
    logs.failure(log, "backup failed", bad, domain="web01", error="the reason shown")
    job = log.bind(domain="web01", backup_id=ID)  # a job's logger: its keys win
    logs.failure(job, "backup failed", LibvirtError("gone", 1, domain="other"))
    first, second, third = sent.entries
    assert third["DOMAIN"] == "web01" and third["BACKUP_ID"] == ID
    assert third["LIBVIRT_CODE"] == 1
    assert first["DOMAIN"] == "web01" and first["LIBVIRT_CODE"] == 109
    assert first["ERROR"] == "missing bitmap" and first["STATE"] == "exporting"
    assert first["PRIORITY"] == 3 and first["EVENT"] == "backup failed"
    assert second["PATH"] == str(P) and second["ERROR"] == "the reason shown"
    assert "BUG" not in first and "BUG" not in second


def test_the_hosts_refusal_is_one_line_not_a_bug(
    console: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A read-only or full file system (OSError) is the operator's to fix:
    one line naming the file and the system's words, exit 1, no traceback,
    logged with the file as PATH (a read-only backup_root made every backup
    a 'bug' with a traceback when the job's start moved into its failure
    path)."""
    refusal = OSError(30, "Read-only file system", "/srv/backups/.repository.json.tmp")
    assert not logs.is_bug(refusal)
    assert logs.exit_status("virtbackup", refusal) == 1
    said = "/srv/backups/.repository.json.tmp: Read-only file system"
    assert capsys.readouterr().err == f"virtbackup: {said}\n"
    logs.failure(structlog.get_logger("test"), "backup failed", refusal, domain="web01")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert said in err and "/srv/backups/.repository.json.tmp" in err
