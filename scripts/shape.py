"""Measure the code's shape: the limits docs/architecture.md promises.

Run as `make shape` (or `.venv/bin/python scripts/shape.py`). It reads the
package's source with `ast` only (nothing is imported or run) and checks:

- no import cycle between the package's modules, counting imports under
  `if TYPE_CHECKING:` and imports inside functions;
- each layer imports only the layers below it (core imports nothing of the
  package but `errors`; see LAYERS);
- no module over MAX_MODULE_LINES lines, no function over MAX_FUNCTION_LINES
  (a function's lines run from its `def` or first decorator to its last line);
- the backup job's driver module under MAX_DRIVER_LINES lines;
- the repository's format types (the manifest and the records written beside
  it) are defined outside `adapters/`.

It prints every breach, one per line, and exits 1 if there is any; with
`--report` it also prints the figures (largest modules and functions, module
count per layer).
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "virtbackupd"
ROOT = Path(__file__).resolve().parent.parent / "daemon" / PACKAGE

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_DRIVER_LINES = 400
DRIVER_MODULE = "virtbackupd.engine.backup.driver"

# Each layer and the layers (of this package) it may import. The top-level
# modules errors and logs are shared by all.
SHARED = {"errors", "logs"}
LAYERS: dict[str, set[str]] = {
    "core": set(),
    "config": {"core"},
    "adapters": {"core", "config"},
    "engine": {"core", "config", "adapters"},
    "cli": {"core", "config", "adapters", "engine", "daemon"},
    "daemon": {"core", "config", "adapters", "engine"},
}

# Types of the repository's on-disk format: none may be defined in adapters/.
FORMAT_TYPES = {
    "Manifest",
    "ManifestDisk",
    "UndoKind",
    "UndoEntry",
    "HoldKind",
    "Hold",
    "PruneJournal",
    "FailedAttempt",
}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int


def load_modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        text = path.read_text(encoding="utf-8")
        modules[name] = Module(name, path, ast.parse(text, str(path)), len(text.splitlines()))
    return modules


def imported_modules(module: Module, known: set[str]) -> set[str]:
    """Every package module `module` imports, anywhere in its body."""
    found: set[str] = set()
    is_package = module.path.name == "__init__.py"
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.name.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop] if drop else base
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            found.add(target)
            # `from pkg import mod` imports the module pkg.mod
            for alias in node.names:
                found.add(f"{target}.{alias.name}")
    resolved: set[str] = set()
    for name in found:
        if not name.startswith(PACKAGE):
            continue
        # resolve to the longest known module name
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module.name:
            resolved.add(name)
    return resolved


def _rel(path: Path) -> Path:
    """A module's path as the checkout names it (as given when outside it)."""
    return path.relative_to(ROOT.parent.parent) if path.is_relative_to(ROOT.parent.parent) else path


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def is_ancestor_package(importer: str, imported: str) -> bool:
    """A package's __init__ being imported on the way to a submodule is no cycle."""
    return importer.startswith(imported + ".")


def function_lengths(module: Module) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                end = child.end_lineno or child.lineno
                out.append((f"{prefix}{child.name}", first, end - first + 1))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(module.tree, "")
    return out


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    known = set(modules)
    return {
        name: {d for d in imported_modules(m, known) if not is_ancestor_package(name, d)}
        for name, m in modules.items()
    }


def layer_breaches(graph: dict[str, set[str]]) -> list[str]:
    breaches: list[str] = []
    for name, deps in sorted(graph.items()):
        layer = layer_of(name)
        if layer not in LAYERS:
            continue
        allowed = LAYERS[layer] | {layer}
        for dep in sorted(deps):
            dep_layer = layer_of(dep)
            if dep_layer is None or dep_layer in SHARED or dep_layer in allowed:
                continue
            breaches.append(f"layer: {name} ({layer}) imports {dep} ({dep_layer})")
    return breaches


def size_breaches(modules: dict[str, Module]) -> list[str]:
    breaches: list[str] = []
    for _, m in sorted(modules.items()):
        rel = _rel(m.path)
        if m.lines > MAX_MODULE_LINES:
            breaches.append(f"module over {MAX_MODULE_LINES} lines: {rel} ({m.lines})")
        for func, line, length in function_lengths(m):
            if length > MAX_FUNCTION_LINES:
                breaches.append(
                    f"function over {MAX_FUNCTION_LINES} lines: {rel}:{line} {func} ({length})"
                )
    driver = modules.get(DRIVER_MODULE)
    if driver is None:
        breaches.append(f"the backup job's driver module {DRIVER_MODULE} is missing")
    elif driver.lines >= MAX_DRIVER_LINES:
        breaches.append(
            f"backup driver {DRIVER_MODULE} has {driver.lines} lines "
            f"(limit: under {MAX_DRIVER_LINES})"
        )
    return breaches


def format_type_breaches(modules: dict[str, Module]) -> list[str]:
    breaches: list[str] = []
    for name, m in sorted(modules.items()):
        if layer_of(name) != "adapters":
            continue
        rel = _rel(m.path)
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ClassDef) and node.name in FORMAT_TYPES:
                breaches.append(f"format type in adapters: {rel}:{node.lineno} class {node.name}")
    return breaches


def print_report(modules: dict[str, Module]) -> None:
    def rel(m: Module) -> Path:
        return _rel(m.path)

    print(f"{len(modules)} modules, {sum(m.lines for m in modules.values())} lines")
    by_layer: dict[str, int] = {}
    for name in modules:
        layer = layer_of(name) or "(top)"
        by_layer[layer] = by_layer.get(layer, 0) + 1
    print("modules per layer: " + ", ".join(f"{k} {v}" for k, v in sorted(by_layer.items())))
    print("largest modules:")
    for m in sorted(modules.values(), key=lambda m: -m.lines)[:8]:
        print(f"  {m.lines:5d}  {rel(m)}")
    funcs = [
        (length, f"{rel(m)}:{line} {func}")
        for m in modules.values()
        for func, line, length in function_lengths(m)
    ]
    print("longest functions:")
    for length, where in sorted(funcs, reverse=True)[:8]:
        print(f"  {length:5d}  {where}")
    driver = modules.get(DRIVER_MODULE)
    if driver is not None:
        print(f"backup driver: {DRIVER_MODULE} {driver.lines} lines")


def check(report: bool) -> list[str]:
    modules = load_modules()
    graph = import_graph(modules)
    breaches = ["import cycle: " + " <-> ".join(c) for c in find_cycles(graph)]
    breaches += layer_breaches(graph)
    breaches += size_breaches(modules)
    breaches += format_type_breaches(modules)
    if report:
        print_report(modules)
    return breaches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="also print the figures")
    args = parser.parse_args()
    breaches = check(args.report)
    for line in breaches:
        print(line)
    print(f"{len(breaches)} breaches" if breaches else "shape: all limits hold")
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main())
