"""One action run the way the daemon runs it, for the tests of each action type.

A rule with the one action fires; a real ``Dispatcher`` (no journal, one
attempt) renders its ``with:`` through the reactor's ``Renderer`` (templates,
secrets, validation), builds the ``ActionContext`` and runs the action. What
the action returned, the context it got, and the error it (or the rendering)
raised are kept as they were, not as the dispatcher's one-line summary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel

from reactor.dispatch.dispatcher import Dispatcher
from reactor.dispatch.journal import Invocation
from reactor.errors import Location
from reactor.model import ActionSpec, Envelope, Firing, RetryPolicy, Rule
from reactor.params.secrets import SecretResolver
from reactor.plugins.api import ActionContext, ActionSettings, ActionType, VmControl
from reactor.plugins.hookspecs import ActionOutcome
from reactor.service.reactor import Renderer

ONCE = RetryPolicy(attempts=1, initial=0.0, max=0.0, jitter=0.0)


@dataclass
class Ran:
    """What one dispatched invocation left behind."""

    result: Any = None
    ctx: ActionContext | None = None
    error: BaseException | None = None
    outcomes: list[ActionOutcome] = field(default_factory=list)
    emitted: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def value(self) -> Any:
        """The action's return value, or its error (or the rendering's) raised again."""
        if self.error is not None:
            raise self.error
        return self.result


def dispatch_once(
    kind: ActionType,
    params: Mapping[str, Any],
    envelope: Envelope,
    *,
    rule: str = "r",
    context: dict[str, Any] | None = None,
    settings: ActionSettings | None = None,
    vm: VmControl | None = None,
    resolver: SecretResolver | None = None,
    closing: Callable[[], Awaitable[Any]] | None = None,
) -> Ran:
    """Fire a rule of one ``kind`` action with ``params`` on ``envelope``; run it once.

    ``closing`` is awaited on the same loop at the end (a plugin's shutdown hook).
    """

    async def go() -> Ran:
        try:
            return await _dispatch(kind, params, envelope, rule, context, settings, vm, resolver)
        finally:
            if closing is not None:
                await closing()

    return asyncio.run(go())


async def _dispatch(
    kind: ActionType,
    params: Mapping[str, Any],
    envelope: Envelope,
    rule: str,
    context: dict[str, Any] | None,
    settings: ActionSettings | None,
    vm: VmControl | None,
    resolver: SecretResolver | None,
) -> Ran:
    ran = Ran()
    renderer = Renderer(resolver)

    def render(inv: Invocation, atype: ActionType) -> BaseModel:
        try:
            return renderer(inv, atype)
        except Exception as err:
            ran.error = err
            raise

    async def run(model: BaseModel, ctx: ActionContext) -> Any:
        ran.ctx = ctx
        try:
            ran.result = await kind.run(model, ctx)
        except Exception as err:
            ran.error = err
            raise
        return ran.result

    dispatcher = Dispatcher(
        action_types={kind.name: replace(kind, run=run)},
        settings=settings or ActionSettings(),
        render=render,
        journal=None,
        vm_lookup=lambda name, source=None: vm,
        emit=lambda vm_name, event, data, source=None: ran.emitted.append((vm_name, event, data)),
        on_outcome=ran.outcomes.append,
        redact=renderer.resolver.redactor.redact,
        default_retry=ONCE,
        default_timeout=120.0,
    )
    spec = ActionSpec(kind.name, params, Location("rules.yaml", 1, 1))
    await dispatcher.start()
    try:
        dispatcher.submit(
            Firing(Rule(rule, (str(envelope["event"]),), (spec,), spec.location), envelope, 0.0,
                   dict(context or {}))
        )  # fmt: skip
        await dispatcher.drain()
    finally:
        await dispatcher.shutdown(5.0)
    return ran
