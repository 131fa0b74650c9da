#!/usr/bin/env bash
# `make test`'s pytest: the integration tests (a real libvirtd and QEMU)
# and, beside them in a second process, the tests that need no libvirtd.
# The integration tests spend most of their time waiting (for guests, for
# a schedule's minute); the others are short and CPU-bound, so running
# them alongside shortens the whole by their length. Both reports are
# printed; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
.venv/bin/pytest -m "not integration" -p no:cacheprovider "$@" >"$log" 2>&1 &
fast=$!
.venv/bin/pytest -m integration "$@"
slow_rc=$?
wait "$fast"
fast_rc=$?
echo
echo "== the tests without libvirtd (run alongside the above) =="
cat "$log"
# 5: the selection (PYTEST_ARGS) left one side without tests.
[ "$slow_rc" -eq 5 ] && slow_rc=0
[ "$fast_rc" -eq 5 ] && fast_rc=0
if [ "$slow_rc" -ne 0 ]; then exit "$slow_rc"; fi
exit "$fast_rc"
