"""Entry point of the `virtbackup` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from virtbackupd import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtbackup",
        description="Operate virtbackupd: back up, list, restore and verify libvirt domains.",
    )
    parser.add_argument("--version", action="version", version=f"virtbackup {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="daemon config file (default: $VIRTBACKUPD_CONFIG, else "
        "/etc/virtbackupd/virtbackupd.yaml)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print machine-readable JSON instead of text"
    )
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0  # pragma: no cover - no commands yet


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
