"""The domain XML of a restored copy, and what of a stored definition may
reach the host (a repository is data, never code)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from virtbackupd.core.checkpoint_xml import Checkpoint, for_redefinition
from virtbackupd.core.restored_domain import RestoredImage, restored_domain_xml
from virtbackupd.core.untrusted_domain import HostOffer, guest_target, host_offer
from virtbackupd.errors import XMLError
from xmltools import child

HOST = HostOffer("/usr/bin/qemu-system-x86_64", frozenset({"/usr/share/OVMF/OVMF_CODE.fd"}))
VDA = {"vda": RestoredImage(Path("/r/vda.qcow2"), "qcow2")}

SAVED = """<domain type='kvm'>
  <name>web01</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <description>the &lt;web&gt; server</description>
  <os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram></os>
  <devices>
    <!-- the system disk -->
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg/web01'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/web01-data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/><target dev='hdc' bus='ide'/><readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/><source network='default'/>
    </interface>
  </devices>
</domain>"""


def test_new_name_no_uuid_macs_or_nvram_and_disks_on_the_restored_images() -> None:
    out = restored_domain_xml(SAVED, "web01-copy", VDA, "saved", HOST)
    root = etree.fromstring(out.xml.encode())
    assert root.findtext("name") == "web01-copy"
    assert root.find("uuid") is None
    assert root.find("os/nvram") is None
    assert root.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE.fd"  # the host's own
    assert root.find("devices/interface/mac") is None
    assert child(root, "devices/interface/source").get("network") == "default"
    assert root.findtext("description") == "the <web> server"
    disks = root.findall("devices/disk")
    vda = disks[0]
    assert vda.get("type") == "file"
    assert dict(child(vda, "source").items()) == {"file": "/r/vda.qcow2"}
    assert child(vda, "driver").get("type") == "qcow2"
    assert child(vda, "driver").get("cache") == "none"
    assert vda.find("backingStore") is None
    # vdb was not restored: a copy must not write to the original's image.
    assert out.dropped_disks == ("vdb",)
    # The cdrom's medium is a host file outside the restore: the drive stays, empty.
    assert [child(d, "target").get("dev") for d in disks] == ["vda", "hdc"]
    assert disks[1].find("source") is None
    assert [d.what for d in out.dropped] == ["<disk device='cdrom'> hdc /iso/install.iso"]
    assert root.findtext("devices/emulator") == HOST.emulator


def test_a_disk_the_domain_does_not_have_is_an_error() -> None:
    with pytest.raises(XMLError, match="no <disk> with target vdz"):
        restored_domain_xml(
            SAVED, "x", {"vdz": RestoredImage(Path("/r/vdz.raw"), "raw")}, "saved", HOST
        )


# --- hostile definitions ---------------------------------------------------------------

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def domain(os: str = "", top: str = "", devices: str = "") -> str:
    return f"""<domain type='qemu' xmlns:qemu='{QEMU_NS}'>
  <name>web01</name>
  <memory unit='KiB'>131072</memory>
  <metadata><app:note xmlns:app='http://example.org/app'>kept</app:note></metadata>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>{os}</os>
  {top}
  <devices>
    <emulator>/var/tmp/vbtest-evil/evil.sh</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='/images/a.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    {devices}
  </devices>
