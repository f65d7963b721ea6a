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

from reactor.clock import Clock
from reactor.dispatch.attempts import Render
from reactor.dispatch.dispatcher import Dispatcher
from reactor.dispatch.journal import Journal, journal_path
from reactor.dispatch.silences import SilenceFilter, log_silenced, silence_path
from reactor.engine.core import Engine
from reactor.errors import PluginError
from reactor.model import Envelope
from reactor.params.secrets import Redactor, SecretResolver
from reactor.plugins.api import ActionSettings, ActionType, VmControl
from reactor.plugins.hookspecs import ActionOutcome
from reactor.plugins.manager import Plugins
from reactor.rules.catalog import load_catalog, qemu_version_of
from reactor.rules.ruleset import RuleSet
from reactor.rules.versions import release_problems, targets
from reactor.service.config import Config
from reactor.service.enginestate import PluginStore, StateFile, StateKeeper, state_path
from reactor.service.generation import Generation
from reactor.service.render import Renderer
from reactor.sources.vm import hostname, qemu_timestamp

log = logging.getLogger("reactor")


SWITCH_INTERVAL = 0.0005
"""Seconds a busy thread holds the GIL while another waits for it (Python's default: 0.005)."""


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
    """Engine + dispatcher + journal, fed envelopes by whoever owns the event source.

    ``config``, ``rules``, ``action_types``, ``settings`` and ``render`` are what a
    generation holds (``for_generation`` takes them from one); ``use`` swaps in
    another generation's.
    """

    def __init__(
        self,
        *,
        config: Config,
        rules: RuleSet,
        action_types: Mapping[str, ActionType],
        clock: Clock,
        state_dir: Path | None,
        settings: ActionSettings | None = None,
        render: Render | None = None,
        observe: Callable[[Envelope], None] | None = None,
        on_outcome: Callable[[ActionOutcome], None] | None = None,
        vm_lookup: Callable[[str, str | None], VmControl | None] = lambda vm, source: None,
        emit: Callable[[str, str, dict[str, Any], str | None], None] | None = None,
        sleep: Any = None,
        redactor: Redactor | None = None,
        keep_state: bool = False,
    ) -> None:
        self.config = config
        self.redactor = Redactor() if redactor is None else redactor
        """Masks the secrets this reactor resolved, in errors, actions and (given to the
        log set-up) log lines."""
        self.journal = (
            Journal(journal_path(state_dir), exclusive=True) if state_dir is not None else None
        )
        acts = config.actions
        extra: dict[str, Any] = {"sleep": sleep} if sleep is not None else {}
        self.dispatcher = Dispatcher(
            action_types=action_types,
            settings=settings or acts.settings(),
            render=render or Renderer(SecretResolver(self.redactor)),
            journal=self.journal,
            vm_lookup=vm_lookup,
            emit=emit or self.emit_local,
            on_outcome=on_outcome,
            redact=self.redactor.redact,
            default_retry=acts.retry.policy(),
            default_timeout=acts.timeout,
            max_concurrency=acts.max_concurrency,
            per_type_limits=acts.limits,
            **extra,
        )
        self.silences = (
            SilenceFilter(path=silence_path(state_dir), on_silenced=log_silenced)
            if state_dir is not None
            else None
        )
        sink = self.dispatcher.submit
        self.engine = Engine(
            rules,
            clock,
            self.silences.wrap(sink) if self.silences is not None else sink,
            qemu_stage=config.qemu_stage,
            observe=observe,
        )
        self._seq = 0
        self._warned: set[tuple[str, str]] = set()  # (VM, QEMU version) already judged
        self.state: StateKeeper | None = None
        """Keeps the engine's windows (and the plugins' own state) across restarts."""
        if keep_state and state_dir is not None:
            self.state = StateKeeper(self.engine, StateFile(state_path(state_dir)))

    def open_plugins_state(self, plugins: Plugins) -> None:
        """Give each plugin its namespace of the state file (the ``reactor_state`` hook);
        nothing without durable state. A plugin that fails raises PluginError naming it."""
        if self.state is None:
            return
        file = self.state.file
        plugins.state(lambda name: PluginStore(file, name))

    @classmethod
    def for_generation(cls, gen: Generation, *, clock: Clock, **kwargs: Any) -> Reactor:
        """A reactor running ``gen`` (``kwargs``: the event source's side, as ``__init__``;
        ``state_dir`` defaults to the generation's)."""
        kwargs.setdefault("state_dir", gen.state_dir)
        kwargs.setdefault("redactor", gen.renderer.resolver.redactor)
        reactor = cls(
            config=gen.config, rules=gen.rules, action_types=gen.action_types,
            settings=gen.settings, render=gen.renderer, clock=clock, **kwargs,
        )  # fmt: skip
        try:
            reactor.open_plugins_state(gen.plugins)
        except PluginError:
            reactor.close_files()
            raise
        return reactor

    def use(self, gen: Generation, observe: Callable[[Envelope], None] | None) -> None:
        """Run ``gen`` from now on (its ``qemu_stage`` must be this one's: that needs a restart).

        Invocations that start later use its action types; attempts that start
        later use its settings, renderer and limits; new firings its rules. Its
        plugins get their state before (``open_plugins_state``, where a failure
        can still refuse the reload).
        """
        acts = gen.config.actions
        self.config = gen.config
        self.dispatcher.reconfigure(
            action_types=gen.action_types, settings=gen.settings, render=gen.renderer,
            default_retry=acts.retry.policy(), default_timeout=acts.timeout,
            max_concurrency=acts.max_concurrency, per_type_limits=acts.limits,
        )  # fmt: skip
        self.engine.observe = observe
        self.swap_rules(gen.rules)

    def feed(self, env: Envelope) -> None:
        """One envelope into the engine."""
        if env["event"] == "REACTOR_CONNECTED":
            self._connected(env)
        self.engine.feed(env)

    def _connected(self, env: Envelope) -> None:
        """Warn, once per VM and QEMU version, about rules naming what that QEMU cannot send."""
        data = env.get("data")
        version = qemu_version_of(data) if isinstance(data, dict) else None
        if version is None or (env["vm"], version) in self._warned:
            return
        self._warned.add((env["vm"], version))
        catalog = load_catalog()
        wanted = targets([version], catalog)
        log.info("%s: QEMU %s: following QEMU %s's rate limits", env["vm"], version,
                 wanted[0].release)  # fmt: skip
        for rule in self.engine.rules.rules:
            for problem in release_problems(rule, wanted, catalog, severity="warning"):
                log.warning("%s: %s", env["vm"], problem)

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
        self._warned.clear()  # the new rules are judged at each VM's next connect

    async def start(self) -> None:
        """Start the dispatcher, resuming what the journal left unfinished, then take back
        the engine's state (what ended while the sidecar was down goes out now)."""
        await self.dispatcher.start()
        if self.state is not None:
            self.state.restore()
            self.state.start()

    async def stop(self, grace: float) -> None:
        """No new actions; in-flight ones get ``grace`` seconds; the rest stay journaled."""
        if self.state is not None:
            await self.state.stop()
        await self.dispatcher.shutdown(grace)
        self.close_files()

    def close_files(self) -> None:
        """Close the journal and the state file (a reactor that never started, or stopped)."""
        if self.journal is not None:
            self.journal.close()
        if self.state is not None:
            self.state.file.close()
