"""One daemon per config: a second `virtbackupd` on the same config (an
operator running it by hand while the service runs) exits 2 naming the
first's pid before it touches anything; a daemon killed with SIGKILL
never blocks its restart."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from testbed.daemon import Daemon, cli, cli_json


async def test_a_second_daemon_exits_2_and_leaves_the_first_alone(
    config: Path, tmp_path: Path
) -> None:
    runtime = Path(config.read_text().split("runtime_dir: ")[1].split("\n")[0])
    first = Daemon(config, tmp_path)
    second = Daemon(config, tmp_path)
    third = Daemon(config, tmp_path)
    try:
        await first.start()
        assert first.proc is not None
        owner = json.loads((runtime / "daemon.json").read_text())

        await second.start(ready=False)
        code, log = await second.exited(timeout=60)
        assert code == 2, log
        assert f"pid {first.proc.pid}" in log, log
        assert "Traceback" not in log, log
        assert len(log.strip().splitlines()) == 1, log  # nothing else: no start-up at all
        assert not any("READY=1" in n for n in second.seen)

        # The first one's status file is still its own (the domains in it
        # change with other tests' domains), and `status` sees it.
        now = json.loads((runtime / "daemon.json").read_text())
        assert (now["pid"], now["started"]) == (owner["pid"], owner["started"])
        status = await cli_json(config, "status")
        assert status["daemon"]["pid"] == first.proc.pid
        _, text, _ = await cli(config, "status")
        assert f"daemon: pid {first.proc.pid}" in text, text
        # Its count is of its own backups (a CLI backup is listed below it:
        # "0 running" above a running CLI backup read as a contradiction).
        assert " of its own running, " in text, text

        # Killed: the kernel released the lock; a new daemon starts at once.
        await first.stop(signal.SIGKILL)
        await third.start()
        assert third.proc is not None
        assert (await cli_json(config, "status"))["daemon"]["pid"] == third.proc.pid
        assert await third.stop() == 0
    finally:
        first.close()
        second.close()
        third.close()
