"""Per-attempt timeouts at the price of a list append: ``asyncio.timeout`` semantics, shared timers.

``asyncio.timeout`` schedules and cancels a loop timer per use, about 4 us, a
fifth of an action's whole cost in the dispatcher. Attempts with the same
timeout reach their deadlines in the order they started, so ``Deadlines``
keeps one FIFO and one loop timer per timeout length: starting an attempt
appends to the FIFO (dropping finished ones at its head), and the timer, when
it fires, cancels the attempts whose deadline came and re-arms for the oldest
one still running. The cancellation and its hand-over are asyncio's own
(``Timeout._on_timeout`` and ``__aexit__``): the task is cancelled, and when
the attempt ends, ``uncancel`` tells whether the CancelledError was ours.
"""

from __future__ import annotations

import asyncio
from collections import deque

_RUNNING, _EXPIRING, _OVER = 0, 1, 2


class Deadline:
    """One attempt's deadline; ``end`` must be called when the attempt ends, however it ends."""

    __slots__ = ("at", "cancelling", "expired", "state", "task")

    def __init__(self, at: float, task: asyncio.Task[object]) -> None:
        self.at = at
        self.task = task
        self.cancelling = task.cancelling()
        self.state = _RUNNING
        self.expired = False
        """After ``end``: whether the deadline had come (``asyncio.Timeout.expired``)."""

    def end(self, cancelled: bool) -> bool:
        """Close the deadline; True if the attempt's ``CancelledError`` (``cancelled``) is ours.

        As ``asyncio.Timeout.__aexit__``: a deadline that came takes back its
        cancellation, and the error is a timeout only if nobody else cancelled.
        """
        self.expired = self.state == _EXPIRING
        self.state = _OVER
        return self.expired and self.task.uncancel() <= self.cancelling and cancelled


class _Queue:
    """The attempts of one timeout length, oldest first, and the loop timer for its head."""

    __slots__ = ("entries", "timer")

    def __init__(self) -> None:
        self.entries: deque[Deadline] = deque()
        self.timer: asyncio.TimerHandle | None = None


class Deadlines:
    """Deadlines for attempts on the running loop (see the module docstring)."""

    def __init__(self) -> None:
        self._queues: dict[float, _Queue] = {}

    def start(self, timeout: float) -> Deadline:
        """A deadline ``timeout`` seconds from now for the current task's attempt."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = _Queue()
        entries = queue.entries
        while entries and entries[0].state == _OVER:
            entries.popleft()
        deadline = Deadline(loop.time() + timeout, task)
        entries.append(deadline)
        if queue.timer is None:
            queue.timer = loop.call_at(deadline.at, self._fire, loop, queue)
        return deadline

    def _fire(self, loop: asyncio.AbstractEventLoop, queue: _Queue) -> None:
        queue.timer = None
        entries, now = queue.entries, loop.time()
        while entries and (entries[0].state == _OVER or entries[0].at <= now):
            deadline = entries.popleft()
            if deadline.state == _RUNNING:
                deadline.task.cancel()
                deadline.state = _EXPIRING
        if entries:
            queue.timer = loop.call_at(entries[0].at, self._fire, loop, queue)
