"""A restored copy gets its own host files, sockets and ports, so that it
starts beside the domain it came from (core.own_resources)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from virtbackupd.core.own_resources import MAX_SOCKET_PATH, make_own
from virtbackupd.core.restored_domain import RestoredImage, restored_domain_xml
from virtbackupd.core.untrusted_domain import HostOffer

HOST = HostOffer("/usr/bin/qemu-system-x86_64")
R = Path("/r")


def devices(xml: str) -> etree._Element:
    return etree.fromstring(f"<domain><name>x</name><devices>{xml}</devices></domain>".encode())


# (id, devices, the XPath-ish check: (element path, attribute, value), moved as str)
CASES = [
    (
        "serial-file",
        "<serial type='file'><source path='/var/log/web01.log' append='on'/>"
        "<target port='0'/></serial>",
        [
            ("devices/serial/source", "path", "/r/serial0.log"),
            ("devices/serial/source", "append", None),
        ],
        ["<serial type='file'> serial0: /var/log/web01.log -> /r/serial0.log"],
    ),
    (
        "console-mirroring-serial0-gets-the-same-file",
        "<serial type='file'><source path='/l/c.log'/><target port='0'/></serial>"
        "<console type='file'><source path='/l/c.log'/><target type='serial' port='0'/></console>",
        [("devices/console/source", "path", "/r/serial0.log")],
        ["<serial type='file'> serial0: /l/c.log -> /r/serial0.log"],
    ),
    (
        "char-log",
        "<serial type='pty'><log file='/l/s.log' append='on'/><target port='0'/></serial>",
        [
            ("devices/serial/log", "file", "/r/serial0-log.log"),
            ("devices/serial/log", "append", None),
        ],
        ["<serial type='pty'> serial0 <log>: /l/s.log -> /r/serial0-log.log"],
    ),
    (
        "sockets-numbered-per-kind",
        "<serial type='pty'><target port='0'/></serial>"
        "<serial type='unix'><source mode='bind' path='/run/s1.sock'/><target port='1'/></serial>"
        "<channel type='unix'><source mode='bind' path='/run/ga.sock'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        [
            ("devices/serial[2]/source", "path", "/r/serial1.sock"),
            ("devices/channel/source", "path", "/r/channel0.sock"),
        ],
        [
            "<serial type='unix'> serial1: /run/s1.sock -> /r/serial1.sock",
            "<channel type='unix'> channel0: /run/ga.sock -> /r/channel0.sock",
        ],
    ),
    (
        "a-socket-it-connects-to-is-not-its-own",  # left to the sanitiser, which drops it
        "<channel type='unix'><source mode='connect' path='/run/x.sock'/>"
        "<target type='virtio' name='x'/></channel>",
        [("devices/channel/source", "path", "/run/x.sock")],
        [],
    ),
    (
        "fixed-vnc-port",
        "<graphics type='vnc' port='5901' autoport='no' websocket='5701' listen='127.0.0.1'/>",
        [
            ("devices/graphics", "port", None),
            ("devices/graphics", "autoport", "yes"),
            ("devices/graphics", "websocket", "-1"),
            ("devices/graphics", "listen", "127.0.0.1"),
        ],
        ["<graphics type='vnc'>: port 5901, websocket 5701 -> automatic"],
    ),
    (
        "fixed-spice-ports",
        "<graphics type='spice' port='5902' tlsPort='5903' autoport='no'/>",
        [("devices/graphics", "tlsPort", None), ("devices/graphics", "autoport", "yes")],
        ["<graphics type='spice'>: port 5902, tlsPort 5903 -> automatic"],
    ),
    (
        "automatic-port-already",
        "<graphics type='vnc' port='5900' autoport='yes'/>",
        [("devices/graphics", "port", None), ("devices/graphics", "autoport", "yes")],
        [],
    ),
    (
        "graphics-socket",
        "<graphics type='vnc'><listen type='socket' socket='/run/vnc.sock'/></graphics>",
        [
            ("devices/graphics/listen", "socket", None),
            ("devices/graphics/listen", "type", "socket"),
        ],
        ["<graphics type='vnc'> socket: /run/vnc.sock -> libvirt's own"],
    ),
]


@pytest.mark.parametrize(("xml", "checks", "moved"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_host_resources_become_the_copys_own(
    xml: str, checks: list[tuple[str, str, str | None]], moved: list[str]
) -> None:
    root = devices(xml)
    own = make_own(root, R)
    for path, attr, value in checks:
        el = root.find(path)
        assert el is not None, path
        assert el.get(attr) == value, (path, attr, etree.tostring(root))
    assert [str(m) for m in own.moved] == moved
    assert own.dropped == ()


def test_a_socket_path_too_long_for_its_folder() -> None:
    long = Path("/" + "d" * (MAX_SOCKET_PATH - len("/serial0.sock")))
    assert len(f"{long}/serial0.sock") == MAX_SOCKET_PATH + 1
    root = devices(
        "<channel type='unix'><source mode='bind' path='/run/ga.sock'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        "<serial type='unix'><source mode='bind' path='/run/s.sock'/><target port='0'/></serial>"
    )
    own = make_own(root, long)
    # libvirt chooses a virtio channel's socket itself; a serial port's it cannot.
    channel = root.find("devices/channel/source")
    assert channel is not None and channel.get("path") is None
    assert root.find("devices/serial") is None
    assert [d.what for d in own.dropped] == ["<serial type='unix'> serial0 /run/s.sock"]
    assert "restore into a shorter folder" in own.dropped[0].why


def test_the_defined_copy_keeps_its_serial_ports_on_its_own_files() -> None:
    saved = """<domain type='qemu'><name>web01</name>
      <os><type arch='x86_64'>hvm</type></os>
      <devices>
        <disk type='file' device='disk'><source file='/i/a.qcow2'/><target dev='vda'/></disk>
        <serial type='file'><source path='/var/log/web01.log'/><target port='0'/></serial>
        <serial type='unix'><source mode='bind' path='/run/s.sock'/><target port='1'/></serial>
        <channel type='pty'><log file='/var/log/ch.log'/>
          <target type='virtio' name='org.example.0'/></channel>
        <graphics type='vnc' port='5901' autoport='no'/>
      </devices></domain>"""
    images = {"vda": RestoredImage(Path("/r/copy/vda.qcow2"), "qcow2")}
    out = restored_domain_xml(saved, "copy", images, "domain.xml", HOST)
    assert out.dropped == ()  # nothing lost: every host resource has a twin of the copy's
    root = etree.fromstring(out.xml.encode())
    assert [s.get("path") for s in root.findall("devices/serial/source")] == [
        "/r/copy/serial0.log",
        "/r/copy/serial1.sock",
    ]
    log = root.find("devices/channel/log")
    assert log is not None and log.get("file") == "/r/copy/channel0-log.log"
    assert "/var/log" not in out.xml and "/run/" not in out.xml
    assert len(out.moved) == 4


def test_the_report_names_what_the_copy_has_of_its_own() -> None:
    from virtbackupd.adapters.libvirt_conn import DomainRef
    from virtbackupd.core.own_resources import Moved
    from virtbackupd.engine.restore.define import Defined

    moved = (Moved("<graphics type='vnc'>", "port 5901", "automatic"),)
    defined = Defined(DomainRef("copy", "u"), (), (), "/usr/bin/qemu", (), moved)
    assert defined.report() == [
        "  its own (the original keeps its): <graphics type='vnc'>: port 5901 -> automatic"
    ]
    assert defined.as_json()["moved"] == [
        {"what": "<graphics type='vnc'>", "was": "port 5901", "now": "automatic"}
    ]
