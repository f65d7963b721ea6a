"""The assembled reactor: engine, dispatcher, journal and plugins wired together.

``Reactor`` is what ``run``, ``demo`` and ``replay --execute`` share: envelopes
go in through ``feed``; the engine's firings go to the dispatcher, which runs
the actions through the journal; actions reach VMs through ``vm_lookup`` and
raise synthetic events back through ``emit``. ``vm_lookup(vm, source)`` gets the
VM's name and the ``source`` of the envelope that fired the action, so an action
reaches the connection that raised its event, never a later one with that
name. The event source (QMP connections, a replay file) is the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from reactor.clock import Clock
from reactor.dispatch.dispatcher import Dispatcher
from reactor.dispatch.journal import Invocation, Journal, journal_path
from reactor.engine.core import Engine
from reactor.errors import PermanentActionError
from reactor.model import Envelope
from reactor.params.secrets import SecretResolver, redact
from reactor.params.templates import (
    CompiledParams,
    compile_params,
    format_path,
    is_template,
    template_variables,
)
from reactor.plugins.api import ActionSettings, ActionType, VmControl
from reactor.plugins.hookspecs import ActionOutcome
from reactor.rules.ruleset import RuleSet
from reactor.service.config import Config
from reactor.sources.vm import hostname, qemu_timestamp

log = logging.getLogger("reactor")


class Renderer:
    """Renders an invocation's raw ``with:`` parameters: templates, secrets, validation.

    Compiled templates are cached by their source, so a resumed invocation (whose
    rule may have changed since) renders exactly what was journaled. A rule's own
    parameters are also found by identity, without serialising them; parameters
    with no template or secret are rendered without building template variables.
    """

    def __init__(self, resolver: SecretResolver | None = None, limit: int = 4096) -> None:
        self.resolver = resolver or SecretResolver()
        self.limit = limit
        self._cache: dict[bytes, tuple[CompiledParams, bool]] = {}
        # Keyed by id(); each entry keeps its params alive, so an id is never reused meanwhile.
        self._by_id: dict[int, tuple[Mapping[str, Any], CompiledParams, bool]] = {}

    def _compiled(self, params: Mapping[str, Any]) -> tuple[CompiledParams, bool]:
        """The compiled params, and whether they hold any template or secret reference."""
        mine = self._by_id.get(id(params))
        if mine is not None and mine[0] is params:
            return mine[1], mine[2]
        key = orjson.dumps(params, option=orjson.OPT_SORT_KEYS, default=str)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= self.limit:
                self._cache.clear()
            found = self._cache[key] = (compile_params(params), _templated(params))
        if len(self._by_id) >= self.limit:
            self._by_id.clear()
        self._by_id[id(params)] = (params, *found)
        return found

    def __call__(self, inv: Invocation, kind: ActionType) -> BaseModel:
        """The validated parameter model for ``inv``; PermanentActionError if invalid."""
        compiled, templated = self._compiled(inv.spec.params)
        variables = (
            template_variables(inv.envelope, rule=inv.rule, context=inv.context, now=time.time())
            if templated
            else {}  # nothing would read them
        )
        rendered = compiled.render(variables, secrets=self.resolver)
        try:
            return kind.params.model_validate(rendered)
        except ValidationError as err:
            details = "; ".join(
                f"{format_path(tuple(e['loc']))}: {e['msg']}"
                for e in err.errors(include_url=False, include_input=False)
            )
            raise PermanentActionError(
                redact(f"{kind.name}: rendered parameters are invalid: {details}")
            ) from None


SWITCH_INTERVAL = 0.0005
"""Seconds a busy thread holds the GIL while another waits for it (Python's default: 0.005)."""


def _templated(value: Any) -> bool:
    """Whether ``value`` holds a string that ``compile_params`` compiles."""
    if isinstance(value, str):
        return is_template(value)
    if isinstance(value, Mapping):
        return any(_templated(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_templated(v) for v in value)
    return False


def tune_for_serving() -> None:
    """Set the interpreter up for serving events (call once the daemon is ready).

    - Modules, plugins, the compiled rules and the reactor itself live as long
      as the process; re-scanning them on every full collection was a quarter
      of the CPU time at high event rates. ``gc.freeze`` parks them in a
      permanent generation (reference counting still frees what loses its last
      reference).
    - The journal commits in a worker thread; when its fsync returns while the
      event loop is busy, it waits for the GIL up to the switch interval, and
      every action waits for its commit. A shorter interval keeps a VM that
      floods the loop from adding 5 ms per commit to the other VMs' latency.
    """
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL)


@contextlib.contextmanager
def refrozen() -> Iterator[None]:
    """Around a rule reload: the replaced rules become collectable, the new ones are frozen."""
    gc.unfreeze()
    try:
        yield
    finally:
        gc.collect()
        gc.freeze()


def synthetic_envelope(
    vm: str, event: str, data: dict[str, Any], seq: int, source: str | None = None
) -> Envelope:
    """An event the sidecar raises itself, without a connection: ``source`` is the one
    whose action raised it (its actions then go there, or nowhere), else ``reactor``."""
    now = time.time()
    return {
        "event": event,
        "data": data,
        "timestamp": qemu_timestamp(now),
        "vm": vm,
        "host": hostname(),
        "source": source or "reactor",
        "seq": seq,
        "received_at": now,
    }


class Reactor:
    """Engine + dispatcher + journal, fed envelopes by whoever owns the event source."""

    def __init__(
        self,
        *,
        config: Config,
        rules: RuleSet,
        action_types: Mapping[str, ActionType],
        clock: Clock,
        state_dir: Path | None,
        settings: ActionSettings | None = None,
        observe: Callable[[Envelope], None] | None = None,
        on_outcome: Callable[[ActionOutcome], None] | None = None,
        vm_lookup: Callable[[str, str | None], VmControl | None] = lambda vm, source: None,
        emit: Callable[[str, str, dict[str, Any], str | None], None] | None = None,
        sleep: Any = None,
    ) -> None:
        self.config = config
        self.journal = (
            Journal(journal_path(state_dir), exclusive=True) if state_dir is not None else None
        )
        acts = config.actions
        extra: dict[str, Any] = {"sleep": sleep} if sleep is not None else {}
        self.dispatcher = Dispatcher(
            action_types=action_types,
            settings=settings or acts.settings(),
            render=Renderer(),
            journal=self.journal,
            vm_lookup=vm_lookup,
            emit=emit or self.emit_local,
            on_outcome=on_outcome,
            redact=redact,
            default_retry=acts.retry.policy(),
            default_timeout=acts.timeout,
            max_concurrency=acts.max_concurrency,
            per_type_limits=acts.limits,
            **extra,
        )
        self.engine = Engine(
            rules, clock, self.dispatcher.submit, qemu_stage=config.qemu_stage, observe=observe
        )
        self._seq = 0

    def feed(self, env: Envelope) -> None:
        """One envelope into the engine."""
        self.engine.feed(env)

    def backpressure(self) -> asyncio.Event | None:
        """None while there is room; else an Event that readers of events wait for first."""
        return self.dispatcher.backpressure()

    def emit_local(
        self, vm: str, event: str, data: dict[str, Any], source: str | None = None
    ) -> None:
        """Raise a synthetic event for ``vm`` without a connection (replay, a source gone)."""
        self._seq += 1
        self.feed(synthetic_envelope(vm, event, data, self._seq, source))

    def swap_rules(self, rules: RuleSet) -> None:
        """Use a new, fully validated rule set."""
        self.engine.swap_rules(rules)

    async def start(self) -> None:
        """Start the dispatcher, resuming what the journal left unfinished."""
        await self.dispatcher.start()

    async def stop(self, grace: float) -> None:
        """No new actions; in-flight ones get ``grace`` seconds; the rest stay journaled."""
        await self.dispatcher.shutdown(grace)
        if self.journal is not None:
            self.journal.close()
