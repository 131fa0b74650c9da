#!/usr/bin/env bash
# Bring a fresh Debian 12 host (root) to the state `make test` and `make demo`
# need: system packages, a running libvirtd, and the project's virtualenv.
# Every step checks before it acts, so running it again is cheap and safe.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

# Steps to run: any of "packages libvirtd venv" (default: all three).
steps=${*:-packages libvirtd venv}
want() { case " $steps " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

log() { printf 'bootstrap: %s\n' "$*" >&2; }

# --- 1. Debian packages ----------------------------------------------------
# One command per package we rely on; a missing one means "install all".
if want packages; then
needed_cmds=(virsh libvirtd virtlogd qemu-system-x86_64 qemu-img qemu-nbd qemu-storage-daemon nbdinfo nbdcopy nbdkit pkg-config gcc systemd-analyze
             sfdisk blkid losetup lvm e2fsck xfs_repair fsck.vfat mkfs.vfat mkfs.xfs fusefat mcopy)
missing=()
for c in "${needed_cmds[@]}"; do
    command -v "$c" >/dev/null 2>&1 || missing+=("$c")
done
[ -e /usr/share/libvirt/schemas/domainbackup.rng ] || missing+=(libvirt-schemas)
pkg-config --exists libvirt 2>/dev/null || missing+=(libvirt-dev)
[ -x /usr/bin/time ] || missing+=(time)  # the bench's peak memory (not the shell keyword)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages (missing: ${missing[*]})"
    if [ "$(id -u)" != 0 ]; then
        log "error: packages are missing and this is not root; install them as root or rerun as root"
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 \
        qemu-utils qemu-system-common libvirt-dev pkg-config gcc libnbd-bin nbdkit systemd \
        fdisk util-linux e2fsprogs xfsprogs dosfstools lvm2 fusefat mtools time >/dev/null
fi
fi

# --- 2. libvirtd -------------------------------------------------------------
# Never start a second libvirtd: it fails and removes the running one's socket
# (see shared/TESTBED.md). Only start when none is alive at all.
# virtbackupd's libvirt hook (a VM start wins over an offline backup) is
# installed first, as docs/operations.md tells operators to; a libvirtd that
# already runs is told with SIGHUP (libvirt 9.0 looks for hooks at start and
# on SIGHUP only).
if want libvirtd; then
    hook=/etc/libvirt/hooks/qemu.d/virtbackupd
    if ! cmp -s libvirt-hooks/qemu.d/virtbackupd "$hook"; then
        log "installing the libvirt hook $hook"
        install -D -m 0755 libvirt-hooks/qemu.d/virtbackupd "$hook"
        if pgrep -x libvirtd >/dev/null 2>&1; then
            pkill -HUP -x libvirtd
            sleep 1
        fi
    fi
    install -d -m 0711 /run/virtbackupd
    install -d -m 0700 /run/virtbackupd/hook
    scripts/ensure-libvirtd.sh
fi

# --- 3. virtualenv -----------------------------------------------------------
want venv || exit 0
py=${PYTHON:-}
if [ -z "$py" ]; then
    for cand in python3.11 python3.12 python3.13 python3; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            py=$cand; break
        fi
    done
fi
[ -n "$py" ] || { log "error: Python 3.11 or newer is required"; exit 1; }

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    log "creating .venv with $py"
    [ -x .venv/bin/python ] || "$py" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