</domain>"""


# (id, where, snippet, a string that must be gone, what the report names)
HOSTILE = [
    (
        "ethernet-on-a-host-tap",
        "devices",
        "<interface type='ethernet'><target dev='hosttap0' managed='no'/>"
        "<model type='virtio'/></interface>",
        "hosttap0",
        "joins a host network device",
    ),
    (
        "smbios-of-the-host",
        "os",
        "<smbios mode='host'/>",
        "smbios",
        "SMBIOS",
    ),
    (
        "qemu-commandline",
        "top",
        "<qemu:commandline><qemu:arg value='-fw_cfg'/>"
        "<qemu:arg value='name=opt/x,file=/etc/shadow'/></qemu:commandline>",
        "fw_cfg",
        "<qemu:commandline>",
    ),
    (
        "qemu-override",
        "top",
        "<qemu:override><qemu:device alias='ua-x'><qemu:frontend>"
        "<qemu:property name='x' type='string' value='/etc/shadow'/>"
        "</qemu:frontend></qemu:device></qemu:override>",
        "override",
        "<qemu:override>",
    ),
    (
        "qemu-capabilities",
        "top",
        "<qemu:capabilities><qemu:del capability='sandbox'/></qemu:capabilities>",
        "sandbox",
        "<qemu:capabilities>",
    ),
    (
        "qemu-namespace-as-default",
        "top",
        f"<commandline xmlns='{QEMU_NS}'><arg value='-runas'/></commandline>",
        "-runas",
        "<qemu:commandline>",
    ),
    (
        "filesystem-share-of-root",
        "devices",
        "<filesystem type='mount' accessmode='passthrough'>"
        "<source dir='/'/><target dir='host_root'/></filesystem>",
        "host_root",
        "<filesystem type='mount'> / host_root",
    ),
    (
        "hostdev",
        "devices",
        "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
        "<address domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/></source></hostdev>",
        "hostdev",
        "<hostdev type='pci'>",
    ),
    (
        "smartcard-host-certificates",
        "devices",
        "<smartcard mode='host-certificates'><certificate>c1</certificate>"
        "<database>/etc/pki/nssdb/</database></smartcard>",
        "nssdb",
        "<smartcard",
    ),
    (
        "redirdev",
        "devices",
        "<redirdev bus='usb' type='tcp'><source mode='connect' host='127.0.0.1' "
        "service='4000'/></redirdev>",
        "redirdev",
        "<redirdev type='tcp'>",
    ),
    (
        "cdrom-of-etc-shadow",
        "devices",
        "<disk type='file' device='cdrom'><source file='/etc/shadow'/>"
        "<target dev='hdc' bus='ide'/><readonly/></disk>",
        "/etc/shadow",
        "<disk device='cdrom'> hdc /etc/shadow",
    ),
    (
        "floppy",
        "devices",
        "<disk type='file' device='floppy'><source file='/root/.ssh/id_rsa'/>"
        "<target dev='fda' bus='fdc'/></disk>",
        "id_rsa",
        "<disk device='floppy'> fda /root/.ssh/id_rsa",
    ),
    (
        "read-only-host-block-device",
        "devices",
        "<disk type='block' device='disk'><source dev='/dev/sda'/>"
        "<target dev='vdc' bus='virtio'/><readonly/></disk>",
        "/dev/sda",
        "<disk device='disk'> vdc /dev/sda",
    ),
    (
        "network-cdrom",
        "devices",
        "<disk type='network' device='cdrom'><source protocol='nbd' name='e'>"
        "<host name='127.0.0.1' port='10809'/></source><target dev='hdd' bus='ide'/>"
        "<readonly/></disk>",
        "10809",
        "<disk device='cdrom'> hdd",
    ),
    ("kernel", "os", "<kernel>/boot/vmlinuz-evil</kernel>", "vmlinuz", "<os><kernel>"),
    ("initrd", "os", "<initrd>/etc/shadow</initrd>", "/etc/shadow", "<os><initrd>"),
    ("dtb", "os", "<dtb>/etc/shadow</dtb>", "/etc/shadow", "<os><dtb>"),
    (
        "foreign-loader",
        "os",
        "<loader readonly='yes' type='pflash'>/var/tmp/evil.fd</loader>",
        "evil.fd",
        "<os><loader> /var/tmp/evil.fd",
    ),
    (
        "nvram-template",
        "os",
        "<nvram template='/etc/shadow'>/var/lib/libvirt/qemu/nvram/x_VARS.fd</nvram>",
        "/etc/shadow",
        None,  # <nvram> always goes: the copy gets its own store
    ),
    (
        "acpi-table",
        "os",
        "<acpi><table type='slic'>/etc/shadow</table></acpi>",
        "/etc/shadow",
        "<os><acpi><table>",
    ),
    ("bootloader", "os", "<bootloader>/usr/bin/evil</bootloader>", "evil", "<os><bootloader>"),
    (
        "fw-cfg-file",
        "top",
        "<sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo>",
        "/etc/shadow",
        "<sysinfo><entry file='/etc/shadow'>",
    ),
    (
        "static-root-seclabel",
        "top",
        "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>",
        "+0:+0",
        "<seclabel type='static' model='dac'>",
    ),
    (
        "serial-to-file",
        "devices",
        "<serial type='file'><source path='/etc/cron.d/evil'/><target port='0'/></serial>",
        "cron.d",
        "/etc/cron.d/evil -> /r/serial0.log",  # the copy's own file (core.own_resources)
    ),
    (
        "serial-on-host-device",
        "devices",
        "<serial type='dev'><source path='/dev/sda'/><target port='0'/></serial>",
        "/dev/sda",
        "<serial type='dev'> /dev/sda",
    ),
    (
        "parallel-pipe",
        "devices",
        "<parallel type='pipe'><source path='/tmp/evil'/><target port='0'/></parallel>",
        "/tmp/evil",
        "<parallel type='pipe'>",
    ),
    (
        "console-to-file",
        "devices",
        "<console type='file'><source path='/etc/motd'/><target type='serial'/></console>",
        "/etc/motd",
        "/etc/motd -> /r/console0.log",
    ),
    (
        "channel-connects-to-host-socket",
        "devices",
        "<channel type='unix'><source mode='connect' path='/run/docker.sock'/>"
        "<target type='virtio' name='x'/></channel>",
        "docker.sock",
        "<channel type='unix'> connect /run/docker.sock",
    ),
    (
        "channel-bound-on-a-host-path",
        "devices",
        "<channel type='unix'><source mode='bind' path='/etc/evil.sock'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        "/etc/evil.sock",
        "/etc/evil.sock -> /r/channel0.sock",
    ),
    (
        "serial-on-host-tcp-port",
        "devices",
        "<serial type='tcp'><source mode='bind' host='0.0.0.0' service='2445'/>"
        "<protocol type='raw'/><target port='1'/></serial>",
        "2445",
        "<serial type='tcp'>",
    ),
    (
        "char-log-file",
        "devices",
        "<serial type='pty'><log file='/etc/passwd' append='on'/><target port='0'/></serial>",
        "/etc/passwd",
        "/etc/passwd -> /r/serial0-log.log",
    ),
    (
        "interface-script",
        "devices",
        "<interface type='ethernet'><script path='/var/tmp/evil.sh'/>"
        "<model type='virtio'/></interface>",
        "evil.sh",
        "<script>",
    ),
    (
        "interface-vhostuser",
        "devices",
        "<interface type='vhostuser'><source type='unix' path='/run/x.sock' mode='client'/>"
        "<model type='virtio'/></interface>",
        "/run/x.sock",
        "<interface type='vhostuser'>",
    ),
    (
        "interface-hostdev",
        "devices",
        "<interface type='hostdev'><source><address type='pci' domain='0x0000' "
        "bus='0x03' slot='0x10' function='0x1'/></source></interface>",
        "hostdev",
        "<interface type='hostdev'>",
    ),
    (
        "option-rom-from-host",
        "devices",
        "<interface type='network'><source network='default'/>"
        "<rom file='/var/tmp/evil.rom'/></interface>",
        "evil.rom",
        "<rom file='/var/tmp/evil.rom'>",
    ),
    (
        "evdev-input",
        "devices",
        "<input type='evdev'><source dev='/dev/input/event0'/></input>",
        "event0",
        "<input type='evdev'>",
    ),
    (
        "tpm-passthrough",
        "devices",
        "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/>"
        "</backend></tpm>",
        "/dev/tpm0",
        "<tpm>",
    ),
    (
        "shmem",
        "devices",
        "<shmem name='other-guest'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>",
        "other-guest",
        "<shmem>",
    ),
    (
        "nvdimm-on-a-host-file",
        "devices",
        "<memory model='nvdimm'><source><path>/etc/shadow</path></source>"
        "<target><size unit='KiB'>524288</size><node>0</node></target></memory>",
        "/etc/shadow",
        "<memory>",
    ),
    (
        "audio-to-a-host-file",
        "devices",
        "<audio id='1' type='file' path='/etc/evil.wav'/>",
        "/etc/evil.wav",
        "<audio type='file'>",
    ),
    (
        "rng-from-a-host-disk",
        "devices",
        "<rng model='virtio'><backend model='random'>/dev/sda</backend></rng>",
        "/dev/sda",
        "names the host path /dev/sda",
    ),
    (
        "rng-egd-over-tcp",
        "devices",
        "<rng model='virtio'><backend model='egd' type='tcp'><source mode='connect' "
        "host='127.0.0.1' service='708'/></backend></rng>",
        "708",
        "<rng>",
    ),
    (
        "lease",
        "devices",
        "<lease><lockspace>x</lockspace><key>k</key><target path='/etc/shadow'/></lease>",
        "/etc/shadow",
        "<lease>",
    ),
    (
        "graphics-on-a-host-socket",
        "devices",
        "<graphics type='vnc' socket='/etc/evil.sock'/>",
        "evil.sock",
        "/etc/evil.sock -> libvirt's own",
    ),
    (
        "unknown-device-kind",
        "devices",
        "<futuredevice><source path='/etc/shadow'/></futuredevice>",
        "futuredevice",
        "<futuredevice>",
    ),
    (
        "a-host-path-anywhere-else",
        "devices",
        "<controller type='usb' model='qemu-xhci'><driver queues='/etc/shadow'/></controller>",
        "/etc/shadow",
        "names the host path /etc/shadow",
    ),
]


@pytest.mark.parametrize(
    ("where", "snippet", "gone", "reported"),
    [pytest.param(*h[1:], id=h[0]) for h in HOSTILE],
)
def test_what_could_reach_the_host_is_dropped_and_reported(
    where: str, snippet: str, gone: str, reported: str | None
) -> None:
    saved = domain(**{where: snippet})
    assert gone in saved
    out = restored_domain_xml(saved, "copy", VDA, "domain.xml", HOST)
    assert gone not in out.xml
    assert "evil.sh" not in out.xml  # the stored emulator never survives
    root = etree.fromstring(out.xml.encode())
    assert root.findtext("devices/emulator") == HOST.emulator
    assert child(root, "devices/disk/source").get("file") == "/r/vda.qcow2"
    assert root.find("metadata") is not None  # opaque, kept
    if reported is not None:
        # Dropped, or (a file, socket or port the copy may have) made its own.
        found = [str(d) for d in (*out.dropped, *out.moved)]
        assert any(reported in d for d in found), found
    else:
        assert out.dropped == ()


BENIGN = domain(
    os="<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><boot dev='hd'/>",
    top="<seclabel type='dynamic' model='dac' relabel='yes'/>"
    "<features><acpi/><apic/></features><clock offset='utc'/>",
    devices="""
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
    <controller type='usb' model='qemu-xhci'/>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
    <interface type='bridge'><source bridge='br0'/><model type='virtio'/></interface>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <input type='tablet' bus='usb'/>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/></graphics>
    <audio id='1' type='none'/>
    <video><model type='virtio' heads='1'/></video>
    <watchdog model='i6300esb' action='reset'/>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <panic model='isa'/>
    <vsock model='virtio'><cid auto='yes'/></vsock>
    """,
)


def test_an_ordinary_guest_keeps_all_its_hardware_and_nothing_is_reported() -> None:
    out = restored_domain_xml(BENIGN, "copy", VDA, "domain.xml", HOST)
    assert out.dropped == ()
    assert out.dropped_disks == ()
    root = etree.fromstring(out.xml.encode())
    assert root.findtext("devices/emulator") == HOST.emulator
    assert root.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE.fd"
    kept = [el.tag for el in child(root, "devices")]
    before = [el.tag for el in child(etree.fromstring(BENIGN.encode()), "devices")]
    assert kept == before
    assert child(root, "devices/rng/backend").text == "/dev/urandom"
    agent = root.find("devices/channel/source")
    assert agent is not None and agent.get("path") is None
    # The plain dynamic label is what libvirt gives every domain anyway.
    assert root.find("seclabel") is None


def test_direct_kernel_boot_loses_its_arguments_with_its_kernel() -> None:
    saved = domain(os="<kernel>/boot/k</kernel><initrd>/boot/i</initrd><cmdline>quiet</cmdline>")
    out = restored_domain_xml(saved, "copy", VDA, "domain.xml", HOST)
    root = etree.fromstring(out.xml.encode())
    assert root.find("os/cmdline") is None
    assert [d.what for d in out.dropped] == ["<os><kernel> /boot/k", "<os><initrd> /boot/i"]


def test_a_dropped_audio_back_end_becomes_none_so_sound_cards_keep_their_reference() -> None:
    saved = domain(
        devices="<sound model='ich9'><audio id='1'/></sound>"
        "<audio id='1' type='alsa'><input dev='/dev/snd/x'/></audio>"
    )
    out = restored_domain_xml(saved, "copy", VDA, "domain.xml", HOST)
    audio = child(etree.fromstring(out.xml.encode()), "devices/audio")
    assert dict(audio.items()) == {"id": "1", "type": "none"} and len(audio) == 0


def test_the_guest_target_is_read_to_ask_the_host_for_its_emulator() -> None:
    target = guest_target(domain(), "domain.xml")
    assert (target.virt_type, target.arch, target.machine) == ("qemu", "x86_64", "pc-i440fx-7.2")
    bare = guest_target("<domain><name>x</name></domain>", "domain.xml")
    assert (bare.virt_type, bare.arch, bare.machine) == (None, None, None)


CAPS = """<domainCapabilities>
  <path>/usr/bin/qemu-system-x86_64</path><domain>qemu</domain>
  <machine>pc-i440fx-7.2</machine><arch>x86_64</arch>
  <os supported='yes'><loader supported='yes'>
    <value>/usr/share/OVMF/OVMF_CODE.fd</value><value>/usr/share/OVMF/OVMF_CODE.secboot.fd</value>
    <enum name='type'><value>rom</value><value>pflash</value></enum>
  </loader></os>
