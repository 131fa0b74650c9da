"""`make demo`: virtbackupd working end to end on this machine, in a few
minutes, leaving nothing behind.

A throw-away domain (TCG, no guest OS, two qcow2 disks) gets "guest
writes" through QEMU's monitor; the virtbackupd service, started with a
repository-local config and a demo policy, backs it up each time it shuts
down (full, then incrementals) and prunes to the last two. The latest
backup is restored with `virtbackup restore`, compared with the demo's own
reference images, and verified.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from testbed.domains import PREFIX, WORK_ROOT, DomainFactory, GuestDomain, MiB  # noqa: E402
from testbed.guest import GuestWriter  # noqa: E402
from testbed.host import connect, ensure_libvirtd  # noqa: E402

BIN = Path(sys.executable).parent
DEMO = REPO / "var" / "demo"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def virtbackup(config: Path, *args: str, show: bool = True) -> str:
    cmd = [str(BIN / "virtbackup"), "-c", str(config), *args]
    if show:
        print(f"$ virtbackup {' '.join(args)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"demo: virtbackup {' '.join(args)} failed:\n{proc.stderr}")
    if show:
        print(proc.stdout, end="", flush=True)
    return proc.stdout


def wait_backup(config: Path, known: set[str], kept: int, timeout: float = 180) -> dict[str, Any]:
    """The daemon's next backup (an id not in `known`), once it completed and
    the prune after it left `kept` backups."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = json.loads(virtbackup(config, "--json", "list", show=False))
        failed = [b for b in listed if b["status"] == "failed"]
        if failed:
            raise SystemExit(f"demo: a backup failed: {failed[-1]['error']}")
        new = [b for b in listed if b["id"] not in known and b["status"] == "complete"]
        if new and len(listed) == kept:
            return new[-1]  # type: ignore[no-any-return]
        time.sleep(0.5)
    raise SystemExit(f"demo: the daemon did not finish a backup within {timeout}s")


def compare(reference: Path, image: Path, fmt: str) -> None:
    subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, str(reference), str(image)],
        check=True,
    )


def main() -> int:
    ensure_libvirtd()
    conn = connect()
    shutil.rmtree(DEMO, ignore_errors=True)
    (DEMO / "policies").mkdir(parents=True)
    run_dir = WORK_ROOT / f"demo-run-{os.getpid()}"
    config = DEMO / "virtbackupd.yaml"
    config.write_text(
        "libvirt_uri: qemu:///system\nstate_dir: state\nbackup_root: backups\n"
        f"runtime_dir: {run_dir}\nscratch_dir: {run_dir}-scratch\n"
        "policy_dirs: [policies]\nlog: {format: console}\n"
    )
    factory = DomainFactory(conn)
    daemon = None
    log_path = DEMO / "daemon.log"
    try:
        say("a throw-away domain: two qcow2 disks, QEMU TCG, no guest OS")
        td: GuestDomain = factory.create(qcow2_sizes=[64 * MiB, 32 * MiB])
        print(f"domain {td.name}, disks vda (64 MiB) and vdb (32 MiB) in {td.workdir}")
        (DEMO / "policies" / "demo.yaml").write_text(
            f"domains: [{td.name}]\nevents: {{on_shutdown: incremental}}\n"
            "retention: {keep_last: 2}\n"
        )
        print(f"policy {DEMO / 'policies' / 'demo.yaml'}:")
        print((DEMO / "policies" / "demo.yaml").read_text(), end="")

        say("the daemon: virtbackupd with the repository-local config")
        with log_path.open("w") as log:
            daemon = subprocess.Popen(
                [str(BIN / "virtbackupd"), "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"},
            )
        time.sleep(2)
        if daemon.poll() is not None:
            raise SystemExit(f"demo: virtbackupd exited:\n{log_path.read_text()}")
        print(f"virtbackupd pid {daemon.pid}, log {log_path}")

        guest = GuestWriter(td)
        rounds = [
            (
                "full",
                lambda: (guest.write("vda", 0, 8 * MiB, 1), guest.write("vdb", 0, 4 * MiB, 2)),
            ),
            ("incremental", lambda: guest.write("vda", 16 * MiB, 2 * MiB, 3)),
            (
                "incremental",
                lambda: (guest.zero("vda", 0, MiB), guest.write("vdb", 8 * MiB, MiB, 4)),
            ),
        ]
        known: set[str] = set()
        for i, (level, write) in enumerate(rounds, start=1):
            if i > 1:
                td.start()
            say(f"guest writes, then the domain shuts down: the daemon takes backup {i} ({level})")
            write()
            td.shutdown_hard()
            newest = wait_backup(config, known, kept=min(i, 2))
            known.add(str(newest["id"]))
            print(
                f"backup {newest['id']}: {newest['level']}, {newest['status']}, "
                f"{int(str(newest['bytes_written'])) / MiB:.1f} MiB written"
            )

        say("what an operator looks at")
        virtbackup(config, "status")
        virtbackup(config, "list")
        virtbackup(config, "checkpoints", td.name)
        print("(the first backup was pruned by keep_last: 2; the second was merged")
        print(" with it and is now standalone, so every kept point still restores)")

        say("restore the latest backup to a folder, and compare with the reference")
        out = DEMO / "restored"
        virtbackup(config, "restore", td.name, "--to", str(out), "--format", "raw")
        for d in td.data_disks:
            assert d.reference is not None
            compare(d.reference, out / f"{d.target}.raw", "raw")
            print(f"qemu-img compare {d.reference.name} {d.target}.raw: identical")

        say("verify every backup: qemu-img check, the chain, the recorded digests")
        virtbackup(config, "verify", td.name)

        say("the daemon's log lines (under systemd they go to the journal, same fields)")
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        for line in log_path.read_text().splitlines():
            keys = (
                "virtbackupd started",
                "domain stopped",
                "backup complete",
                "prune done",
                "stopping",
            )
            if any(k in line for k in keys):
                print(line)
        print("\ndemo: all good")
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        factory.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(f"{run_dir}-scratch", ignore_errors=True)
        if os.environ.get("DEMO_KEEP") != "1":
            shutil.rmtree(DEMO, ignore_errors=True)
        assert all(
            not d.name().startswith(f"{PREFIX}{os.getpid()}-") for d in conn.listAllDomains()
        )


if __name__ == "__main__":
    sys.exit(main())
