"""A loaded rule set: compiled rules in file order, indexed by the event names they cover.

Exact names are a dict lookup; globs are resolved once per event name seen and
cached (bounded: event names come from peers), so the per-event cost does not
grow with the number of glob rules. The engine compiles its routes from
``candidates``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from reactor.model import Rule

_GLOB_CHARS = frozenset("*?[")
_CACHE_LIMIT = 4096


@dataclass(frozen=True)
class RuleSet:
    """An immutable, indexed set of compiled rules (file order kept)."""

    rules: tuple[Rule, ...] = ()
    _cache: dict[str, tuple[Rule, ...]] = field(default_factory=dict, compare=False, repr=False)

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
                r for r in self.rules if r.enabled and any(covers(p, event) for p in r.events)
            )
            if len(self._cache) >= _CACHE_LIMIT:  # event names come from peers: stay bounded
                self._cache.clear()
            self._cache[event] = found
        return found


def covers(pattern: str, event: str) -> bool:
    """Whether an ``on:`` item (a name or a glob) covers the event name ``event``."""
    if _GLOB_CHARS.isdisjoint(pattern):
        return pattern == event
    return fnmatch.fnmatchcase(event, pattern)
