"""qemu-img, run as a subprocess with an argument list (never a shell).

Every failure raises :class:`ProcessError` carrying qemu-img's own message.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtbackupd.adapters import procfs
from virtbackupd.errors import ProcessError

QEMU_IMG = "qemu-img"


PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int]:
    # Looked up in the parent: dlopen in a child forked from a threaded
    # process can deadlock on a loader lock another thread held at the fork.
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn for helper processes: the kernel SIGKILLs the helper
    when we die, so that no qemu-nbd or qemu-img outlives a killed
    virtbackupd holding an image lock (under systemd the control group
    does this too; from the CLI nothing else would).

    SIGKILL, not SIGTERM: qemu-nbd installs its SIGTERM handler early but
    only starts looking at what it set once it serves, so a SIGTERM in
    its first milliseconds is lost and it serves for ever (seen in about
    one start in six when the signal came 2-12 ms after the exec). A
    helper whose owner died has nothing left to do that matters: what it
    read or wrote is abandoned with its owner's job.

    The signal follows the *thread* that forked, so spawn from the event
    loop's thread, which lives as long as we do."""
    prctl = _prctl()
    spawner = os.getpid()

    def in_the_child() -> None:  # pragma: no cover - runs in the child
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # A parent killed between fork and the prctl never sends the
        # signal: the child was already reparented. Then go now.
        if os.getppid() != spawner:
            os.kill(os.getpid(), signal.SIGKILL)

    return in_the_child


async def spawn_helper(argv: Sequence[str], stderr_path: Path) -> asyncio.subprocess.Process:
    """A long-lived helper (qemu-nbd, qemu-storage-daemon): no stdin or
    stdout, its stderr in `stderr_path` for the error message, and tied to
    our life (die_with_parent; call from the loop thread)."""
    with stderr_path.open("wb") as stderr:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=die_with_parent(),
        )


async def while_locked(action: Callable[[], Awaitable[None]], wait: float = 15.0) -> None:
    """Run `action`, again while an image it needs is locked by another
    process (a reader such as a restore of another domain's backup that
    shares a layer, or a helper being swept); the last error names the
    holders."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            await action()
        except ProcessError as exc:
            if "lock" not in exc.message or loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)
        else:
            return


async def run_tool(argv: Sequence[str], what: str | None = None) -> str:
    """Run a command, return its stdout; raise ProcessError with its stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent(),  # forked from the loop thread, see die_with_parent
    )
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise ProcessError(what or " ".join(argv[:2]), procfs.name_lock_holders(message))
    return out.decode(errors="replace")


async def create(
    path: Path,
    size: int | None = None,
    *,
    backing: str | None = None,
    options: Sequence[str] = (),
) -> None:
    """Create a qcow2 image; with `backing`, an overlay whose backing file
    (qcow2) is stored exactly as given (a relative path stays relative to
    the overlay). `options`: qcow2 creation options (-o)."""
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2"]
    for opt in options:
        argv += ["-o", opt]
    argv.append(str(path))
    if size is not None:
        argv.append(str(size))
    await run_tool(argv, f"qemu-img create {path}")


