#!/usr/bin/env bash
# `make demo`: for now shows that both commands are installed and answer.
# The full demonstration (a domain, the daemon, backups, a restore) comes with
# the restore issue.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
echo "\$ virtbackupd --version"
"$bin/virtbackupd" --version
echo
echo "\$ virtbackup --help"
"$bin/virtbackup" --help
