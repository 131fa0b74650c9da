"""A repository is data, never code: `restore --define` from a backup whose
domain.xml was edited (an off-site copy, an NFS share) against a real
libvirtd. The edit names an emulator that would leave a marker if run,
a cdrom of /etc/shadow, a share of the host's / and a qemu:commandline.

- with the manifest's digest no longer matching, the restore is refused
  (exit 2, naming domain.xml) before anything is restored or defined;
- with --accept-edited-definition (and for a manifest from before digests)
  the domain is defined from the host's emulator, the marker never appears,
  the defined XML has none of the hostile parts, the report names each one,
  and the domain starts."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from testbed.cli import run_cli
from testbed.domains import PREFIX, WORK_ROOT, DomainFactory, MiB, remove_domain
from virtbackupd.cli.main import main as cli

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@pytest.fixture
def evil_dir() -> Iterator[Path]:
    """/var/tmp/<unique>/ with evil.sh: it leaves `marker` and then runs the
    real emulator, so a libvirt that probes it sees a working QEMU."""
    folder = Path("/var/tmp") / f"vbtest-evil-{secrets.token_hex(4)}"
    folder.mkdir()
    folder.chmod(0o777)  # libvirt probes as root or as libvirt-qemu
    script = folder / "evil.sh"
    script.write_text(f'#!/bin/sh\ntouch {folder}/marker\nexec /usr/bin/qemu-system-x86_64 "$@"\n')
    script.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def make_hostile(domain_xml: Path, evil: Path) -> None:
    """Edit the saved domain.xml as an attacker with write access to the
    repository would."""
    root = etree.fromstring(domain_xml.read_bytes())
    # A namespace can only be declared on a new element: rebuild the root.
    hostile = etree.Element(root.tag, nsmap={"qemu": QEMU_NS})
    hostile.attrib.update(root.attrib)
    hostile.extend(list(root))
    devices = hostile.find("devices")
    assert devices is not None
    emulator = devices.find("emulator")
    assert emulator is not None
    emulator.text = str(evil / "evil.sh")
    devices.append(
        etree.fromstring(
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            "<source file='/etc/shadow'/><target dev='hdd' bus='ide'/><readonly/></disk>"
        )
    )
    devices.append(
        etree.fromstring(
            "<filesystem type='mount' accessmode='passthrough'><source dir='/'/>"
            "<target dir='hostroot'/></filesystem>"
        )
    )
    cmdline = etree.SubElement(hostile, f"{{{QEMU_NS}}}commandline")
    for value in ("-fw_cfg", "name=opt/vbtest,file=/etc/shadow"):
        etree.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=value)
    domain_xml.write_bytes(etree.tostring(hostile))


def run_text(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli(["-c", str(config), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean(conn: libvirt.virConnect, name: str, evil: Path) -> None:
    xml = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    root = etree.fromstring(xml.encode())
    assert root.findtext("devices/emulator") == "/usr/bin/qemu-system-x86_64"
    assert str(evil) not in xml
    assert "/etc/shadow" not in xml
    assert root.find("devices/filesystem") is None
    assert "commandline" not in xml and QEMU_NS not in xml


def test_an_edited_domain_xml_is_refused_then_defined_without_anything_that_reaches_the_host(
    domains: DomainFactory,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    libvirt_conn: libvirt.virConnect,
    evil_dir: Path,
) -> None:
    td = domains.create(qcow2_sizes=[16 * MiB])
    backup = run_cli(config, capsys, "backup", td.name)
    folder = Path(backup["path"])
    make_hostile(folder / "domain.xml", evil_dir)
    marker = evil_dir / "marker"
    name = f"{td.name}-copy"
    images = WORK_ROOT / f"{td.name}-images"
    try:
        # The digest no longer matches: refused before anything is restored.
        rc, out, err = run_text(
            config, capsys, "restore", td.name, "--to", str(images), "--define", name
        )
        assert rc == 2, err
        assert f"{folder / 'domain.xml'}: does not match the SHA-256" in err
        assert "--accept-edited-definition" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 2
        assert not images.exists() or not any(images.iterdir())
        assert not libvirt_conn.listDefinedDomains().count(name)
        assert not marker.exists()

        # Accepted on purpose: defined, sanitised, each dropped part reported.
        rc, out, err = run_text(
            config,
            capsys,
            "restore",
            td.name,
            "--to",
            str(images),
            "--define",
            name,
            "--accept-edited-definition",
        )
        assert rc == 0, err
        assert not marker.exists(), "the stored emulator was run"
        assert_clean(libvirt_conn, name, evil_dir)
        assert "edited since the backup" in err
        left_out = [line for line in out.splitlines() if "left out (could reach the host)" in line]
        assert any("<disk device='cdrom'> hdd /etc/shadow" in line for line in left_out), out
        assert any("<filesystem type='mount'> / hostroot" in line for line in left_out), out
        assert any("<qemu:commandline>" in line for line in left_out), out
        new = libvirt_conn.lookupByName(name)
        new.create()  # what is left is a domain that runs, on the host's QEMU
        assert new.isActive()
        assert not marker.exists()
        new.destroy()
    finally:
        if name.startswith(PREFIX):
            remove_domain(libvirt_conn, name)
        shutil.rmtree(images, ignore_errors=True)

    # A manifest from before digests: used with a warning, sanitised all the same.
    manifest = folder / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["documents"]
    manifest.write_text(json.dumps(data))
    old = f"{td.name}-old"
    try:
        capsys.readouterr()
        args = ["restore", td.name, "--to", str(images), "--define", old]
        rc = cli(["-c", str(config), "--json", *args])
        out, err = capsys.readouterr()
        assert rc == 0, err
        defined = json.loads(out)["defined"]
        assert "no digest" in err and defined["warnings"]
        whats = [d["what"] for d in defined["dropped"]]
        assert "<qemu:commandline>" in whats
        assert any("/etc/shadow" in w for w in whats) and any("hostroot" in w for w in whats)
        assert defined["emulator"] == "/usr/bin/qemu-system-x86_64"
        assert_clean(libvirt_conn, old, evil_dir)
        assert not marker.exists()
    finally:
        if old.startswith(PREFIX):
            remove_domain(libvirt_conn, old)
        shutil.rmtree(images, ignore_errors=True)


def test_a_checkpoint_redefined_from_the_repository_never_runs_its_stored_emulator(
    domains: DomainFactory,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    evil_dir: Path,
) -> None:
    """checkpoint.xml embeds a whole <domain>, and libvirt runs its
    <emulator> when the checkpoint is redefined. An attacker who rewrites
    checkpoint.xml *and* its digest in the manifest gets it into the
    catalogue (reindex); when libvirt has lost the checkpoint, the next
    backup redefines it: with the domain's own current definition embedded,
    not the stored one."""
    td = domains.create(qcow2_sizes=[16 * MiB])
    first = run_cli(config, capsys, "backup", td.name)
    folder = Path(first["path"])
    cp_file = folder / "checkpoint.xml"
    cp = etree.fromstring(cp_file.read_bytes())
    emulator = cp.find("domain/devices/emulator")
    assert emulator is not None
    emulator.text = str(evil_dir / "evil.sh")
    cp_file.write_bytes(etree.tostring(cp))
    manifest = folder / "manifest.json"
    data = json.loads(manifest.read_text())
    data["documents"]["checkpoint.xml"] = hashlib.sha256(cp_file.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(data))
    # A lost catalogue, rebuilt from the (edited) repository.
    for part in (config.parent / "state").glob("state.db*"):
        part.unlink()
    run_cli(config, capsys, "reindex")
    # libvirt lost the checkpoint (its bitmap stays in the image).
    name = first["checkpoint"]
    td.dom.checkpointLookupByName(name).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)

    second = run_cli(config, capsys, "backup", td.name)
    assert second["level"] == "incremental"  # the lineage was redefined and used
    assert not (evil_dir / "marker").exists(), "the stored emulator was run"
    # Before: libvirt held the stored <domain>, evil emulator and all (and
    # runs such an emulator when the domain is shut off).
    redefined = td.dom.checkpointLookupByName(name).getXMLDesc(0)
    assert str(evil_dir) not in redefined


def test_a_live_restore_of_an_edited_domain_xml_is_refused_then_runs_sanitised(
    domains: DomainFactory,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    libvirt_conn: libvirt.virConnect,
    evil_dir: Path,
) -> None:
    """`--live` defines its domain through the same check and sanitiser."""
    td = domains.create(qcow2_sizes=[16 * MiB])
    # QEMU (libvirt-qemu) must reach the repository: not below pytest's 0700
    # temp dirs, nor in the domain's 0777 folder (root's folders only).
    repo = WORK_ROOT / f"{td.name}-repo"
    repo.mkdir(mode=0o711)
    repo.chmod(0o711)
    config.write_text(config.read_text().replace("backup_root: backups", f"backup_root: {repo}"))
    backup = run_cli(config, capsys, "backup", td.name)
    make_hostile(Path(backup["path"]) / "domain.xml", evil_dir)
    name = f"{td.name}-live"
    images = WORK_ROOT / f"{td.name}-live-images"
    args = ["restore", td.name, "--to", str(images), "--define", name, "--live"]
    try:
        rc, _, err = run_text(config, capsys, *args)
        assert rc == 2 and "domain.xml: does not match the SHA-256" in err, err
        assert not images.exists() or not any(images.iterdir())
        rc, out, err = run_text(config, capsys, *args, "--accept-edited-definition")
        assert rc == 0, err
        assert libvirt_conn.lookupByName(name).isActive()
        assert not (evil_dir / "marker").exists(), "the stored emulator was run"
        assert_clean(libvirt_conn, name, evil_dir)
        assert "left out (could reach the host): <qemu:commandline>" in out, out
        assert "/ hostroot" in out and "hdd /etc/shadow" in out
    finally:
        if name.startswith(PREFIX):
            remove_domain(libvirt_conn, name)
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(repo, ignore_errors=True)
