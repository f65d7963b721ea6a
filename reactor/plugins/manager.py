"""Finding plugins, and the typed face of the hooks the core calls.

``make_plugin_manager`` builds a fresh pluggy manager each time (never at
import): first the built-ins named in ``BUILTIN_PLUGINS``, then installed
distributions declaring the ``qmp_reactor`` entry-point group, then the ``*.py``
files of the local plugin directories. ``Plugins`` wraps it in typed methods, so
core code never calls the untyped ``pm.hook`` relay.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import re
import sys
import traceback
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import pluggy
from pydantic import BaseModel

from reactor.errors import Location, PluginError
from reactor.model import Envelope
from reactor.plugins import hookspecs
from reactor.plugins.api import ActionType, PluginState
from reactor.plugins.hookspecs import ActionOutcome

log = logging.getLogger(__name__)

BUILTIN_PLUGINS: tuple[str, ...] = (
    "reactor.actions.log",
    "reactor.actions.webhook",
    "reactor.actions.exec",
    "reactor.actions.qmp",
    "reactor.actions.restart_vm",
    "reactor.actions.resume_vm",
    "reactor.actions.notify",
)

ACTION_NAME = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*")

OriginKind = Literal["builtin", "entry point", "file"]


@dataclass(frozen=True, slots=True)
class PluginOrigin:
    """Where a plugin came from: a built-in module, a distribution, or a file."""

    kind: OriginKind
    source: str


class ReactorPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, PluginOrigin] = {}

    def register_from(self, plugin: object, name: str, origin: PluginOrigin) -> None:
        """Register ``plugin`` as ``name`` unless blocked; errors become PluginError."""
        if self.is_blocked(name):
            return
        try:
            self.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as err:
            raise PluginError(f"plugin {name!r} ({origin.source}) cannot register: {err}") from err
        self.origins[name] = origin


def make_plugin_manager(
    *,
    plugin_dirs: Iterable[Path] = (Path("plugins"),),
    blocked: Iterable[str] = (),
    load_entry_points: bool = True,
) -> ReactorPluginManager:
    """A fresh manager with built-ins, entry points and plugin-directory files loaded.

    ``blocked`` names (a built-in's module name, an entry point's name, a file's
    stem) are never registered. A plugin that fails to import raises PluginError
    naming the module, distribution or file (``FILE:LINE`` for a file), with the
    cause chained; so does a hook implementation no hook specification knows
    (a misspelt hook would otherwise never be called).
    """
    pm = ReactorPluginManager()
    for name in blocked:
        pm.set_blocked(name)
    for module_name in BUILTIN_PLUGINS:
        pm.register_from(_builtin(module_name), module_name, PluginOrigin("builtin", module_name))
    if load_entry_points:
        _load_entry_points(pm)
    for directory in plugin_dirs:
        _load_directory(pm, Path(directory))
    _check_pending(pm)
    return pm


def _builtin(module_name: str) -> object:
    """A built-in plugin: a fresh ``Plugin()`` when its module keeps state, else the module.

    State kept by a plugin instance (a restart guard, HTTP clients) is then
    owned by this manager alone: a fresh manager starts fresh.
    """
    module = importlib.import_module(module_name)
    factory = getattr(module, "Plugin", None)
    return factory() if factory is not None else module


def _check_pending(pm: ReactorPluginManager) -> None:
    """pluggy's ``check_pending``, its error located at the misspelt hook and named."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        name = pm.get_name(err.plugin) or repr(err.plugin)
        located = _unknown_hook(pm, name, err.plugin)
        raise located or PluginError(f"plugin {name!r}: {err}") from err


