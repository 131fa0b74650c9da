"""The backing file name inside a repository image is untrusted input
(issue 23): adapters.qcow2_reader followed an absolute name, or one that
climbs out of the chain's backup folders, so a hostile image could make
restore (as root) read a host file as a disk. A name is followed only in
the two forms the repository writes (a file beside the image, or
``../<backup folder>/<file>``) and never through a symlink; anything else
is refused in one line naming the image and the name, as a read error (not
"unsupported", which would send the chain to qemu-nbd to read instead).
Images made by qemu-img, the name written by `qemu-img rebase -u`."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from testbed.repo_builder import BuiltDomain
from testbed.tools import qemu_io, run
from virtbackupd.adapters.qcow2_reader import Qcow2Chain, Qcow2ReadError, opened
from virtbackupd.adapters.store import Store
from virtbackupd.cli.main import main

MiB = 1024 * 1024


def _image(path: Path, backing: str | None = None, fmt: str = "qcow2") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(4 * MiB))
    if backing is not None:
        # -u writes the name as given, whatever (and wherever) it is.
        run("qemu-img", "rebase", "-q", "-u", "-b", backing, "-F", fmt, path)
    return path


@pytest.fixture
def domain(tmp_path: Path) -> Path:
    """<root>/<domain>/ with a full backup's image in it."""
    d = tmp_path / "repo" / "dom"
    base = _image(d / "20261207T000000.000Z-0001" / "vda.qcow2")
    qemu_io(base, f"write -P 0x5a 0 {MiB}")
    outside = _image(tmp_path / "x")  # a qcow2 outside the repository
    qemu_io(outside, f"write -P 0x66 0 {MiB}")
    return d


@pytest.mark.parametrize(
    ("backing", "fmt"),
    [
        ("/etc/passwd", "raw"),
        ("{tmp}/x", "qcow2"),  # absolute, and a qcow2 the reader would read
        ("../../../x", "qcow2"),  # climbs out of the repository
        ("../../dom/20261207T000000.000Z-0001/vda.qcow2", "qcow2"),  # not a form we write
        ("..", "qcow2"),
        ("../20261207T000000.000Z-0001/", "qcow2"),
    ],
    ids=["/etc/passwd", "absolute qcow2", "../../../x", "a detour", "..", "a folder"],
)
def test_a_backing_name_out_of_the_chains_folders_is_refused(
    domain: Path, tmp_path: Path, backing: str, fmt: str
) -> None:
    name = backing.format(tmp=tmp_path)
    top = _image(domain / "20261207T000000.000Z-0002" / "vda.qcow2", name, fmt)
    with pytest.raises(Qcow2ReadError) as exc:
        Qcow2Chain.open(top)
    text = str(exc.value)
    assert text.startswith(f"{top}: ") and repr(name) in text, text
    assert "\n" not in text


def test_a_backing_file_that_is_a_symlink_is_refused(domain: Path, tmp_path: Path) -> None:
    """`../<id>/vda.qcow2` in the written form, but that file is a link
    to a qcow2 outside the repository."""
    link = domain / "20261207T000000.000Z-0003" / "vda.qcow2"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "x")
    top = _image(
        domain / "20261207T000000.000Z-0004" / "vda.qcow2",
        "../20261207T000000.000Z-0003/vda.qcow2",
    )
    with pytest.raises(Qcow2ReadError, match="symbolic link"):
        Qcow2Chain.open(top)


async def test_the_chains_own_relative_names_still_read(domain: Path) -> None:
    """What the repository writes (``../<parent id>/<disk>.qcow2``) and a
    name beside the image both read through to the backing data."""
    top = _image(
        domain / "20261207T000000.000Z-0002" / "vda.qcow2",
        "../20261207T000000.000Z-0001/vda.qcow2",
    )
    beside = _image(top.parent / "over.qcow2", "vda.qcow2")
    for image in (top, beside):
        with opened(image) as chain:
            assert len(chain.layers) == 3 if image == beside else 2
            buf = bytearray(4096)
            await chain.read_into(0, memoryview(buf))
            assert bytes(buf) == b"\x5a" * 4096


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["/etc/passwd", "fifo"])
async def test_restore_and_verify_refuse_the_image_before_qemu_opens_its_backing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    """Through the CLI: `qemu-img info --backing-chain`, run by restore and
    verify to list the layers, opened whatever the name said (and hung on
    a FIFO); the names are checked first."""
    b = BuiltDomain(tmp_path, {"vda": 8 * MiB})
    async with Store.open(b.state_db) as store:
        b.write("vda", 0, MiB, 0x11)
        await b.backup(store)
        b.write("vda", MiB, MiB, 0x22)
        await b.backup(store)
    if target == "fifo":
        target = str(tmp_path / "fifo")
        os.mkfifo(target)
    image = b.image(b.ids[1], "vda")
    run("qemu-img", "rebase", "-q", "-u", "-b", target, "-F", "raw", image)
    config = tmp_path / "vb.yaml"
    config.write_text(
        f"state_dir: {b.state_db.parent}\nbackup_root: {b.root}\nruntime_dir: {b.runtime}\n"
        "priority: normal\n"
    )
    to = tmp_path / "r"
    for args in (
        ["verify", b.name, "--backup", b.ids[1]],
        ["restore", b.name, "--backup", b.ids[1], "--to", str(to)],
    ):
        capsys.readouterr()
        rc = await asyncio.to_thread(main, ["-c", str(config), *args])
        out, err = capsys.readouterr()
        err = out + err  # verify's verdict is its output
        assert rc in (1, 2) and "Traceback" not in err, (args, err)
        assert f"{image}: backing file name {target!r}" in err, (args, err)
    assert not to.exists() or not any(to.iterdir())
