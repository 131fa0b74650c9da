"""scripts/shape.py (`make shape`, part of `make lint`) finds what it promises:
a cycle made only of TYPE_CHECKING imports, an upward import, a long
function, a format type in adapters/ — and the package as it is passes."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "shape.py"


@pytest.fixture(scope="module")
def shape() -> ModuleType:
    spec = importlib.util.spec_from_file_location("shape", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["shape"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _modules(shape: ModuleType, sources: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, text in sources.items():
        path = Path("/pkg") / (name.replace(".", "/") + ".py")
        out[name] = shape.Module(name, path, ast.parse(text), len(text.splitlines()))
    return out


def test_a_cycle_of_type_checking_imports_is_found(shape: ModuleType) -> None:
    mods = _modules(
        shape,
        {
            "virtbackupd.engine.a": "from virtbackupd.engine import b\n",
            "virtbackupd.engine.b": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from virtbackupd.engine.a import X\n"
            ),
            "virtbackupd.engine.c": "import virtbackupd.engine.a\n",
        },
    )
    cycles = shape.find_cycles(shape.import_graph(mods))
    assert cycles == [["virtbackupd.engine.a", "virtbackupd.engine.b"]]


def test_an_upward_import_is_a_layer_breach(shape: ModuleType) -> None:
    mods = _modules(
        shape,
        {
            "virtbackupd.core.extents": "def f() -> None:\n    from ..adapters.nbd import p\n",
            "virtbackupd.adapters.nbd.p": "from virtbackupd.core import extents\n",
            "virtbackupd.engine.datapath.copy": "from virtbackupd.core.extents import f\n",
        },
    )
    assert shape.layer_breaches(shape.import_graph(mods)) == [
        "layer: virtbackupd.core.extents (core) imports virtbackupd.adapters.nbd.p (adapters)"
    ]


def test_long_functions_and_format_types_in_adapters_are_breaches(shape: ModuleType) -> None:
    body = "\n".join(["    x = 1"] * 80)
    mods = _modules(
        shape,
        {
            "virtbackupd.adapters.repo": f"class Manifest:\n    pass\n\n\ndef f():\n{body}\n",
            "virtbackupd.core.fine": "class Manifest:\n    pass\n",
        },
    )
    sizes = shape.size_breaches(mods)
    assert any("function over 80 lines" in b and " f (81)" in b for b in sizes), sizes
    assert shape.format_type_breaches(mods) == [
        "format type in adapters: /pkg/virtbackupd/adapters/repo.py:1 class Manifest"
    ]


def test_the_package_keeps_its_shape() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout
    assert done.stdout.strip().endswith("shape: all limits hold")
