#!/usr/bin/env bash
# `make demo` (after bootstrap): the daemon backs up a throw-away domain,
# then the CLI restores and verifies it. See scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/demo.py
