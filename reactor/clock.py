"""Clocks: the one notion of time the engine's windows run on.

The same engine code runs on real time (``AsyncioClock``, the live path) and on
the virtual clock of ``replay`` (``VirtualClock``: time jumps to each event's
timestamp and never goes back). Times are float seconds since the epoch.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    """A scheduled callback that can be cancelled."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """What windows need from time: read it, and be called back at a moment."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...


class _VirtualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """A clock that moves only when told to; timers run in (time, order) order."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._heap: list[tuple[float, int, _VirtualTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        """The current virtual time."""
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> _VirtualTimer:
        """Schedule ``callback`` at virtual time ``when`` (at once if in the past)."""
        now = self._now
        timer = _VirtualTimer(now if now > when else when, callback)  # max(), without its call
        heapq.heappush(self._heap, (timer.when, next(self._order), timer))
        return timer

    def advance(self, to: float) -> None:
        """Run every timer due by ``to``, each at its own time; never go back."""
        heap = self._heap
        while heap and heap[0][0] <= to:
            when, _, timer = heapq.heappop(heap)
            if timer.cancelled:
                continue
            if when > self._now:
                self._now = when
            timer.callback()
        if to > self._now:
            self._now = to

    def drain(self) -> None:
        """Run every pending timer, however far ahead (the end of a replay)."""
        while self._heap:
            self.advance(self._heap[0][0])

    def pending(self) -> int:
        """How many timers are scheduled and not cancelled."""
        return sum(1 for _, _, t in self._heap if not t.cancelled)


class AsyncioClock:
    """Epoch-like time that never jumps, with asyncio timers, for the live path.

    The epoch is read once; after that time moves with the monotonic clock, so a
    wall clock stepped by NTP or an operator neither stretches nor shrinks a window.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._offset = time.time() - time.monotonic()

    def now(self) -> float:
        """Seconds since the epoch as read at start, advanced monotonically."""
        return time.monotonic() + self._offset

    def call_at(self, when: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        """Schedule ``callback`` after ``when - now()`` seconds on the running loop."""
        loop = self._loop or asyncio.get_running_loop()
        return loop.call_later(max(0.0, when - self.now()), callback)
