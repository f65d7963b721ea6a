"""The package's layers only look down: every import of a module is checked against the order.

The order is the one ``reactor/__init__.py`` documents. A module may import its
own layer and the layers before it; imports inside functions count too (lazy is
still a dependency). ``reactor/__init__.py`` (the facade that re-exports the
plugin API lazily) and ``reactor/__main__.py`` stand outside the order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import reactor

PACKAGE = Path(reactor.__file__).resolve().parent
LAYERS = (
    "",  # the foundation: modules directly in reactor/
    "plugins",
    "params",
    "sources",
    "rules",
    "engine",
    "dispatch",
    "actions",
    "service",
    "fleet",
    "demo",
    "cli",
)
FOUNDATION = {"errors", "model", "clock", "durations"}
OUTSIDE = {"reactor", "reactor.__main__"}
ALIASES = {"reactor.hookspecs": "reactor.plugins.hookspecs"}
"""Old import paths kept working for plugins; each only re-exports its new home."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2:
        return 0
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    assert parts[1] in FOUNDATION or module in ALIASES, f"{module}: not in any layer; add it to one"
    return 0


def imported(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, module) for every import of a ``reactor`` module in ``path``."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "reactor":  # ``from reactor import x``: x may be a subpackage
                found += [(node.lineno, f"reactor.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, m) for line, m in found if m == "reactor" or m.startswith("reactor.")]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer() -> None:
    for path in MODULES:
        name = module_name(path)
        if name not in OUTSIDE:
            layer_of(name)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_only_look_down(path: Path) -> None:
    name = module_name(path)
    if name in OUTSIDE:
        return
    if name in ALIASES:
        assert [t for _, t in imported(path, name)] == [ALIASES[name]]
        return
    mine = layer_of(name)
    upward = []
    for line, target in imported(path, name):
        if target == "reactor" or target.split(".")[1] == "__version__":
            continue
        if layer_of(target) > mine:
            upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target}")
    assert not upward, "\n".join(upward)


def test_the_documented_order_is_this_order() -> None:
    doc = reactor.__doc__ or ""
    rows = [line.split()[0] for line in doc.splitlines() if line[:1].isalpha() and "  " in line]
    assert rows == ["foundation", *LAYERS[1:]]


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from reactor.dispatch.journal import Journal\n"
        "from ..engine import core\nfrom reactor import service\n"
    )
    found = [t for _, t in imported(probe, "reactor.rules.probe")]
    assert sorted(found) == ["reactor.dispatch.journal", "reactor.engine", "reactor.service"]
    assert all(layer_of(t) > layer_of("reactor.rules.probe") for t in found)


def test_the_stable_plugin_api_is_complete_and_lazy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, reactor\n"
        "assert 'reactor.plugins.api' not in sys.modules\n"
        "from reactor import *\n"
        "from reactor.plugins.api import ActionType as A\n"
        "assert ActionType is A and callable(hookimpl)\n"
        "print(sorted(n for n in reactor.__all__ if n != '__version__'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted(reactor._PLUGIN_API))


def test_the_old_plugin_import_paths_still_work() -> None:
    from reactor import ActionContext, ActionParams, ActionType, Register, hookimpl
    from reactor.actions import base, params
    from reactor.hookspecs import Register as OldRegister
    from reactor.hookspecs import hookimpl as old_hookimpl

    assert (base.ActionType, base.ActionContext, params.ActionParams) == (
        ActionType,
        ActionContext,
        ActionParams,
    )
    assert (old_hookimpl, OldRegister) == (hookimpl, Register)
