"""The hooks qmp-reactor offers to plugins, and the markers to implement them.

A plugin is any module or object with functions marked ``@hookimpl`` whose names
match the specifications below (pluggy project ``qmp_reactor``). Built-in action
types are plugins too (``reactor.plugins.manager.BUILTIN_PLUGINS``). Core code never calls
these hooks directly: it goes through the typed wrapper ``reactor.plugins.manager.Plugins``.

::

    from reactor.plugins.hookspecs import hookimpl

    @hookimpl
    def reactor_register_actions(register):
        register(ActionType(name="touch", params=TouchParams, run=run_touch))
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import pluggy

from reactor.model import Envelope
from reactor.plugins.api import ActionType, PluginState

PROJECT = "qmp_reactor"
"""The pluggy project name, also the entry-point group installed plugins declare."""

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[ActionType], None]
"""The callback ``reactor_register_actions`` receives."""

OutcomeStatus = Literal["ok", "retry", "failed", "dead", "suppressed", "cancelled"]


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    """How one attempt of one action invocation ended.

    ``status``: ``ok`` (done), ``retry`` (transient failure, another attempt is
    scheduled), ``failed`` (permanent failure), ``dead`` (out of retries, moved to
    the dead letters), ``suppressed`` (not run, e.g. by a guard or dry run),
    ``cancelled`` (stopped by a newer firing of a ``mode: restart`` rule).
    ``error`` is the failure message with secrets already redacted.
    """

    invocation_id: str
    rule: str
    action: str
    vm: str
    event: str
    status: OutcomeStatus
    attempt: int
    error: str | None
    duration: float


@hookspec
def reactor_register_actions(register: Register) -> None:
    """Register action types: call ``register(ActionType(...))`` once per type.

    Called once per plugin manager, the first time the host needs the action
    types (``check``, ``run``, ``plugins``). The host validates each type when
    ``register`` is called: a malformed name or a name another plugin already
    registered raises ``PluginError`` naming both plugins. Returns nothing.
    """


@hookspec
def reactor_event(envelope: Envelope) -> None:
    """Observe an event: called for every event after QEMU's rate-limit stage, before matching.

    ``envelope`` is the event as rules see it; treat it as read-only. The return
    value is ignored. An observer that raises is logged and skipped; it never
    stops the engine or the other observers. Keep it fast: it runs on the hot path.
    """


@hookspec
def reactor_action_outcome(outcome: ActionOutcome) -> None:
    """Observe how each attempt of each action invocation ended.

    Called by the dispatcher after every attempt (``ok``, ``retry``, ``failed``),
    when an invocation goes to the dead letters (``dead``) and when it is
    suppressed. The return value is ignored; an observer that raises is logged.
    """


@hookspec
def reactor_startup(settings: Any) -> Awaitable[None] | None:
    """Called once when the engine starts, with the loaded configuration.

    May return an awaitable, which the host awaits before the first event. An
    exception aborts the start-up as a ``PluginError`` naming the plugin.
    """


@hookspec
def reactor_shutdown() -> Awaitable[None] | None:
    """Called once when the engine stops, after the last action finished.

    May return an awaitable (e.g. closing a shared HTTP client), which the host
    awaits. An exception is logged; the other plugins still shut down.
    """


@hookspec
def reactor_state(store: PluginState) -> None:
    """Take the plugin's durable state: ``store`` is its own namespace of the state file.

    Called once ``run`` opened the engine's state file, before the first event
    (never with ``engine_state: false``, nor in commands that keep no state), and
    again for each reload's new generation, also for a plugin object kept from
    the old one: it must be idempotent. An exception aborts the start (or refuses the reload)
    as a ``PluginError`` naming the plugin. Returns nothing.
    """
