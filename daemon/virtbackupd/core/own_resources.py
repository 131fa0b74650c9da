"""Giving a restored copy its own host resources, so that it can run
beside the domain it was backed up from. Pure.

A definition keeps, besides its disks, host resources only one running
domain can hold at a time: a serial or console file and a character
device's log (virtlogd refuses a file another domain writes: "Device or
resource busy"), a socket a character device binds, and a fixed VNC or
SPICE port. A copy that kept them could not start while the original
runs. So, before core.untrusted_domain looks at the definition:

- every file a character device writes (its source or its `<log>`) and
  every socket it binds becomes a file of the copy's own folder (the
  restore's `--to`), named after the device (`serial0.log`,
  `channel0.sock`, `serial0-log.log`); one host path named twice (a
  console that mirrors the first serial port) gets one new path;
- a socket whose new path would not fit a unix socket address
  (107 bytes) loses its path when libvirt can choose one itself (a virtio
  channel), and its device otherwise;
- a fixed graphics port (VNC, SPICE: port, tlsPort, websocket) is made
  automatic, and a graphics socket path is left to libvirt.

The new paths are generated here from the folder and the device's kind
and position, never taken from the stored definition: they are the
restore's own files, as the images are, and the sanitiser keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virtbackupd.core.untrusted_domain import Dropped

#: sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107

_CHAR_DEVICES = ("serial", "console", "channel", "parallel")
_FIXED_PORTS = ("port", "tlsPort")


@dataclass(frozen=True)
class Moved:
    """A host resource of the original that the copy has its own of."""

    what: str  # "<serial type='file'> serial0"
    was: str  # the original's path or port
    now: str  # the copy's path, or "automatic"

    def __str__(self) -> str:
        return f"{self.what}: {self.was} -> {self.now}"


@dataclass(frozen=True)
class OwnResources:
    moved: tuple[Moved, ...]
    dropped: tuple[Dropped, ...]
    paths: frozenset[str]  # the copy's own files, for the sanitiser


def make_own(root: etree._Element, folder: Path) -> OwnResources:
    """Rewrite `root` (a `<domain>`, in place) so that a copy defined from
    it in `folder` shares no host file, socket or fixed port with the
    domain it came from."""
    devices = root.find("devices")
    if devices is None:
        return OwnResources((), (), frozenset())
    own = _Own(folder)
    count: dict[str, int] = {}
    for dev in list(devices):  # a comment's tag is no string: matches neither
        if dev.tag in _CHAR_DEVICES:
            n = count.get(dev.tag, 0)
            count[dev.tag] = n + 1
            own.char(dev, f"{dev.tag}{n}")
        elif dev.tag == "graphics":
            own.graphics(dev)
    return OwnResources(tuple(own.moved), tuple(own.dropped), frozenset(own.new.values()))


class _Own:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.new: dict[str, str] = {}  # the original's path -> the copy's
        self.moved: list[Moved] = []
        self.dropped: list[Dropped] = []

    def _path(self, what: str, old: str, name: str) -> str:
        if old not in self.new:
            self.new[old] = str(self.folder / name)
            self.moved.append(Moved(what, old, self.new[old]))
        return self.new[old]

    def char(self, dev: etree._Element, name: str) -> None:
        kind = dev.get("type", "pty")
        what = f"<{dev.tag} type='{kind}'> {name}"
        for source in dev.findall("source"):
            old = source.get("path")
            if not old:
                continue
            if kind == "file":
                source.set("path", self._path(what, old, f"{name}.log"))
                source.attrib.pop("append", "")  # a new file, of the copy's own
            elif (
                kind == "unix"
                and source.get("mode", "bind") == "bind"
                and not self._socket(dev, source, what, old, name)
            ):
                return  # the device went
        for log in dev.findall("log"):
            old = log.get("file")
            if old:
                log.set("file", self._path(f"{what} <log>", old, f"{name}-log.log"))
                log.attrib.pop("append", "")

    def _socket(
        self, dev: etree._Element, source: etree._Element, what: str, old: str, name: str
    ) -> bool:
        """Move a bound socket into the folder; False if the device went."""
        new = str(self.folder / f"{name}.sock")
        if len(new.encode()) <= MAX_SOCKET_PATH:
            source.set("path", self._path(what, old, f"{name}.sock"))
            return True
        target = dev.find("target")
        if dev.tag == "channel" and target is not None and target.get("type") == "virtio":
            del source.attrib["path"]  # libvirt makes one of its own
            self.moved.append(Moved(what, old, "libvirt's own"))
            return True
        parent = dev.getparent()
        if parent is not None:
            parent.remove(dev)
        self.dropped.append(
            Dropped(
                f"{what} {old}",
                f"its socket in {self.folder} would be longer than a socket path may be "
                f"({MAX_SOCKET_PATH} bytes); restore into a shorter folder to keep it",
            )
        )
        return False

    def graphics(self, dev: etree._Element) -> None:
        kind = dev.get("type", "")
        what = f"<graphics type='{kind}'>"
        if kind in ("vnc", "spice"):
            fixed = [f"{a} {dev.get(a)}" for a in _FIXED_PORTS if _port(dev.get(a))]
            if dev.get("autoport") == "yes":
                fixed = []  # libvirt ignores the ports then
            for attr in _FIXED_PORTS:
                dev.attrib.pop(attr, "")
            if dev.get("autoport") is not None or fixed:
                dev.set("autoport", "yes")
            if _port(dev.get("websocket")):
                fixed.append(f"websocket {dev.get('websocket')}")
                dev.set("websocket", "-1")  # libvirt picks a free one
            if fixed:
                self.moved.append(Moved(what, ", ".join(fixed), "automatic"))
        for el in [dev, *dev.findall("listen")]:
            old = el.get("socket")
            if old:
                del el.attrib["socket"]  # libvirt makes one of its own
                self.moved.append(Moved(f"{what} socket", old, "libvirt's own"))


def _port(value: str | None) -> bool:
    """A fixed port (libvirt writes -1 or nothing for an automatic one)."""
    return value is not None and value.strip() not in ("", "-1", "0")
