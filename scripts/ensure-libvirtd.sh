#!/usr/bin/env bash
# Make sure libvirtd answers on qemu:///system, starting virtlogd and libvirtd
# only when none is running. Idempotent; exits non-zero if libvirtd cannot be
# reached within the deadline.
set -euo pipefail
uri=qemu:///system

answers() { virsh -c "$uri" version >/dev/null 2>&1; }
wait_for() {
    for _ in $(seq 1 60); do answers && return 0; sleep 0.5; done
    return 1
}

# /dev/kvm can exist without nested virtualisation while udev's usual
# root:kvm 0660 permission is missing (seen on these machines: root 0600).
# libvirt 9.0 then finds KVM "enabled when probing, but not available now",
# throws away its QEMU capability cache and re-probes QEMU (~36 s) on every
# defineXML. Giving /dev/kvm the permission udev would give it keeps the
# cache valid; domains of type 'qemu' still run under TCG.
if [ -c /dev/kvm ] && getent group kvm >/dev/null 2>&1 && [ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ] \
        && [ "$(stat -c %a /dev/kvm)" != 666 ]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

answers && exit 0

if pgrep -x libvirtd >/dev/null 2>&1; then
    # A libvirtd is alive but not (yet) answering: it may be starting up.
    # Starting another one would kill its socket, so wait instead.
    echo "ensure-libvirtd: libvirtd is running but not answering yet; waiting" >&2
    wait_for && exit 0
    echo "ensure-libvirtd: error: libvirtd (pid $(pgrep -x libvirtd | tr '\n' ' ')) does not answer on $uri; restart it by hand" >&2
    exit 1
fi

pgrep -x virtlogd >/dev/null 2>&1 || virtlogd -d
libvirtd -d
if ! wait_for; then
    echo "ensure-libvirtd: error: started libvirtd but it does not answer on $uri" >&2
    exit 1
fi
