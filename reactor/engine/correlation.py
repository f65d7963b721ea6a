"""Correlation in time: a rule's ``absent:`` and ``followed_by:``.

A correlated rule's ``on``/``when`` select *first* events; its correlation's
``on``/``when`` select *followers*. A first opens a pending state for its key
(at most one per key: a first that comes while one is pending is ignored) with
a deadline at its time + ``within``. Every event is offered as a follower to
the pending firsts before it is offered as a first (the engine does both, in
that order). Then:

* ``absent``: a follower cancels the pending first silently; at the deadline
  with no follower the rule fires with the first event, at the deadline's time.
* ``followed_by``: a follower fires the rule at its own time with the follower's
  envelope, which carries the first's as ``first``; the pending first is
  cleared. At the deadline with no follower nothing happens.

Deadlines are clock timers, so a deadline due at the same time as an event runs
before it (the clock's rule) and a replay's end of input runs every deadline.
What fires goes to ``out``: the rule's throttle if it has one, else a firing.
The number of pending firsts per rule is bounded (``PENDING_LIMIT``): keys may
come from guest data, and a first past the bound is ignored and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any

from reactor.clock import Clock, TimerHandle
from reactor.engine.keys import compiled_keyfunc
from reactor.engine.windowsets import thaw
from reactor.model import Correlation, Envelope, Rule

PENDING_LIMIT = 65536
"""Pending firsts one rule keeps at most; later firsts are ignored until some end."""

Explain = Callable[[Envelope, Rule | None, str], None]


class _Pending:
    __slots__ = ("env", "since", "timer")

    def __init__(self, env: Envelope, since: float, timer: TimerHandle) -> None:
        self.env = env
        self.since = since
        self.timer = timer


class Correlator:
    """One correlated rule's pending firsts, their deadlines, and what followers do to them."""

    __slots__ = (
        "_clock",
        "_corr",
        "_explain",
        "_follows",
        "_key",
        "_out",
        "_pending",
        "_rule",
        "changes",
        "overflow",
    )

    def __init__(
        self,
        rule: Rule,
        clock: Clock,
        out: Callable[[Envelope], object],
        explain: Explain | None = None,
    ) -> None:
        assert rule.correlation is not None
        self._rule = rule
        self._corr: Correlation = rule.correlation
        self._clock = clock
        self._out = out
        self._explain = explain
        self._key = compiled_keyfunc(self._corr.key)
        self._follows = self._corr.condition
        self._pending: dict[Hashable, _Pending] = {}
        self.overflow = 0
        """Firsts ignored because ``PENDING_LIMIT`` firsts were pending."""
        self.changes = 0
        """Bumped by whatever changes what ``dump`` writes (a first pending or ending)."""

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def events(self) -> tuple[str, ...]:
        """The follower event names and globs."""
        return self._corr.events

    def follow(self, env: Envelope) -> None:
        """Offer an event of one of the follower types; it counts if its conditions hold."""
        if not self._pending:
            return
        key = self._key(env)
        pending = self._pending.get(key)
        if pending is None:
            return
        if self._follows is not None and not self._follows(env):
            if self._explain is not None and self._corr.explain is not None:
                why = self._corr.explain(env)
                self._say(env, f"not a follower of the first at {_t(pending.since)}: {why}")
            return
        del self._pending[key]
        self.changes += 1
        pending.timer.cancel()
        absent = self._corr.kind == "absent"
        if self._explain is not None:  # the messages only for --explain: this is the hot path
            since = _t(pending.since)
            if absent:
                self._say(env, f"follower: cancels the first at {since} (absent)")
            else:
                self._say(env, f"follower of the first at {since}: fires")
        if not absent:
            self._out({**env, "first": pending.env})

    def first(self, env: Envelope) -> str | None:
        """Offer a matched first event; None if it became pending, else why not."""
        key = self._key(env)
        pending = self._pending.get(key)
        if pending is not None:
            return f"ignored as a first: one of this key is pending since {_t(pending.since)}"
        pending = self._open(key, env)
        if pending is None:
            return f"ignored as a first: {PENDING_LIMIT} firsts are pending"
        since, until = _t(pending.since), _t(pending.since + self._corr.within)
        return f"pending since {since}: waiting until {until} for {self._followers()}"

    def _pend(self, key: Hashable, env: Envelope, since: float) -> _Pending:
        timer = self._clock.call_at(since + self._corr.within, lambda: self._deadline(key))
        pending = self._pending[key] = _Pending(env, since, timer)
        self.changes += 1
        return pending

    def dump(self, base: float) -> list[list[Any]]:
        """The pending firsts as JSON-able rows ``[key, envelope, since]`` (since - ``base``)."""
        return [[key, p.env, p.since - base] for key, p in self._pending.items()]

    def restore(self, rows: Iterable[list[Any]], base: float) -> None:
        """Take back pending firsts; those whose deadline passed meanwhile end now."""
        for key, env, since in rows:
            frozen = thaw(key)
            if frozen not in self._pending and len(self._pending) < PENDING_LIMIT:
                self._pend(frozen, env, base + since)

    def close(self) -> None:
        """Cancel every deadline: the pending firsts live on elsewhere."""
        for pending in self._pending.values():
            pending.timer.cancel()

    def push(self, env: Envelope) -> None:
        """``first`` for the compiled routes, which ignore the reason (none is written)."""
        key = self._key(env)
        if key not in self._pending:
            self._open(key, env)

    def _open(self, key: Hashable, env: Envelope) -> _Pending | None:
        """A new pending first for ``key``, or None (counted) if ``PENDING_LIMIT`` are pending."""
        if len(self._pending) >= PENDING_LIMIT:
            self.overflow += 1
            return None
        return self._pend(key, env, self._clock.now())

    def _deadline(self, key: Hashable) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        self.changes += 1
        if self._corr.kind == "followed_by":
            self._say(pending.env, f"no follower within {self._corr.within:g}s: nothing fires")
            return
        self._say(pending.env, f"no follower within {self._corr.within:g}s: fires")
        self._out(pending.env)

    def _followers(self) -> str:
        names = " or ".join(self._corr.events)
        return names + (" (with its conditions)" if self._follows is not None else "")

    def _say(self, env: Envelope, message: str) -> None:
        if self._explain is not None:
            self._explain(env, self._rule, message)

    def pending(self) -> list[dict[str, Any]]:
        """The pending firsts: their envelope and when they started (for tests and state)."""
        return [{"env": p.env, "since": p.since} for p in self._pending.values()]


def _t(moment: float) -> str:
    return f"{moment:.6f}"