def _unknown_hook(pm: ReactorPluginManager, name: str, plugin: object) -> PluginError | None:
    """The error for ``plugin``'s first implementation of a hook no specification declares."""
    known = [hook for hook in dir(hookspecs) if hook.startswith("reactor_")]
    for hook, caller in vars(pm.hook).items():
        if not isinstance(caller, pluggy.HookCaller) or caller.spec is not None:
            continue
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin or impl.optionalhook:
                continue
            close = difflib.get_close_matches(hook, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            message = f"plugin {name!r} implements unknown hook {hook!r}{hint}"
            return PluginError(message, _where_defined(impl.function))
    return None


def _where_defined(function: object) -> Location:
    """The file and line of ``function``'s ``def`` (past its decorators)."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    if code is None:
        return Location(repr(function))
    try:
        lines, first = inspect.getsourcelines(code)
    except (OSError, TypeError):
        return Location(code.co_filename, code.co_firstlineno)
    offset = next(
        (i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "async def "))), 0
    )
    return Location(code.co_filename, first + offset)


def _load_entry_points(pm: ReactorPluginManager) -> None:
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != hookspecs.PROJECT or pm.is_blocked(ep.name):
                continue
            source = f"{dist.metadata['Name']} {dist.version}"
            try:
                plugin = ep.load()
            except Exception as err:
                raise PluginError(
                    f"plugin {ep.name!r} of distribution {source} failed to import: {err!r}"
                ) from err
            if pm.get_plugin(ep.name) is plugin:
                continue  # the same distribution seen twice on sys.path
            pm.register_from(plugin, ep.name, PluginOrigin("entry point", source))


def _load_directory(pm: ReactorPluginManager, directory: Path) -> None:
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_") or pm.is_blocked(path.stem):
            continue
        pm.register_from(import_file(path), path.stem, PluginOrigin("file", str(path)))


def import_file(path: Path) -> ModuleType:
    """Import a plugin file under a private module name; PluginError names the file."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"_qmp_reactor_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pydantic and dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise PluginError(f"plugin failed to import: {_reason(err)}", _where(path, err)) from err
    return module


def _reason(err: Exception) -> str:
    if isinstance(err, SyntaxError):
        return f"{type(err).__name__}: {err.msg}"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _where(path: Path, err: Exception) -> Location:
    """Where in ``path`` ``err`` arose: the syntax error, else the innermost frame in the file."""
    real = path.resolve()
    if isinstance(err, SyntaxError) and err.filename and Path(err.filename).resolve() == real:
        return Location(str(path), err.lineno or 0, err.offset or 0)
    line = 0
    for frame in traceback.extract_tb(err.__traceback__):
        if Path(frame.filename).resolve() == real:
            line = frame.lineno or 0
    return Location(str(path), line)


class Plugins:
    """The typed hooks: what the engine, the dispatcher and ``check`` call."""

    def __init__(self, pm: ReactorPluginManager) -> None:
        self.pm = pm
        self._action_types: dict[str, ActionType] | None = None

    def plugin_names(self) -> list[str]:
        """Names of the registered plugins, in registration order."""
        return [name for name, plugin in self.pm.list_name_plugin() if plugin is not None]

    def origin(self, name: str) -> PluginOrigin:
        """Where the plugin ``name`` came from."""
        return self.pm.origins.get(name, PluginOrigin("builtin", name))

    def action_types(self) -> dict[str, ActionType]:
        """Every registered action type by name; collected once, then cached."""
        if self._action_types is None:
            self._action_types = self._collect_action_types()
        return self._action_types

    def _collect_action_types(self) -> dict[str, ActionType]:
        types: dict[str, ActionType] = {}
        # Reverse pluggy's LIFO order so registration follows load order.
        for impl in self._impls("reactor_register_actions"):
            _call(impl, register=_Registrar(impl.plugin_name, types))
        return types

    def event(self, envelope: Envelope) -> None:
        """Tell every ``reactor_event`` observer about ``envelope``; failures are logged."""
        self._observe("reactor_event", envelope=envelope)

    def action_outcome(self, outcome: ActionOutcome) -> None:
        """Tell every ``reactor_action_outcome`` observer; failures are logged."""
        self._observe("reactor_action_outcome", outcome=outcome)

    async def startup(self, settings: Any, *, skip: Collection[object] = ()) -> None:
        """Run every ``reactor_startup`` hook (not those of the plugin objects in ``skip``);
        a failure raises PluginError naming it."""
        for impl in self._impls("reactor_startup", skip):
            try:
                result = _call(impl, settings=settings)
                if inspect.isawaitable(result):
                    await result
            except Exception as err:
                raise PluginError(f"plugin {impl.plugin_name!r} failed to start: {err}") from err

    def state(self, store: Callable[[str], PluginState]) -> None:
        """Run every ``reactor_state`` hook with ``store(name)``, the namespace of the plugin
        registered as ``name``; a failure raises PluginError naming it."""
        for impl in self._impls("reactor_state"):
            try:
                _call(impl, store=store(impl.plugin_name))
            except Exception as err:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed to take its state: {err}"
                ) from err

    async def shutdown(self, *, skip: Collection[object] = ()) -> None:
        """Run every ``reactor_shutdown`` hook (not those of the plugin objects in ``skip``);
        failures are logged, the rest still run."""
        for impl in self._impls("reactor_shutdown", skip):
            try:
                result = _call(impl)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("plugin %r failed to shut down", impl.plugin_name)

    def plugin_objects(self) -> list[object]:
        """The registered plugins themselves (modules, mostly), in registration order."""
        return [plugin for _, plugin in self.pm.list_name_plugin() if plugin is not None]

    def _impls(self, hook: str, skip: Collection[object] = ()) -> list[pluggy.HookImpl]:
        # Hooks are called one implementation at a time, so wrappers have no call to wrap.
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        skipped = {id(plugin) for plugin in skip}
        return [
            impl
            for impl in reversed(impls)
            if not (impl.wrapper or impl.hookwrapper) and id(impl.plugin) not in skipped
        ]

    def _observe(self, hook: str, **kwargs: Any) -> None:
        # One call per implementation, so a failing observer cannot skip the others.
        for impl in self._impls(hook):
            try:
                _call(impl, **kwargs)
            except Exception:
                log.exception("plugin %r failed in %s", impl.plugin_name, hook)


