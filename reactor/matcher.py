"""Which rules an event fires: rules indexed by event name, conditions compiled.

Exact names are a dict lookup; globs are resolved once per event name seen and
cached, so the per-event cost does not grow with the number of glob rules. For
each event name, the conditions of all its candidate rules are compiled into one
Python function that reads each plain path once and inlines the tests, so the
hot path makes no call per rule and no list per path.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reactor.conditions import SourceBuilder
from reactor.model import Envelope, Rule

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
    b = SourceBuilder()
    ns: dict[str, Any] = b.ns
    tests = []
    for i, rule in enumerate(rules):
        ns[f"RULE{i}"] = rule
        if rule.when is None:
            tests.append(f"    out.append(RULE{i})")
        else:
            tests.append(f"    if {b.expr(rule.when)}:\n        out.append(RULE{i})")
    src = "\n".join(["def match(env):", *b.prologue(), "    out = []", *tests, "    return out"])
    exec(compile(src + "\n", "<rules>", "exec"), ns)  # our own generated source only
    fn: Matcher = ns["match"]
    return fn


def _covers(pattern: str, event: str) -> bool:
    if _GLOB_CHARS.isdisjoint(pattern):
        return pattern == event
    return fnmatch.fnmatchcase(event, pattern)
