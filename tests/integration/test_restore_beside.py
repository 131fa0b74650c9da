"""`restore --define NEW` of a running domain makes a copy that starts
beside the original (issue 24, item 5): the original's serial file, its
chardev log, its bound unix sockets and its fixed VNC port would each stop
the copy from starting while the original runs. The restored images equal
the oracle (qemu-img compare). `--live` makes its copy the same way."""

from __future__ import annotations

import socket
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from testbed.cli import run_cli
from testbed.domains import WORK_ROOT, DomainFactory, MiB, remove_domain
from testbed.guest import GuestWriter
from testbed.tools import run


def free_vnc_port() -> int:
    for port in range(5990, 6100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port for VNC in 5990-6099")


def with_host_resources(conn: libvirt.virConnect, name: str, work: Path, port: int) -> None:
    """Give the (shut-off) domain the host resources a copy must not share."""
    dom = conn.lookupByName(name)
    root = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    devices = root.find("devices")
    assert devices is not None
    for xml in (
        f"<serial type='file'><source path='{work}/console.log'/><target port='0'/></serial>",
        f"<serial type='unix'><source mode='bind' path='{work}/serial1.sock'/>"
        "<target port='1'/></serial>",
        f"<channel type='unix'><source mode='bind' path='{work}/agent.sock'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        f"<channel type='pty'><log file='{work}/channel.log'/>"
        "<target type='virtio' name='org.example.log.0'/></channel>",
        f"<graphics type='vnc' port='{port}' autoport='no' listen='127.0.0.1'/>",
    ):
        devices.append(etree.fromstring(xml))
    conn.defineXML(etree.tostring(root, encoding="unicode"))


def test_a_copy_of_a_running_domain_starts_beside_it(
    domains: DomainFactory,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    libvirt_conn: libvirt.virConnect,
) -> None:
    td = domains.create(qcow2_sizes=[16 * MiB], start=False)
    port = free_vnc_port()
    with_host_resources(libvirt_conn, td.name, td.workdir, port)
    td.dom = libvirt_conn.lookupByName(td.name)
    repo = td.root_folder("repo")  # QEMU reaches it for --live
    config.write_text(config.read_text().replace("backup_root: backups", f"backup_root: {repo}"))
    td.start()
    GuestWriter(td).write("vda", MiB, 2 * MiB, 0x5A)
    run_cli(config, capsys, "backup", td.name)
    copy, live_copy = f"{td.name}-copy", f"{td.name}-live"
    folder = WORK_ROOT / f"{td.name}-copy"
    # A policy whose pattern the copy's name matches: the restore says the
    # daemon will back the copy up (it is not adopted silently).
    policy = config.parent / "policies" / "copies.yaml"
    policy.write_text(f"domains: ['{td.name}-c*']\n")
    try:
        out = run_cli(config, capsys, "restore", td.name, "--to", str(folder), "--define", copy)
        assert out["defined"]["governed_by"] == [str(policy)], out["defined"]
        policy.unlink()
        new = libvirt_conn.lookupByName(copy)
        new.create()  # the original still runs
        assert td.is_running() and new.isActive()
        live = etree.fromstring(new.XMLDesc(0).encode())
        graphics = live.find("devices/graphics")
        assert graphics is not None and graphics.get("autoport") == "yes"
        assert graphics.get("port") != str(port)
        text = new.XMLDesc(0)
        assert f"{td.workdir}/" not in text
        # The serial file and the channel's log are the copy's own, in its folder.
        assert (folder / "serial0.log").exists()
        assert (folder / "serial1.sock").is_socket() and (folder / "channel0.sock").is_socket()
        defined = out["defined"]
        moved = {m["what"] for m in defined["moved"]}
        assert any("serial0" in m for m in moved), defined
        new.destroy()
        ref = td.disk("vda").reference
        assert ref is not None
        run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", folder / "vda.qcow2", ref)

        # --live defines the same way: its copy starts at once, beside the original.
        live_folder = WORK_ROOT / f"{td.name}-live"
        out = run_cli(
            config, capsys, "restore", td.name, "--to", str(live_folder), "--define", live_copy,
            "--live",
        )  # fmt: skip
        assert out["running"] and td.is_running()
        assert libvirt_conn.lookupByName(live_copy).isActive()
        assert (live_folder / "serial0.log").exists()
    finally:
        remove_domain(libvirt_conn, copy)
        remove_domain(libvirt_conn, live_copy)