</domainCapabilities>"""


def test_the_hosts_emulator_and_firmware_come_from_its_domain_capabilities() -> None:
    offer = host_offer(CAPS, "caps")
    assert offer.emulator == "/usr/bin/qemu-system-x86_64"
    assert offer.loaders == {
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_CODE.secboot.fd",
    }
    with pytest.raises(XMLError, match="no emulator <path>"):
        host_offer("<domainCapabilities><arch>x86_64</arch></domainCapabilities>", "caps")


def test_a_checkpoint_is_redefined_around_the_domains_current_definition() -> None:
    stored = (
        "<domaincheckpoint><name>cp1</name><parent><name>cp0</name></parent>"
        "<creationTime>17</creationTime><disks><disk name='vda' checkpoint='bitmap' "
        "bitmap='cp1'/></disks>" + domain() + "</domaincheckpoint>"
    )
    current = "<domain type='qemu'><name>web01</name></domain>"
    out = Checkpoint.from_xml(for_redefinition(stored, current, "stored"))
    before = Checkpoint.from_xml(stored)
    assert (out.name, out.parent, out.creation_time, out.disks) == (
        before.name,
        before.parent,
        before.creation_time,
        before.disks,
    )
    assert out.domain_xml is not None and "evil.sh" not in out.domain_xml
    assert "<name>web01</name>" in out.domain_xml


@pytest.mark.parametrize(("known", "parent"), [({"cp0"}, "cp0"), (set(), None)])
def test_a_redefined_checkpoint_names_its_parent_only_if_libvirt_knows_it(
    known: set[str], parent: str | None
) -> None:
    """A parent pruned since (libvirt refuses an unknown parent) is left out."""
    stored = (
        "<domaincheckpoint><name>cp1</name><parent><name>cp0</name></parent>"
        "<creationTime>17</creationTime><disks><disk name='vda' checkpoint='bitmap' "
        "bitmap='cp1'/></disks>" + domain() + "</domaincheckpoint>"
    )
    current = "<domain type='qemu'><name>web01</name></domain>"
    out = for_redefinition(stored, current, "stored", keep_parent=lambda p: p in known)
    assert Checkpoint.from_xml(out).parent == parent
