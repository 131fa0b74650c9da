"""Typed reading of YAML node trees, with file and line in every error.

PyYAML's composer keeps each node's position; reading nodes (not the
loaded dicts) lets every message say ``file:line: key: problem``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import yaml

from virtbackupd.errors import ConfigError

T = TypeVar("T")


class FileProblemsError(ConfigError):
    """Every problem found in one file, in line order (``errors``)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


class Source:
    """One YAML file being read. Problems are collected (``collecting``)
    so that one reading reports all of them, not only the first."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.errors: list[ConfigError] = []
        try:
            self.root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: not valid YAML: {exc}") from exc

    @classmethod
    def read(cls, path: Path) -> Source:
        try:
            return cls(path, path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text") from exc

    def error(self, node: yaml.Node | None, key: str, problem: str) -> ConfigError:
        number = node.start_mark.line + 1 if node is not None else 0
        line = f":{number}" if node is not None else ""
        where = f" {key}:" if key else ""
        err = ConfigError(f"{self.path}{line}:{where} {problem}")
        err.line = number  # type: ignore[attr-defined]
        return err

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
            ordered = sorted(self.errors, key=lambda e: getattr(e, "line", 0))
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
        number = int(value.replace("_", ""), 0)
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


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _show(node)


def _show(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        kind = node.tag.rsplit(":", 1)[-1]
        return f"{kind} {node.value!r}" if kind != "null" else "nothing"
    return _kind(node)