def _call(impl: pluggy.HookImpl, **kwargs: Any) -> Any:
    return impl.function(*(kwargs[name] for name in impl.argnames))


class _Registrar:
    """The ``register`` callback one plugin gets; validates each action type at once."""

    def __init__(self, plugin: str, types: dict[str, ActionType]) -> None:
        self.plugin = plugin
        self.types = types

    def __call__(self, action_type: ActionType) -> None:
        self._validate(action_type)
        existing = self.types.get(action_type.name)
        if existing is not None:
            raise PluginError(
                f"action type {action_type.name!r} of plugin {self.plugin!r} is already "
                f"registered by plugin {existing.plugin!r}"
            )
        self.types[action_type.name] = replace(action_type, plugin=self.plugin)

    def _validate(self, action_type: ActionType) -> None:
        where = f"plugin {self.plugin!r}"
        if not isinstance(action_type, ActionType):
            raise PluginError(f"{where} registered {action_type!r}, not an ActionType")
        if not ACTION_NAME.fullmatch(action_type.name):
            raise PluginError(
                f"{where} registered action type {action_type.name!r}: a name is lowercase "
                "letters, digits and underscores, starting with a letter (dots separate parts)"
            )
        if not (isinstance(action_type.params, type) and issubclass(action_type.params, BaseModel)):
            raise PluginError(f"{where}: params of {action_type.name!r} is not a pydantic model")
        if not callable(action_type.run):
            raise PluginError(f"{where}: run of {action_type.name!r} is not callable")


def load_plugins(
    *,
    plugin_dirs: Iterable[Path] = (Path("plugins"),),
    blocked: Iterable[str] = (),
    load_entry_points: bool = True,
) -> Plugins:
    """``Plugins`` over a fresh manager; the one call the engine and ``check`` need."""
    return Plugins(
        make_plugin_manager(
            plugin_dirs=plugin_dirs, blocked=blocked, load_entry_points=load_entry_points
        )
    )
