"""The engine: envelopes in, firings out, on whatever clock it is given.

Per envelope: QEMU's rate-limit stage (for event types QEMU throttles, per VM,
as the VM's QEMU release throttles them: its REACTOR_CONNECTED says which), then
observers, then the rules indexed by event name, their conditions, and their
threshold/throttle gates. A rule that fires becomes a ``Firing`` handed to the
sink (the dispatcher live, a printer in a dry-run replay). No I/O happens here;
the same code runs on the live clock and on replay's virtual clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import NamedTuple

from reactor.clock import Clock
from reactor.engine import state
from reactor.engine.correlation import Correlator
from reactor.engine.gates import QemuStage, RuleGate
from reactor.engine.routes import Route, compile_route, ignore
from reactor.model import Envelope, Firing, Rule
from reactor.rules.ruleset import RuleSet, covers

Sink = Callable[[Firing], object]
Explain = Callable[[Envelope, Rule | None, str], None]
"""``explain(envelope, rule, message)``: why a rule did or did not fire (rule None: the event)."""

_ROUTE_LIMIT = 4096


class Held(NamedTuple):
    """An event held for a window's end: by QEMU's stage (``rule`` None) or a rule's throttle."""

    rule: str | None
    envelope: Envelope
    events: int


class Engine:
    """Matches envelopes against a rule set and emits firings to a sink."""

    def __init__(
        self,
        rules: RuleSet,
        clock: Clock,
        sink: Sink,
        *,
        qemu_stage: bool = True,
        qemu_version: str | None = None,
        observe: Callable[[Envelope], None] | None = None,
        explain: Explain | None = None,
    ) -> None:
        self.clock = clock
        self.sink = sink
        self.observe = observe
        self.explain = explain
        self.stage = (
            QemuStage(clock, self._match, release=qemu_version, pinned=qemu_version is not None)
            if qemu_stage
            else None
        )
        self._told: set[tuple[str | None, str]] = set()  # (host, VM)s --explain told of
        self.events_in = 0
        self.rules = rules
        self._gates: dict[str, RuleGate] = {}
        self._suppressed_before: Counter[str] = Counter()
        self._correlators: dict[str, Correlator] = {}
        self._followers: dict[str, tuple[Correlator, ...]] = {}
        self._routes: dict[str, Route] = {}
        self._ways: dict[str, Route] = {}
        self._make_gates()

    def suppressed(self) -> dict[str, int]:
        """Matching events rule gates did not fire when they came, by ``threshold``/``throttle``."""
        total = Counter(self._suppressed_before)
        for gate in self._gates.values():
            total.update(gate.suppressed)
        return dict(total)

    def _make_gates(self) -> None:
        for gate in self._gates.values():  # a rule reload keeps the counts going
            self._suppressed_before.update(gate.suppressed)
        self._gates = {
            r.name: RuleGate(r, self.clock, self._fire)
            for r in self.rules.rules
            if r.throttle is not None or r.threshold is not None
        }
        self._correlators = {
            r.name: Correlator(r, self.clock, self._correlated_out(r), self.explain)
            for r in self.rules.rules
            if r.correlation is not None and r.enabled
        }
        self._followers = {}
        self._routes = {}
        self._ways = {}

    def _correlated_out(self, rule: Rule) -> Callable[[Envelope], object]:
        """Where a correlated rule's firings go: its throttle, else straight to a firing."""
        gate = self._gates.get(rule.name)
        if gate is not None:
            return gate.push
        assert rule.correlation is not None
        context = {"count": 1, "correlation": rule.correlation.kind}
        return lambda env: self._fire(Firing(rule, env, self.clock.now(), dict(context)))

    def followers_of(self, event: str) -> tuple[Correlator, ...]:
        """The correlators that take ``event`` as a possible follower (cached, bounded)."""
        found = self._followers.get(event)
        if found is None:
            found = tuple(
                c
                for c in self._correlators.values()
                if any(covers(pattern, event) for pattern in c.events)
            )
            if len(self._followers) >= _ROUTE_LIMIT:
                self._followers.clear()
            self._followers[event] = found
        return found

    @property
    def pending_firsts(self) -> int:
        """Correlated firsts waiting for a follower or their deadline."""
        return sum(len(c) for c in self._correlators.values())

    def stateful(self) -> Iterator[tuple[Rule, RuleGate | None, Correlator | None]]:
        """Each rule with a state: its gate (threshold, throttle) and its pending firsts."""
        for rule in self.rules.rules:
            gate, pending = self._gates.get(rule.name), self._correlators.get(rule.name)
            if gate is not None or pending is not None:
                yield rule, gate, pending

    def swap_rules(self, rules: RuleSet) -> None:
        """Use a new, fully validated rule set.

        A rule whose state has the same shape in both (``reactor.engine.state``)
        keeps its windows, held events and pending firsts; the others start
        afresh, while what the old ones hold still goes out at its time.
        """
        now = self.clock.now()
        parts = state.dump(self, now)
        parts.pop(state.STAGE, None)  # the stage is not the rules': it stays as it is
        old = list(self.stateful())
        self.rules = rules
        self._make_gates()
        carried = set(state.restore(self, parts, now))
        for rule, gate, pending in old:
            if gate is not None and state.part_name("gate", rule) in carried:
                gate.close()
            if pending is not None and state.part_name("pending", rule) in carried:
                pending.close()

    def held(self) -> list[Held]:
        """Everything waiting for a window's end: QEMU's stage first, then each rule's throttle.

        What a stop now would lose (the current rules' windows only).
        """
        stage = self.stage.held() if self.stage is not None else []
        held = [Held(None, env, count) for env, count in stage]
        for name, gate in self._gates.items():
            held.extend(Held(name, env, count) for env, count in gate.held())
        return held

    def feed(self, env: Envelope) -> None:
        """Take one envelope (the only entry point, live and in replay)."""
        self.events_in += 1
        way = self._ways.get(env["event"])
        if way is None:
            way = self._way(env["event"])
        way(env)

    def _way(self, event: str) -> Route:
        """What ``feed`` does with ``event``: the stage first, or straight to the rules."""
        stage = self.stage
        staged = stage is not None and stage.throttles(event)
        way: Route
        if self.observe is not None or self.explain is not None:
            way = self._staged if staged else self._match
        elif stage is not None and staged:
            # An event no rule takes is not staged: whatever the stage did, nothing fires.
            route = self._route(event)
            way = route if route is ignore else self._compiled(event, stage.admit)
        else:
            way = self._route(event)
        if stage is not None and event == "REACTOR_CONNECTED":
            way = self._connected(stage, way)
        elif stage is not None and self.explain is not None:
            way = self._telling(stage, way)
        if len(self._ways) >= _ROUTE_LIMIT:
            self._ways.clear()
        self._ways[event] = way
        return way

    def _connected(self, stage: QemuStage, way: Route) -> Route:
        """``way`` for REACTOR_CONNECTED: the stage follows the VM's QEMU version first."""
        explain = self.explain

        def connected(env: Envelope) -> None:
            told = stage.connected(env)
            if explain is not None:
                self._told.add((env.get("host"), env["vm"]))
                explain(env, None, told)
            way(env)

        return connected

    def _telling(self, stage: QemuStage, way: Route) -> Route:
        """``way`` that first says (``--explain``) which table a VM seen the first time uses."""
        explain, told = self.explain, self._told
        assert explain is not None

        def telling(env: Envelope) -> None:
            vm = (env.get("host"), env["vm"])
            if vm not in told:
                told.add(vm)
                explain(env, None, stage.describe(vm[1], vm[0]))
            way(env)

        return telling

    def _staged(self, env: Envelope) -> None:
        assert self.stage is not None
        if not self.stage.push(env) and self.explain is not None:
            self.explain(env, None, "held by QEMU's rate limit (1 per second per key)")

    def drop_vm(self, vm: str) -> None:
        """Forget every window state of a VM that went away."""
        if self.stage is not None:
            self.stage.drop_vm(vm)
        for gate in self._gates.values():
            gate.drop_vm(vm)

    def _fire(self, firing: Firing) -> None:
        if self.explain is not None:
            count = firing.context.get("count", 1)
            self.explain(firing.envelope, firing.rule, f"fired (count {count})")
        self.sink(firing)

    def _match(self, env: Envelope) -> None:
        if self.observe is not None:
            self.observe(env)
        if self.explain is not None:
            self._match_explained(env)
            return
        route = self._routes.get(env["event"])
        if route is None:
            route = self._route(env["event"])
        route(env)

    def _route(self, event: str) -> Route:
        """The compiled way of ``event`` through the rules, cached (bounded: peers name events).

        Followers first: an event is offered to correlated rules' pending firsts
        before it is offered to any rule as a first.
        """
        route = self._compiled(event, None)
        if len(self._routes) >= _ROUTE_LIMIT:
            self._routes.clear()
        self._routes[event] = route
        return route

    def _compiled(self, event: str, admit: Callable[[Envelope], bool] | None) -> Route:
        """The generated route of ``event``: ``admit`` first, if given, then followers, rules."""
        gates: dict[str, Callable[[Envelope], object]] = {
            name: gate.push for name, gate in self._gates.items()
        }
        gates.update((name, c.push) for name, c in self._correlators.items())
        follow = [c.follow for c in self.followers_of(event)]
        rules, now = self.rules.candidates(event), self.clock.now
        return compile_route(rules, now, self.sink, gates, follow=follow, admit=admit)

    def _match_explained(self, env: Envelope) -> None:
        """The slow path for ``--explain``: every rule is tested and the reason said."""
        explain = self.explain
        assert explain is not None
        for correlator in self.followers_of(env["event"]):
            correlator.follow(env)
        for rule in self.rules.candidates(env["event"]):
            cond = rule.condition
            if cond is not None and not cond(env):
                if rule.explain is not None:
                    explain(env, rule, f"condition failed: {rule.explain(env)}")
                continue
            pending = self._correlators.get(rule.name)
            if pending is not None:
                explain(env, rule, pending.first(env) or "")
                continue
            gate = self._gates.get(rule.name)
            if gate is None:
                self._fire(Firing(rule, env, self.clock.now(), {"count": 1}))
                continue
            why = gate.push(env)
            if why is not None:
                explain(env, rule, why)
