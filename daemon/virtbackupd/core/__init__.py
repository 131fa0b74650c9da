"""The pure core: typed values and functions with no I/O, no clock, no libvirt."""
