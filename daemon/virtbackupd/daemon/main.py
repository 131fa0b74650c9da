"""Entry point of the `virtbackupd` service."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from virtbackupd import __version__

if TYPE_CHECKING:
    from virtbackupd.daemon.service import Service


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtbackupd",
        description="Backup daemon for libvirt/QEMU hypervisors.",
        allow_abbrev=False,  # `--conf` is a typo, not `--config`
    )
    parser.add_argument("--version", action="version", version=f"virtbackupd {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="daemon config file (default: $VIRTBACKUPD_CONFIG, else "
        "/etc/virtbackupd/virtbackupd.yaml)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from virtbackupd import logs
    from virtbackupd.config.daemon import config_path
    from virtbackupd.daemon.service import Service

    try:
        return _serve(Service(config_path(args.config)))
    except Exception as exc:  # noqa: BLE001 (a bug: its traceback and a request to report it)
        # The operator's to fix (config, folders, lock file: InputError,
        # DaemonRunningError) exits 2, as a refusal; see errors.py.
        return logs.exit_status("virtbackupd", exc)


def _serve(service: Service) -> int:
    with asyncio.Runner() as runner:
        code = runner.run(service.run())
        if service.abandoned:
            # A stop that did not wait for everything (its bound, a second
            # signal): what was left may never end (a hung libvirt call, a
            # clean-up waiting on one), and closing the loop would wait for
            # it. The next start cleans up after it, as after a crash.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
