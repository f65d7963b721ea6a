"""Which rules an event fires: rules indexed by event name, conditions compiled.

Exact names are a dict lookup; globs are resolved once per event name seen and
cached, so the per-event cost does not grow with the number of glob rules. For
each event name, the conditions of all its candidate rules are compiled into one
Python function that reads each plain path once and inlines the tests, so the
hot path makes no call per rule and no list per path.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reactor.conditions import SourceBuilder, generated_code
from reactor.model import Envelope, Firing, Rule

Matcher = Callable[[Envelope], list[Rule]]

_GLOB_CHARS = frozenset("*?[")
_CACHE_LIMIT = 4096


@dataclass(frozen=True)
class RuleSet:
    """An immutable, indexed set of compiled rules (file order kept)."""

    rules: tuple[Rule, ...] = ()
    _cache: dict[str, tuple[Rule, ...]] = field(default_factory=dict, compare=False, repr=False)
    _matchers: dict[str, Matcher] = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.rules)

    def by_name(self, name: str) -> Rule | None:
        """The rule called ``name``, if any."""
        return next((r for r in self.rules if r.name == name), None)

    def candidates(self, event: str) -> tuple[Rule, ...]:
        """The enabled rules whose ``on:`` covers ``event``, in file order."""
        found = self._cache.get(event)
        if found is None:
            found = tuple(
                r for r in self.rules if r.enabled and any(_covers(p, event) for p in r.events)
            )
            if len(self._cache) >= _CACHE_LIMIT:  # event names come from peers: stay bounded
                self._cache.clear()
            self._cache[event] = found
        return found

    def matcher(self, event: str) -> Matcher:
        """A function giving the rules for ``event`` whose conditions hold, in file order."""
        found = self._matchers.get(event)
        if found is None:
            found = compile_matcher(self.candidates(event))
            if len(self._matchers) >= _CACHE_LIMIT:
                self._matchers.clear()
            self._matchers[event] = found
        return found


def compile_matcher(rules: tuple[Rule, ...]) -> Matcher:
    """One generated function testing every rule's condition; returns those that hold."""
    if not rules:
        return lambda env: []
    fn: Matcher = _generate(rules, {}, "out = []", lambda i, rule: f"out.append(RULE{i})", "out")
    return fn


Route = Callable[[Envelope], None]


def compile_route(
    rules: tuple[Rule, ...],
    now: Callable[[], float],
    sink: Callable[[Firing], object],
    gates: Mapping[str, Callable[[Envelope], object]],
) -> Route:
    """One generated function taking an envelope through ``rules`` in file order.

    Each rule whose condition holds goes to its gate (``gates[rule.name]``, for
    rules with a threshold or throttle) or straight to ``sink`` as a ``Firing``
    with ``count`` 1 at ``now()``: no list is built, no call made for a rule
    that does not match.
    """
    if not rules:
        return _ignore
    names: dict[str, Any] = {"SINK": sink, "FIRING": Firing, "NOW": now}
    names.update((f"GATE{i}", gates[r.name]) for i, r in enumerate(rules) if r.name in gates)

    def action(i: int, rule: Rule) -> str:
        if rule.name in gates:
            return f"GATE{i}(env)"
        return f'SINK(FIRING(RULE{i}, env, NOW(), {{"count": 1}}))'

    fn: Route = _generate(rules, names, "", action, "None")
    return fn


def _ignore(env: Envelope) -> None:
    pass


def _generate(
    rules: tuple[Rule, ...],
    names: dict[str, Any],
    head: str,
    action: Callable[[int, Rule], str],
    result: str,
) -> Any:
    """Compile ``def f(env)``: each plain path read once, ``head``, a test per rule, ``result``."""
    b = SourceBuilder()
    b.ns.update(names)
    body = [f"    {head}"] if head else []
    for i, rule in enumerate(rules):
        b.ns[f"RULE{i}"] = rule
        if rule.when is None:
            body.append(f"    {action(i, rule)}")
        else:
            body.append(f"    if {b.expr(rule.when)}:\n        {action(i, rule)}")
    src = b.function("def f(env):", [*body, f"    return {result}"])
    exec(generated_code(src, "<rules>"), b.ns)  # our own generated source only
    return b.ns["f"]


def _covers(pattern: str, event: str) -> bool:
    if _GLOB_CHARS.isdisjoint(pattern):
        return pattern == event
    return fnmatch.fnmatchcase(event, pattern)
