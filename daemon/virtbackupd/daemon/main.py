"""Entry point of the `virtbackupd` service."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from virtbackupd import __version__


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
    from virtbackupd.config.daemon import config_path
    from virtbackupd.daemon.service import Service
    from virtbackupd.errors import DaemonRunningError, InputError, VirtBackupError

    try:
        return asyncio.run(Service(config_path(args.config)).run())
    except (InputError, DaemonRunningError) as exc:
        # The operator's to fix (config, folders, lock file): 2, as a refusal.
        print(f"virtbackupd: {exc}", file=sys.stderr)
        return 2
    except VirtBackupError as exc:
        print(f"virtbackupd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