@dataclass(frozen=True)
class ImageInfo:
    """What `qemu-img info` says of one image, as far as we use it."""

    filename: str
    format: str
    virtual_size: int
    backing_filename: str | None  # as stored in the image (may be relative)
    # qcow2 persistent bitmaps and their flags ("auto"; "in-use": the image
    # was not closed cleanly while the bitmap was loaded)
    bitmaps: Mapping[str, frozenset[str]]

    @classmethod
    def from_json(cls, data: Any, what: str) -> ImageInfo:
        try:
            specific = data.get("format-specific", {}).get("data", {})
            return cls(
                filename=str(data["filename"]),
                format=str(data["format"]),
                virtual_size=int(data["virtual-size"]),
                backing_filename=(
                    str(data["backing-filename"]) if "backing-filename" in data else None
                ),
                bitmaps={
                    str(b["name"]): frozenset(b.get("flags", []))
                    for b in specific.get("bitmaps", [])
                },
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ProcessError(what, f"unexpected output: {exc!r}") from exc


async def _info_json(path: Path, backing_chain: bool) -> Any:
    argv = [QEMU_IMG, "info", "-U", "--output=json"]
    if backing_chain:
        argv.append("--backing-chain")
    argv.append(str(path))
    what = f"qemu-img info {path}"
    try:
        return json.loads(await run_tool(argv, what))
    except json.JSONDecodeError as exc:
        raise ProcessError(what, f"output is not JSON: {exc}") from exc


async def info(path: Path) -> ImageInfo:
    """`qemu-img info` of one image (shared lock: works on images in use)."""
    return ImageInfo.from_json(await _info_json(path, False), f"qemu-img info {path}")


async def info_chain(path: Path) -> list[ImageInfo]:
    """`qemu-img info --backing-chain`: the image, then each backing file."""
    data = await _info_json(path, True)
    if not isinstance(data, list):
        raise ProcessError(f"qemu-img info --backing-chain {path}", "expected a list")
    return [ImageInfo.from_json(d, f"qemu-img info {path}") for d in data]


async def bitmap_names(path: Path) -> set[str]:
    """Names of the persistent bitmaps in a qcow2 image."""
    return set((await info(path)).bitmaps)


async def bitmap_flags(path: Path) -> dict[str, frozenset[str]]:
    """Each persistent bitmap of a qcow2 image with its flags."""
    return dict((await info(path)).bitmaps)


async def measure_preallocated(size: int, options: Sequence[str]) -> int:
    """Bytes a qcow2 image of virtual size `size`, created with `options`
    (a preallocation among them), takes on its file system: qemu-img's own
    figure, metadata included."""
    argv = [QEMU_IMG, "measure", "--output=json", "-O", "qcow2", "--size", str(size)]
    for opt in options:
        argv += ["-o", opt]
    out = await run_tool(argv, "qemu-img measure")
    try:
        return int(json.loads(out)["fully-allocated"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProcessError("qemu-img measure", f"unexpected output: {exc!r}") from exc


@dataclass(frozen=True)
class CheckResult:
    """What `qemu-img check` found in an image that is not corrupt."""

    leaks: int  # clusters allocated but used by nothing: space lost, no data at risk


async def check(path: Path, fmt: str = "qcow2", *, repair_leaks: bool = False) -> CheckResult:
    """`qemu-img check`. Leaked clusters (exit 3) are not damage: a writer
    killed between allocating a cluster and using it leaves them, and every
    byte still reads as before; they are returned, not raised. Corruption
    (exit 2) and a check that cannot run raise :class:`ProcessError` with a
    one-line summary (qemu-img prints a line per cluster). `repair_leaks`:
    free them (`-r leaks`, needs the write lock)."""
    argv = [QEMU_IMG, "check", "-f", fmt, "--output=json"]
    if repair_leaks:
        argv += ["-r", "leaks"]
    argv.append(str(path))
    what = f"qemu-img check {path}"
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent(),  # forked from the loop thread, see die_with_parent
    )
    out, err = await proc.communicate()
    # Exit 0: clean; 2: corruptions; 3: leaks only; JSON on stdout for all three.
    try:
        result = json.loads(out) if out else {}
    except json.JSONDecodeError:
        result = {}
    if not isinstance(result, dict):
        result = {}
    leaks = int(result.get("leaks", 0) or 0)
    if proc.returncode in (0, 3):
        return CheckResult(leaks if proc.returncode == 3 else 0)
    corrupt = int(result.get("corruptions", 0) or 0)
    if proc.returncode == 2 and corrupt:
        raise ProcessError(
            what, f"{corrupt} corrupted cluster(s) (and {leaks} leaked): the image is damaged"
        )
    lines = err.decode(errors="replace").strip().splitlines()
    first = procfs.name_lock_holders(lines[0]) if lines else f"exit status {proc.returncode}"
    more = f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else ""
    raise ProcessError(what, first + more)


async def bitmap(path: Path, name: str, *, add: bool = False, remove: bool = False) -> None:
    """Add or remove a persistent qcow2 bitmap."""
    argv = [QEMU_IMG, "bitmap", "-f", "qcow2"]
    if add:
        argv.append("--add")
    if remove:
        argv.append("--remove")
    argv += [str(path), name]
    await run_tool(argv, f"qemu-img bitmap {path} {name}")


async def convert(src: str | Path, dst: Path, *, src_fmt: str | None = None) -> None:
    """`qemu-img convert`: a standalone sparse qcow2 image (no backing
    file) of `src`."""
    argv = [QEMU_IMG, "convert", "-O", "qcow2"]
    if src_fmt:
        argv += ["-f", src_fmt]
    argv += [str(src), str(dst)]
    await run_tool(argv, f"qemu-img convert {src} -> {dst}")


async def commit(overlay: Path, base: Path | None = None, keep_overlay: bool = False) -> None:
    """Merge `overlay` into its backing file (or down to `base`); with
    `keep_overlay` the overlay is not emptied afterwards (-d)."""
    argv = [QEMU_IMG, "commit", "-q", "-f", "qcow2"]
    if keep_overlay:
        argv.append("-d")
    if base is not None:
        argv += ["-b", str(base)]
    argv.append(str(overlay))
    await run_tool(argv, f"qemu-img commit {overlay}")


async def measure(path: Path) -> int:
    """Bytes a standalone qcow2 copy of `path`'s view (its backing chain
    included) needs, metadata included (`qemu-img measure`)."""
    argv = [QEMU_IMG, "measure", "-U", "-O", "qcow2", "--output=json", str(path)]
    what = f"qemu-img measure {path}"
    try:
        data = json.loads(await run_tool(argv, what))
        return int(data["required"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ProcessError(what, f"unexpected output: {exc!r}") from exc


async def rebase(
    path: Path, backing: str, backing_fmt: str = "qcow2", unsafe: bool = False
) -> None:
    """Point `path` at another backing file (safe mode copies differences)."""
    argv = [QEMU_IMG, "rebase", "-q", "-f", "qcow2", "-F", backing_fmt, "-b", backing]
    if unsafe:
        argv.append("-u")
    argv.append(str(path))
    await run_tool(argv, f"qemu-img rebase {path}")


async def compare(
    a: Path | str, b: Path | str, fmt_a: str | None = None, fmt_b: str | None = None
) -> bool:
    """True when both images have the same guest-visible content."""
    argv = [QEMU_IMG, "compare", "-q"]
    if fmt_a:
        argv += ["-f", fmt_a]
    if fmt_b:
        argv += ["-F", fmt_b]
    argv += [str(a), str(b)]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent(),  # forked from the loop thread, see die_with_parent
    )
    _, err = await proc.communicate()
    if proc.returncode == 0:
        return True
    if proc.returncode == 1:
        return False
    message = procfs.name_lock_holders(err.decode(errors="replace").strip())
    raise ProcessError(f"qemu-img compare {a} {b}", message)
