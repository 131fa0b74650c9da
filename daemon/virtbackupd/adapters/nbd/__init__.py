"""The project's own asyncio NBD client, written from the NBD protocol
specification (NetworkBlockDevice/nbd doc/proto.md) and QEMU's
docs/interop/nbd.rst for the qemu:dirty-bitmap contexts."""
