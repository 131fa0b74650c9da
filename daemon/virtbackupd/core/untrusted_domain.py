"""What of a stored domain definition may reach the host, and taking it out.
Pure.

A repository is data, never code: its domain.xml may have been edited
(an off-site copy, an NFS share, a restore on another host), and libvirt
acts on a definition as soon as it is defined or started — it probes the
`<emulator>` by running it, opens files and devices for QEMU, relabels and
chowns them, and passes `<qemu:commandline>` straight to QEMU. So a
definition read back from a backup keeps the guest's hardware and loses,
with a line in the report for each, everything that names or opens
something of the host:

- the emulator is the host's own, from libvirt's domain capabilities;
- elements in any XML namespace outside `<metadata>` (qemu:commandline,
  qemu:override, qemu:capabilities, ...);
- `<seclabel>`: the host's default confinement applies;
- `<os>` kernel, initrd, dtb, ACPI tables, bootloaders, and a loader that is
  not one of the host's firmware images; fw_cfg entries read from files;
- devices that pass host resources through (filesystem, hostdev,
  smartcard, redirdev, shmem, lease, host-file memory, passthrough input,
  passthrough TPM) and any device kind not known to be harmless;
- character devices on host files, devices, pipes, network ports or
  sockets it connects to (a socket libvirt creates itself is kept with the
  path left to libvirt), and their log files: those that
  core.own_resources moved into the restore's own folder are the
  restore's files (`allowed`) and stay;
- interfaces that hand a host device or socket to the guest, and interface
  scripts, backends and option ROMs;
- audio back-ends that reach host sound devices or files (made ``none``);
- then, as a net under all of these, any element left that names an
  absolute path other than the restored images, the host's emulator and
  firmware, and the host's random devices.

Disks are the caller's (core.restored_domain): it knows which are the
restore's own files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lxml import etree

from virtbackupd.core import xmldoc
from virtbackupd.errors import XMLError

#: Device elements that carry no host resource by their kind. Anything else
#: under <devices> is dropped: a kind this list does not know may open one.
KEPT_DEVICES = frozenset(
    {
        "disk",
        "controller",
        "interface",
        "input",
        "graphics",
        "video",
        "sound",
        "audio",
        "watchdog",
        "memballoon",
        "rng",
        "panic",
        "serial",
        "console",
        "channel",
        "parallel",
        "tpm",
        "vsock",
        "iommu",
        "redirfilter",
        "hub",
        "crypto",
        "memory",
        "emulator",
    }
)

_DEVICE_WHY = {
    "filesystem": "shares a host folder with the guest",
    "hostdev": "passes a host device to the guest",
    "smartcard": "passes the host's smartcard or certificates to the guest",
    "redirdev": "redirects a host USB device to the guest",
    "shmem": "shares memory with the host and other guests",
    "lease": "takes a lock file on the host",
}

#: Host sources of random numbers a guest may read; any other is a host file.
RANDOM_DEVICES = frozenset({"/dev/random", "/dev/urandom", "/dev/hwrng"})

_CHAR_DEVICES = ("serial", "console", "channel", "parallel")
_CHAR_ON_HOST = {
    "file": "writes a host file",
    "dev": "opens a host device",
    "pipe": "opens a host pipe",
    "tcp": "opens a host network port",
    "udp": "opens a host network port",
    "stdio": "writes to QEMU's standard output on the host",
    "nmdm": "opens a host device",
}
#: Interfaces that hand the guest a host device, a host socket or a host port.
_INTERFACE_ON_HOST = frozenset({"hostdev", "vhostuser", "vdpa", "server", "client", "mcast", "udp"})
_PREFIXES = {"http://libvirt.org/schemas/domain/qemu/1.0": "qemu"}  # for the report
_SILENT_AUDIO = frozenset({"none", "spice", "dbus"})
_OS_FILES = ("kernel", "initrd", "dtb", "bootloader", "bootloader_args", "init", "initarg")


@dataclass(frozen=True)
class Dropped:
    """One thing taken out of a stored definition, and why."""

    what: str
    why: str

    def __str__(self) -> str:
        return f"{self.what}: {self.why}"


@dataclass(frozen=True)
class GuestTarget:
    """What to ask the host's domain capabilities for (None: the host's default)."""

    virt_type: str | None
    arch: str | None
    machine: str | None


@dataclass(frozen=True)
class HostOffer:
    """The host's own files for a guest of one target: its emulator and the
    firmware images libvirt offers (from virConnectGetDomainCapabilities)."""

    emulator: str
    loaders: frozenset[str] = field(default_factory=frozenset)


def guest_target(saved_xml: str, document: str) -> GuestTarget:
    root = xmldoc.parse(saved_xml, document, "domain")
    os_type = root.find("os/type")
    return GuestTarget(
        root.get("type"),
        None if os_type is None else os_type.get("arch"),
        None if os_type is None else os_type.get("machine"),
    )


def host_offer(caps_xml: str, document: str) -> HostOffer:
    """Read libvirt's `<domainCapabilities>`: `<path>` is the emulator,
    `<os><loader><value>` the firmware images."""
    root = xmldoc.parse(caps_xml, document, "domainCapabilities")
    path = (root.findtext("path") or "").strip()
    if not path.startswith("/"):
        raise XMLError(document, f"no emulator <path> (found {path!r})")
    loaders = {(v.text or "").strip() for v in root.findall("os/loader/value")}
    return HostOffer(path, frozenset(x for x in loaders if x.startswith("/")))


class Sanitiser:
    """Takes out of one parsed `<domain>` what may reach the host; the
    caller has already set the restored disks' sources (`allowed`)."""

    def __init__(self, root: etree._Element, host: HostOffer, allowed: Iterable[str]) -> None:
        self.root = root
        self.host = host
        self.allowed = {*allowed, host.emulator, *host.loaders, *RANDOM_DEVICES}
        self.dropped: list[Dropped] = []

    def run(self) -> list[Dropped]:
        self._namespaced()
        self._seclabels()
        self._os()
        self._sysinfo()
        self._smbios()
        self._devices()
        self._paths()
        etree.cleanup_namespaces(self.root)
        return self.dropped

    def _drop(self, el: etree._Element, what: str, why: str) -> None:
        parent = el.getparent()
        if parent is not None:
            parent.remove(el)
        self.dropped.append(Dropped(what, why))

    def _namespaced(self) -> None:
        # libvirt reads its extensions (qemu:commandline, qemu:override,
        # lxc:namespace, ...) from namespaced elements; <metadata> is opaque.
        for el in list(self.root.iter()):
            if not isinstance(el.tag, str) or not el.tag.startswith("{"):
                continue
            if any(a.tag == "metadata" for a in el.iterancestors()):
                continue
            if el.getparent() is None or _gone(el, self.root):
                continue
            qname = etree.QName(el)
            prefix = el.prefix or _PREFIXES.get(qname.namespace or "", qname.namespace)
            self._drop(el, f"<{prefix}:{qname.localname}>", "hands options straight to the host")

    def _seclabels(self) -> None:
        for el in list(self.root.iter("seclabel")):
            # A plain dynamic label is what libvirt gives every domain anyway.
            plain = el.get("type", "dynamic") == "dynamic" and len(el) == 0
            parent = el.getparent()
            if parent is None:
                continue
            parent.remove(el)
            if not plain:
                self.dropped.append(
                    Dropped(
                        f"<seclabel type='{el.get('type', '')}' model='{el.get('model', '')}'>",
                        "sets how QEMU is confined on the host; the host's default applies",
                    )
                )

    def _os(self) -> None:
        os_el = self.root.find("os")
        if os_el is None:
            return
        for tag in _OS_FILES:
            for el in os_el.findall(tag):
                self._drop(el, f"<os><{tag}> {_text(el)}", "a file on the host")
        if os_el.find("kernel") is None:
            for el in os_el.findall("cmdline"):
                os_el.remove(el)  # the kernel's arguments, meaningless without it
        for el in os_el.findall("acpi/table"):
            self._drop(el, f"<os><acpi><table> {_text(el)}", "a file on the host")
        for el in os_el.findall("loader"):
            path = _text(el)
            if path and path not in self.host.loaders:
                self._drop(el, f"<os><loader> {path}", "not one of the host's firmware images")

    def _smbios(self) -> None:
        for el in self.root.findall("os/smbios"):
            if el.get("mode") == "host":
                self._drop(
                    el, "<os><smbios mode='host'>", "shows the host's SMBIOS data to the guest"
                )

    def _sysinfo(self) -> None:
        for el in self.root.findall("sysinfo/entry"):
            if el.get("file") is not None:
                self._drop(el, f"<sysinfo><entry file='{el.get('file')}'>", "a file on the host")

    def _devices(self) -> None:
        devices = self.root.find("devices")
        if devices is None:
            devices = etree.SubElement(self.root, "devices")
        for el in devices.findall("emulator"):
            devices.remove(el)
        emulator = etree.Element("emulator")
        emulator.text = self.host.emulator
        devices.insert(0, emulator)
        for dev in list(devices):
            if not isinstance(dev.tag, str) or dev.tag == "emulator":
                continue
            if dev.tag not in KEPT_DEVICES:
                why = _DEVICE_WHY.get(dev.tag, "a device kind not known to be harmless")
                self._drop(dev, _describe(dev), why)
                continue
            self._device(devices, dev)
        for rom in list(devices.iter("rom")):
            if rom.get("file") is not None:
                self._drop(rom, f"<rom file='{rom.get('file')}'>", "an option ROM from the host")

    # C901: one branch per device kind the sanitiser allows; a table would hide the checks
    def _device(self, devices: etree._Element, dev: etree._Element) -> None:  # noqa: C901 (see above)
        kind = dev.get("type", "")
        what = _describe(dev)
        if dev.tag in _CHAR_DEVICES:
            self._char(dev, what)
        elif dev.tag == "interface":
            if kind in _INTERFACE_ON_HOST:
                self._drop(dev, what, "hands a host device or socket to the guest")
                return
            target = dev.find("target")
            if kind == "ethernet" and target is not None and target.get("dev"):
                # Names a host tap (managed='no': joins one that exists).
                self._drop(dev, f"{what} {target.get('dev')}", "joins a host network device")
                return
            for tag in ("script", "downscript", "backend"):
                for el in dev.findall(tag):
                    self._drop(el, f"{what} <{tag}>", "runs or opens something on the host")
        elif dev.tag == "input" and kind in ("passthrough", "evdev"):
            self._drop(dev, what, "passes a host input device to the guest")
        elif dev.tag == "tpm":
            backend = dev.find("backend")
            if backend is not None and backend.get("type") != "emulator":
                self._drop(dev, what, "passes the host's TPM to the guest")
        elif dev.tag == "memory" and dev.find("source/path") is not None:
            self._drop(dev, what, "maps a host file as guest memory")
        elif dev.tag == "audio" and kind not in _SILENT_AUDIO:
            for child in list(dev):
                dev.remove(child)
            for attr in [a for a in dev.attrib if a not in ("id", "type")]:
                del dev.attrib[attr]
            dev.set("type", "none")
            self.dropped.append(Dropped(what, "plays to or records from the host: made 'none'"))
        elif dev.tag == "rng":
            backend = dev.find("backend")
            if backend is not None and backend.get("model") == "egd":
                self._char(backend, what, device=dev)
        self._logs(dev, what)

    def _logs(self, el: etree._Element, what: str) -> None:
        for log in el.findall("log"):
            if log.get("file") not in self.allowed:  # else the restore's own (core.own_resources)
                self._drop(log, f"{what} <log file='{log.get('file', '')}'>", "writes a host file")

    def _char(self, el: etree._Element, what: str, device: etree._Element | None = None) -> None:
        """A character device (or an egd back-end, inside `device`)."""
        whole = el if device is None else device
        kind = el.get("type", "pty")
        if kind == "file" and self._own_files(el):
            pass  # writes only the restore's own files (core.own_resources)
        elif kind in _CHAR_ON_HOST:
            self._drop(whole, what, _CHAR_ON_HOST[kind])
        elif kind == "unix":
            for source in el.findall("source"):
                if source.get("mode", "bind") != "bind":
                    self._drop(whole, what, "connects to a host socket")
                    return
                if source.get("path") is not None and source.get("path") not in self.allowed:
                    # libvirt makes its own socket for a bind without a path.
                    del source.attrib["path"]
                    self.dropped.append(
                        Dropped(f"{what} socket path", "a host path; libvirt chooses its own")
                    )
        self._logs(el, what)

    def _own_files(self, el: etree._Element) -> bool:
        paths = [s.get("path") for s in el.findall("source")]
        return bool(paths) and all(p in self.allowed for p in paths)

    def _paths(self) -> None:
        """The net under the rules above: any absolute path left, in an
        attribute or an element's text, that is not the restore's own."""
        for el in list(self.root.iter()):
            if not isinstance(el.tag, str) or _gone(el, self.root):
                continue
            if el.tag in ("metadata", "description", "title") or any(
                a.tag == "metadata" for a in el.iterancestors()
            ):
                continue
            paths = [v for v in _values(el) if v.startswith("/")]
            text = _text(el)
            if text.startswith("/") and not (el.tag == "partition" and text.startswith("/machine")):
                paths.append(text)
            for path in paths:
                if path not in self.allowed:
                    top = _top(el, self.root)
                    self._drop(top, _describe(top), f"names the host path {path}")
                    break


