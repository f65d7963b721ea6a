"""qmp-reactor: a rule-based reaction engine for QEMU's QMP events.

The plugin API has one stable import::

    from reactor import hookimpl, Register, ActionType, ActionContext, ActionParams

The package is layered; each layer imports only the ones above it in this list
(``tests/test_layers.py`` holds it so, ``docs/architecture.md`` draws it):

==========  =================================================================
foundation  ``errors``, ``model``, ``clock``, ``durations`` (modules here)
plugins     the plugin API, hookspecs, the plugin manager
params      templates, secrets, parameter validation
sources     QMP sessions, one VM, the connection manager, server mode
rules       YAML loading, conditions, paths, the catalog, the compiler
engine      generated routes, QEMU's rate-limit stage, gates, replay
dispatch    invocations, the journal, group commit, attempts, the dispatcher
actions     the built-in action types
service     configuration, wiring, the daemon, metrics, logs
fleet       NATS JetStream: publisher and its outbox, commands, the central
demo        the throwaway QEMU and the demo
cli         the commands
==========  =================================================================

The names below are loaded on first use, so ``import reactor`` stays cheap for
the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PLUGIN_API = {
    "hookimpl": "reactor.plugins.hookspecs",
    "Register": "reactor.plugins.hookspecs",
    "ActionOutcome": "reactor.plugins.hookspecs",
    "ActionType": "reactor.plugins.api",
    "ActionContext": "reactor.plugins.api",
    "ActionSettings": "reactor.plugins.api",
    "ActionParams": "reactor.plugins.api",
    "CheckContext": "reactor.plugins.api",
    "Duration": "reactor.plugins.api",
    "VmControl": "reactor.plugins.api",
    "PluginState": "reactor.plugins.api",
    "Envelope": "reactor.model",
    "TransientActionError": "reactor.errors",
    "PermanentActionError": "reactor.errors",
}

__all__ = [
    "ActionContext",
    "ActionOutcome",
    "ActionParams",
    "ActionSettings",
    "ActionType",
    "CheckContext",
    "Duration",
    "Envelope",
    "PermanentActionError",
    "PluginState",
    "Register",
    "TransientActionError",
    "VmControl",
    "__version__",
    "hookimpl",
]

if TYPE_CHECKING:
    from reactor.errors import PermanentActionError, TransientActionError
    from reactor.model import Envelope
    from reactor.plugins.api import (
        ActionContext,
        ActionParams,
        ActionSettings,
        ActionType,
        CheckContext,
        Duration,
        PluginState,
        VmControl,
    )
    from reactor.plugins.hookspecs import ActionOutcome, Register, hookimpl


def __getattr__(name: str) -> Any:
    module = _PLUGIN_API.get(name)
    if module is None:
        raise AttributeError(f"module 'reactor' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
