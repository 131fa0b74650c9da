"""The real test bed: libvirtd, throw-away QEMU guests, guest writes with a
reference image, and NBD servers. See shared/TESTBED.md for what each recipe
was verified against. Nothing here imports virtbackupd: it is the oracle the
product is checked against, so it must not share the product's code.
"""
