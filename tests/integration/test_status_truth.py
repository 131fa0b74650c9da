"""`virtbackup status` tells what the daemon enforces: with a policy file
broken on disk (and the daemon keeping the version it loaded), a domain's
row names the policy the daemon schedules under, with its next runs, and
flags the file on disk as rejected, naming the file and line; a file
edited and not yet reloaded is flagged as changed."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from testbed.daemon import Daemon, cli, cli_json
from testbed.domains import DomainFactory, MiB


async def test_status_shows_the_enforced_policy_and_flags_the_file_on_disk(
    domains: DomainFactory, config: Path, tmp_path: Path
) -> None:
    td = await asyncio.to_thread(domains.create, qcow2_sizes=[MiB], start=False)
    policy = config.parent / "policies" / "p.yaml"
    policy.write_text(f"domains: ['{td.name}']\nschedule: {{full: '0 3 * * *'}}\n")
    d = Daemon(config, tmp_path)
    try:
        await d.start()
        row = await _row(config, td.name)
        assert row["policy"] == str(policy)
        assert row["next_runs"]
        assert row["policy_on_disk"] is None

        # Edited, not reloaded: the daemon still runs the old version.
        policy.write_text(f"domains: ['{td.name}']\nschedule: {{full: '0 4 * * *'}}\n")
        row = await _row(config, td.name)
        assert row["policy"] == str(policy)
        assert "changed on disk" in row["policy_on_disk"]

        # Broken and reloaded: the daemon keeps the version it loaded.
        policy.write_text(f"domains: ['{td.name}']\nschedule: {{full: 'not cron'}}\n")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        await d.wait_note("reloaded")
        status = await cli_json(config, "status")
        row = next(r for r in status["domains"] if r["domain"] == td.name)
        assert row["policy"] == str(policy)
        assert row["next_runs"], "the daemon still schedules under the policy it loaded"
        assert f"{policy}:2:" in row["policy_on_disk"]
        assert "enforces the version it loaded" in row["policy_on_disk"]
        assert f"{policy}:2:" in status["policy_files"][str(policy)]
        _, text, _ = await cli(config, "status")
        assert "none governs it now" not in text, text
        assert f"policy file {policy}: rejected on disk: {policy}:2:" in text, text
        assert await d.stop() == 0
    finally:
        d.close()


async def _row(config: Path, name: str) -> dict[str, Any]:
    status = await cli_json(config, "status")
    row: dict[str, Any] = next(r for r in status["domains"] if r["domain"] == name)
    return row
