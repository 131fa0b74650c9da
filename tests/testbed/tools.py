"""Thin wrappers around the command-line tools the test bed uses as oracles."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .domains import GuestDomain


def run(*args: str | Path, timeout: float = 120, check: bool = True) -> str:
    """Run a command; on failure raise with its stderr so the test says why."""
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc.stdout


def nbd_unix_uri(socket: str | Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={socket}"


@dataclass(frozen=True)
class MapEntry:
    offset: int
    length: int
    type: int
    description: str

    @property
    def end(self) -> int:
        return self.offset + self.length


def nbdinfo_map(uri: str, context: str | None = None) -> list[MapEntry]:
    """Extent map of an export as `nbdinfo --map` (libnbd) reports it."""
    opt = f"--map={context}" if context else "--map"
    out = run("nbdinfo", "--json", opt, uri)
    return [
        MapEntry(e["offset"], e["length"], e["type"], e.get("description", ""))
        for e in json.loads(out)
    ]


def ranges_where(entries: list[MapEntry], description: str) -> list[tuple[int, int]]:
    """Merged [start, end) ranges of the entries with the given description."""
    out: list[tuple[int, int]] = []
    for e in entries:
        if e.description != description:
            continue
        if out and out[-1][1] == e.offset:
            out[-1] = (out[-1][0], e.end)
        else:
            out.append((e.offset, e.end))
    return out


def qemu_img_compare(
    a: str | Path, b: str | Path, fmt_a: str | None = None, fmt_b: str | None = None
) -> None:
    """Assert two images have identical guest-visible content (`qemu-img compare`)."""
    args: list[str | Path] = ["qemu-img", "compare"]
    if fmt_a:
        args += ["-f", fmt_a]
    if fmt_b:
        args += ["-F", fmt_b]
    proc = subprocess.run(
        [str(x) for x in [*args, a, b]], capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"images differ or cannot be compared: {a} vs {b}\n{proc.stdout}{proc.stderr}"
        )


def qemu_img_info(path: str | Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(run("qemu-img", "info", "-U", "--output=json", path))
    return info


def flip_byte(image: Path, guest_offset: int) -> None:
    """Flip one byte of the data cluster `image` itself holds for `guest_offset`."""
    for e in json.loads(run("qemu-img", "map", "--output=json", image)):
        if e["depth"] == 0 and e["data"] and e["start"] <= guest_offset < e["start"] + e["length"]:
            host = e["offset"] + guest_offset - e["start"]
            with image.open("r+b") as f:
                f.seek(host)
                b = f.read(1)
                f.seek(host)
                f.write(bytes([b[0] ^ 0x40]))
            return
    raise AssertionError(f"{image} holds no data at {guest_offset}")


def qemu_io(image: str | Path, *commands: str, fmt: str = "qcow2") -> None:
    """Run qemu-io commands on an image that no process has open."""
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    out = run(*args, image)
    if "failed" in out or "not found" in out:
        raise AssertionError(f"qemu-io on {image}: {out}")


def assert_restores(
    folder: Path, disks: Iterable[tuple[str, str]], td: GuestDomain, tmp: Path
) -> None:
    """Convert each (disk, file) of a backup folder with plain qemu-img (the
    whole backing chain) and compare it with the test bed's reference;
    `qemu-img check` first: the image must have no error and no leak."""
    for name, file in disks:
        subprocess.run(["qemu-img", "check", "-q", str(folder / file)], check=True)
        out = tmp / f"restored-{folder.name}-{name}.raw"
        subprocess.run(
            ["qemu-img", "convert", "-O", "raw", str(folder / file), str(out)], check=True
        )
        ref = td.disk(name).reference
        assert ref is not None
        qemu_img_compare(ref, out, "raw", "raw")
        out.unlink()
