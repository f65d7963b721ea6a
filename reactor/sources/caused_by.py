"""Which events our own commands provoke, so their envelopes can say ``caused_by``.

Before a connection sends a command on behalf of a rule's action it records an
expectation for the events that command provokes, each with a deadline; the next
matching event on that VM consumes it. Expired expectations fall away lazily, so
the structure stays as small as the number of recent commands.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

EXPECT_WINDOW = 5.0
"""Seconds an event QEMU raises by itself at once may follow our command."""

GUEST_WINDOW = 30.0
"""Seconds a SHUTDOWN may follow our system_powerdown (the guest has to act on it)."""

PROVOKES: dict[str, tuple[tuple[str, float], ...]] = {
    "system_reset": (("RESET", EXPECT_WINDOW),),
    "cont": (("RESUME", EXPECT_WINDOW),),
    "stop": (("STOP", EXPECT_WINDOW),),
    "system_powerdown": (("POWERDOWN", EXPECT_WINDOW), ("SHUTDOWN", GUEST_WINDOW)),
    "quit": (("SHUTDOWN", EXPECT_WINDOW),),
}
"""QMP command -> (event it provokes, seconds to wait for it)."""


@dataclass(slots=True)
class Expectation:
    """One event we wait for, on behalf of ``rule``'s ``action``, until ``deadline``."""

    event: str
    deadline: float
    rule: str
    action: str
    cancelled: bool = False


class Expectations:
    """Pending expectations of one VM, by event name (monotonic-clock deadlines)."""

    __slots__ = ("_by_event",)

    def __init__(self) -> None:
        self._by_event: dict[str, deque[Expectation]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_event)

    def add(self, command: str, rule: str, action: str, now: float) -> list[Expectation]:
        """Expect the events ``command`` provokes; returns them (for ``cancel``)."""
        self._prune(now)
        added = []
        for event, window in PROVOKES.get(command, ()):
            item = Expectation(event, now + window, rule, action)
            self._by_event.setdefault(event, deque()).append(item)
            added.append(item)
        return added

    def cancel(self, items: list[Expectation]) -> None:
        """Withdraw expectations whose command QEMU refused."""
        for item in items:
            item.cancelled = True

    def match(self, event: str, now: float) -> dict[str, str] | None:
        """Consume the oldest live expectation of ``event``: its ``caused_by``, or None."""
        queue = self._by_event.get(event)
        if queue is None:
            return None
        found = None
        while queue and found is None:
            item = queue.popleft()
            if not item.cancelled and item.deadline >= now:
                found = {"rule": item.rule, "action": item.action}
        if not queue:
            del self._by_event[event]
        return found

    def _prune(self, now: float) -> None:
        for event in list(self._by_event):
            queue = self._by_event[event]
            while queue and (queue[0].cancelled or queue[0].deadline < now):
                queue.popleft()
            if not queue:
                del self._by_event[event]
