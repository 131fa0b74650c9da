"""Typed reading of YAML node trees, with file and line in every error.

PyYAML's composer keeps each node's position; reading nodes (not the
loaded dicts) lets every message say ``file:line: key: problem``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import yaml

from virtbackupd.errors import ConfigError

T = TypeVar("T")

# Config and policy files are small; anything larger is not one of them (a
# link to a log, a device, a runaway generator) and is refused unread.
MAX_FILE_BYTES = 1 << 20
# Our files nest three levels at most; PyYAML composes recursively, so a
# deeply nested file would otherwise end in a RecursionError.
MAX_DEPTH = 32
# What of a bad value an error shows: enough to recognise it, too little to
# leak a file's content into the journal.
EXCERPT = 32


class FileProblemsError(ConfigError):
    """Every problem found in one file, in line order (``errors``)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors), path=errors[0].path if errors else None)
        self.errors = errors


class Source:
    """One YAML file being read. Problems are collected (``collecting``)
    so that one reading reports all of them, not only the first."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.errors: list[ConfigError] = []
        _refuse_deep_flows(path, text)
        try:
            self.root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            # Only PyYAML's own words: its full message quotes the line.
            what = "; ".join(
                excerpt(str(x), 80)
                for x in (getattr(exc, "context", None), getattr(exc, "problem", None))
                if x
            )
            raise ConfigError(
                f"{path}{line}: not valid YAML: {what or type(exc).__name__}",
                path=path,
                line=mark.line + 1 if mark is not None else None,
            ) from exc
        except RecursionError as exc:  # block-style nesting deeper than the flow check sees
            raise ConfigError(f"{path}: nested too deeply to be a config file") from exc
        depth = _depth(self.root)
        if depth > MAX_DEPTH:
            raise ConfigError(f"{path}: nested {depth} levels deep; these files use 3 at most")

    @classmethod
    def read(cls, path: Path) -> Source:
        try:
            return cls(path, read_untrusted(path).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text") from exc

    def error(self, node: yaml.Node | None, key: str, problem: str) -> ConfigError:
        number = node.start_mark.line + 1 if node is not None else None
        line = f":{number}" if number is not None else ""
        where = f" {excerpt(key)}:" if key else ""
        return ConfigError(f"{self.path}{line}:{where} {problem}", path=self.path, line=number)

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Record a ConfigError raised inside and go on with the next part."""
        try:
            yield
        except FileProblemsError as exc:
            self.errors += exc.errors
        except ConfigError as exc:
            self.errors.append(exc)

    def raise_errors(self) -> None:
        """Raise every collected problem at once, in line order."""
        if self.errors:
            ordered = sorted(self.errors, key=lambda e: e.line or 0)
            raise FileProblemsError(ordered) if len(ordered) > 1 else ordered[0]

    def mapping(
        self, node: yaml.Node | None, key: str, allowed: Iterable[str]
    ) -> dict[str, yaml.Node]:
        """A mapping's entries by key; unknown and repeated keys are
        collected as errors and left out."""
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, key, f"expected a mapping, got {_kind(node)}")
        known = list(allowed)
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else None
            full = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str) or name not in known:
                self.errors.append(
                    self.error(k, full, f"unknown key (expected one of: {', '.join(known)})")
                )
            elif name in out:
                self.errors.append(self.error(k, full, "given twice"))
            else:
                out[name] = v
        return out

    def scalar(self, node: yaml.Node, key: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, key, f"expected a single value, got {_kind(node)}")
        if node.tag.endswith(":null"):
            return None
        return str(node.value)

    def string(self, node: yaml.Node, key: str) -> str:
        value = self.scalar(node, key)
        if value is None or not node.tag.endswith(":str") or value == "":
            raise self.error(node, key, f"expected a non-empty string, got {_show(node)}")
        return value

    def integer(self, node: yaml.Node, key: str, minimum: int = 0) -> int:
        value = self.scalar(node, key)
        if value is None or not node.tag.endswith(":int"):
            raise self.error(node, key, f"expected an integer >= {minimum}, got {_show(node)}")
        try:  # as YAML 1.1 reads it (017 is octal, 1:30 is 90), not as Python does
            number = yaml.safe_load(value)
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: past Python's digit limit
            raise self.error(
                node, key, f"expected an integer >= {minimum}, got {_show(node)}"
            ) from exc
        if not isinstance(number, int):
            raise self.error(node, key, f"expected an integer >= {minimum}, got {_show(node)}")
        if number < minimum:
            raise self.error(node, key, f"expected an integer >= {minimum}, got {number}")
        return number

    def choice(self, node: yaml.Node, key: str, options: Iterable[str]) -> str:
        opts = list(options)
        value = self.scalar(node, key)
        # YAML 1.1 reads a bare `no`/`off` as false: accept it as the word.
        if node.tag.endswith(":bool"):
            value = str(value).lower()
        if value not in opts:
            raise self.error(node, key, f"expected one of {', '.join(opts)}, got {_show(node)}")
        return value

    def string_list(self, node: yaml.Node, key: str) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return ()
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, key, f"expected a list of strings, got {_kind(node)}")
        return tuple(self.string(item, f"{key}[{i}]") for i, item in enumerate(node.value))

    def checked_list(
        self, node: yaml.Node, key: str, parse: Callable[[str], T], expected: str
    ) -> tuple[T, ...]:
        self.string_list(node, key)  # shape and item types first
        items = node.value if isinstance(node, yaml.SequenceNode) else []
        return tuple(self.checked(n, f"{key}[{i}]", parse, expected) for i, n in enumerate(items))

    def checked(self, node: yaml.Node, key: str, parse: Callable[[str], T], expected: str) -> T:
        """A string turned into a value by `parse` (ValueError: invalid)."""
        value = self.string(node, key) if node.tag.endswith(":str") else self.scalar(node, key)
        try:
            return parse(str(value))
        except ValueError as exc:
            raise self.error(node, key, f"expected {expected}, got {_show(node)} ({exc})") from exc


