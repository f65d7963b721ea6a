"""The drawn exception tree of ``reactor/errors.py`` is complete and true.

Every exception class defined in the package is drawn there or private
(``_Name``), and each drawn class is a subclass of the one it hangs from.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import pkgutil
import re

import qemu.qmp.error

import reactor
import reactor.errors
from reactor.errors import Diagnostic, Location, PluginError, UserError

TREE_LINE = re.compile(
    r"^    (?P<indent>(?:[│ ]   )*)(?:[├└]── )?(?P<name>[A-Za-z_][\w.]*)(?:\s|$)"
)


def drawn() -> list[tuple[str, str | None]]:
    """(class name, drawn parent name) for every class in the docstring's trees."""
    doc = reactor.errors.__doc__ or ""
    found: list[tuple[str, str | None]] = []
    stack: list[str] = []
    for line in doc.splitlines():
        match = TREE_LINE.match(line)
        if not match:
            continue
        connector = "──" in line
        depth = len(match["indent"]) // 4 + (1 if connector else 0)
        if not connector and match["indent"]:
            continue  # a continuation line of a description
        del stack[depth:]
        name = match["name"].rpartition(".")[2]
        found.append((name, stack[-1] if stack else None))
        stack.append(name)
    return found


def defined_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the package, by name."""
    classes: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(reactor.__path__, "reactor."):
        if info.name.endswith(".__main__"):
            continue  # running the command line is all it does
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == info.name
            ):
                classes[name] = value
    return classes


def test_every_exception_class_is_drawn_or_private() -> None:
    names = {name for name, _ in drawn()}
    missing = [
        f"{cls.__module__}.{name}"
        for name, cls in defined_exceptions().items()
        if not name.startswith("_") and name not in names
    ]
    assert missing == [], "draw these in reactor/errors.py's tree or make them private"


def test_each_drawn_class_is_a_subclass_of_its_drawn_parent() -> None:
    known: dict[str, type] = {**defined_exceptions(), "ProtocolError": qemu.qmp.error.ProtocolError}
    pairs = drawn()
    assert ("PluginError", "UserError") in pairs and ("WireError", "ProtocolError") in pairs
    for name, parent in pairs:
        cls = known.get(name) or getattr(builtins, name)
        if parent is not None:
            assert issubclass(cls, known.get(parent) or getattr(builtins, parent)), name


def test_a_located_plugin_error_is_one_line_and_its_one_diagnostic() -> None:
    where = Location("plugins/bad.py", 3)
    err = PluginError("plugin failed to import: NameError: name 'x' is not defined", where)
    assert isinstance(err, UserError)
    assert str(err) == "plugins/bad.py:3: error: plugin failed to import: NameError: " + (
        "name 'x' is not defined"
    )
    assert err.diagnostics == [Diagnostic(where, err.diagnostics[0].message)]
    assert str(PluginError("plugin 'x' cannot register")) == "plugin 'x' cannot register"