def _gone(el: etree._Element, root: etree._Element) -> bool:
    """An element of a subtree that was already removed."""
    top = el
    while (parent := top.getparent()) is not None:
        top = parent
    return top is not root


def _top(el: etree._Element, root: etree._Element) -> etree._Element:
    """The device `el` belongs to (a child of <devices>), or `el` itself
    outside <devices>."""
    chain = [el, *el.iterancestors()]
    for i, a in enumerate(chain):
        if a.tag == "devices" and a.getparent() is root:
            return chain[i - 1]
    return el


def _values(el: etree._Element) -> list[str]:
    return [str(v) for v in el.attrib.values()]


def _text(el: etree._Element) -> str:
    return (el.text or "").strip()


def _describe(dev: etree._Element) -> str:
    """`<filesystem type='mount'> / -> host_root`: enough to find it again."""
    head = f"<{dev.tag}" + (f" type='{dev.get('type')}'" if dev.get("type") else "") + ">"
    source = dev.find("source")
    detail = []
    if source is not None:
        detail += [v for v in _values(source) if v]
    target = dev.find("target")
    if target is not None:
        detail += [str(target.get(k)) for k in ("dir", "dev", "name", "path") if target.get(k)]
    if not detail and _text(dev):
        detail.append(_text(dev))
    return " ".join([head, *detail[:3]])