def read_untrusted(path: Path) -> bytes:
    """The bytes of a config or policy file, read as untrusted input: a
    regular file (never a device, a FIFO or a folder: they would be read
    without end or block), at most MAX_FILE_BYTES, and found in its own
    folder (a link to a twin beside it is followed, a link elsewhere is
    not: it would make root read, and echo into errors, any file)."""
    try:
        folder = path.parent.resolve(strict=True)
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "a loop of symbolic links"
        raise ConfigError(f"{path}: cannot read: {reason}") from exc
    if not real.is_relative_to(folder):
        raise ConfigError(
            f"{path}: a symbolic link to {real}, outside its folder {folder}: not read "
            f"(copy the file into {folder} instead)"
        )
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file ({_file_kind(st.st_mode)}): not read")
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            # Its owner, or anyone who may write it, would decide what root does.
            raise ConfigError(
                f"{path}: owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}: not "
                "read; a config or policy file must be root's and writable only by root"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_FILE_BYTES:
            raise ConfigError(
                f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB: not a config file, not read"
            )
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def _refuse_deep_flows(path: Path, text: str) -> None:
    """Flow collections (`[[[…]]]`) nested past MAX_DEPTH, found before
    PyYAML recurses into them (it would take seconds to fail)."""
    depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(
                    f"{path}: nested more than {MAX_DEPTH} levels deep; these files use 3 at most"
                )
        elif ch in "]}":
            depth = max(0, depth - 1)


def _depth(root: yaml.Node | None) -> int:
    """How deep a composed tree nests; an alias is one node however often
    it is used (a YAML "billion laughs" stays linear)."""
    deepest = 0
    seen: set[int] = set()
    todo: list[tuple[yaml.Node, int]] = [(root, 1)] if root is not None else []
    while todo:
        node, depth = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        deepest = max(deepest, depth)
        if isinstance(node, yaml.SequenceNode):
            todo += [(n, depth + 1) for n in node.value]
        elif isinstance(node, yaml.MappingNode):
            todo += [(n, depth + 1) for pair in node.value for n in pair]
    return deepest


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """`text` as an error may show it: control characters escaped (no
    terminal escapes into a journal or a tty), cut at `limit`."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _show(node)


def _show(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        kind = node.tag.rsplit(":", 1)[-1]
        return f"{kind} '{excerpt(str(node.value))}'" if kind != "null" else "nothing"
    return _kind(node)
