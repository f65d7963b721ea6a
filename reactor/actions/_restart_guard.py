"""The restart guard: which restarts of a VM may happen, and when (the cap and the backoff).

Each VM's recent restarts are ``Restart`` records kept by a ``RestartHistory``
(``MemoryHistory`` by default, one per guard; a durable history plugs in through
the same two methods and should come with a wall clock, ``clock=time.time``).
The guard admits a restart unless ``limit`` were admitted within ``window`` (the
cap, past which ``restart_vm`` reports REACTOR_RESTART_SUPPRESSED), and with a
``Backoff`` gives it a time before which it must not happen: consecutive
restarts wait ``initial``, then twice as long each time up to ``max``; a VM that
ran ``reset_after`` since its last restart starts again from no wait.
``decide`` answers with an ``Admission``; ``admit`` is the plain
``(admitted, restarts)`` of the guard before it had a backoff.

The guard also remembers, per invocation, since when its restart has waited for
the VM's block jobs and migration (``jobs_wait``, ``end_jobs_wait``): that wait
is made of attempts that end at once with ``ActionNotDue``, so no attempt can
hold the time. It is kept on the guard's ``monotonic`` clock, whatever clock the
history uses, in memory only (a sidecar that starts again waits anew), for at
most ``JOBS_WAITS_KEPT`` invocations (the oldest goes: an invocation cancelled
while it waited never ends its wait).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

JOBS_WAITS_KEPT = 10_000
"""Invocations whose wait for jobs and migration a guard remembers at most."""


@dataclass(frozen=True, slots=True)
class Restart:
    """One admitted restart of a VM (times on the guard's clock)."""

    invocation: str
    at: float
    """When it was admitted."""
    due: float
    """When it may be carried out: ``at`` plus its backoff delay."""
    streak: int = 1
    """Its place among consecutive restarts of the VM (1: none ran just before)."""
    ran: float | None = None
    """When the VM was seen running again after it (None: not verified)."""
    dumped: bool = False
    """Whether the guest's memory was dumped before it."""
    stopped: bool = False
    """Whether the VM was seen not running while this restart waited out its backoff."""

    @property
    def running_since(self) -> float:
        """Since when the VM has run after this restart, as well as the guard knows."""
        return self.due if self.ran is None else self.ran


@dataclass(frozen=True, slots=True)
class Backoff:
    """Crash-loop backoff: ``initial`` doubling up to ``max``; forgotten after ``reset_after``."""

    initial: float
    max: float
    reset_after: float

    def delay(self, streak: int) -> float:
        """The wait before the ``streak``-th consecutive restart (none before the first)."""
        if streak <= 1:
            return 0.0
        return float(min(self.initial * 2.0 ** min(streak - 2, 64), self.max))


@dataclass(frozen=True, slots=True)
class Admission:
    """The guard's answer for one restart."""

    admitted: bool
    restarts: int
    """Restarts admitted within the window, this one included."""
    streak: int = 0
    due: float = 0.0
    """When the restart may happen, on the guard's clock."""
    dumped: bool = False
    stopped: bool = False
    at: float = 0.0
    """When the restart was admitted, on the guard's clock."""


class RestartHistory(Protocol):
    """Where a guard keeps each VM's restarts, oldest first."""

    def load(self, vm: str) -> tuple[Restart, ...]:
        """The restarts kept for ``vm`` (empty if none)."""
        ...

    def save(self, vm: str, restarts: tuple[Restart, ...]) -> None:
        """Replace the restarts kept for ``vm``."""
        ...


class MemoryHistory:
    """A ``RestartHistory`` in a dictionary: gone when the process ends."""

    def __init__(self) -> None:
        self._restarts: dict[str, tuple[Restart, ...]] = {}

    def load(self, vm: str) -> tuple[Restart, ...]:
        """The restarts kept for ``vm``."""
        return self._restarts.get(vm, ())

    def save(self, vm: str, restarts: tuple[Restart, ...]) -> None:
        """Replace the restarts kept for ``vm``."""
        self._restarts[vm] = restarts


class RestartGuard:
    """Admits restarts per VM: a cap per sliding window, and an optional backoff."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        history: RestartHistory | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.history: RestartHistory = MemoryHistory() if history is None else history
        self.monotonic = monotonic
        """The clock of the waits for jobs and migration (never the wall clock)."""
        self._lock = threading.Lock()
        self._jobs_waits: dict[str, float] = {}
        """Invocation -> when its restart first found the VM busy, oldest first."""

    def attach(self, history: RestartHistory, clock: Callable[[], float] = time.time) -> None:
        """Keep restarts in ``history`` from now on, timed by ``clock`` (a durable history's
        times must mean the same after a restart of the sidecar: the wall clock).

        Call it before the first restart: what the previous history held stays there.
        """
        with self._lock:
            self.history, self.clock = history, clock

    def admit(self, vm: str, invocation_id: str, limit: int, window: float) -> tuple[bool, int]:
        """Whether ``vm`` may restart now, and the restarts counted in the window (no backoff)."""
        answer = self.decide(vm, invocation_id, limit, window)
        return answer.admitted, answer.restarts

    def decide(
        self,
        vm: str,
        invocation_id: str,
        limit: int,
        window: float,
        backoff: Backoff | None = None,
    ) -> Admission:
        """Whether ``vm`` may restart, and when; an admitted restart is recorded.

        Another attempt of the same invocation gets the same answer without
        counting twice, so a retry waits only what is left of its backoff.
        """
        now = self.clock()
        with self._lock:
            kept = self.history.load(vm)
            recent = [r for r in kept if r.at > now - window]
            mine = next((r for r in kept if r.invocation == invocation_id), None)
            if mine is not None:
                return Admission(
                    True, len(recent), mine.streak, mine.due, mine.dumped, mine.stopped, mine.at
                )
            if len(recent) >= limit:
                return Admission(False, len(recent))
            restart = self._next(kept[-1] if kept else None, invocation_id, now, backoff)
            # The last restart stays, even out of the window: the next streak counts from it.
            # So does one still waiting for jobs: its next run must find itself admitted.
            older = [
                r for r in kept[:-1] if r.at > now - window or r.invocation in self._jobs_waits
            ] + list(kept[-1:])
            self.history.save(vm, (*older, restart))
            return Admission(True, len(recent) + 1, restart.streak, restart.due, at=now)

    @staticmethod
    def _next(
        last: Restart | None, invocation_id: str, now: float, backoff: Backoff | None
    ) -> Restart:
        if backoff is None or last is None or now - last.running_since >= backoff.reset_after:
            return Restart(invocation_id, now, now)
        streak = last.streak + 1
        return Restart(invocation_id, now, max(now, last.due) + backoff.delay(streak), streak)

    def note(
        self,
        vm: str,
        invocation_id: str,
        *,
        ran: bool = False,
        dumped: bool = False,
        stopped: bool = False,
    ) -> None:
        """Record that the VM ran again after this restart, that its memory was dumped, or
        that it was seen stopped while the restart waited."""
        now = self.clock()
        with self._lock:
            kept = self.history.load(vm)
            changed = tuple(
                dataclasses.replace(
                    r,
                    ran=now if ran else r.ran,
                    dumped=dumped or r.dumped,
                    stopped=stopped or r.stopped,
                )
                if r.invocation == invocation_id
                else r
                for r in kept
            )
            self.history.save(vm, changed)

    def jobs_wait(self, invocation_id: str) -> tuple[float, bool]:
        """Seconds this invocation's restart has waited for jobs and migration, and whether
        the wait starts now (it then counts from now)."""
        now = self.monotonic()
        with self._lock:
            since = self._jobs_waits.get(invocation_id)
            if since is not None:
                return now - since, False
            while len(self._jobs_waits) >= JOBS_WAITS_KEPT:
                del self._jobs_waits[next(iter(self._jobs_waits))]
            self._jobs_waits[invocation_id] = now
            return 0.0, True

    def end_jobs_wait(self, invocation_id: str) -> float | None:
        """Forget this invocation's wait for jobs and migration; how long it lasted (seconds,
        None if it was not waiting)."""
        now = self.monotonic()
        with self._lock:
            since = self._jobs_waits.pop(invocation_id, None)
        return None if since is None else now - since

    @property
    def jobs_waiting(self) -> int:
        """How many invocations' waits for jobs and migration the guard remembers."""
        with self._lock:
            return len(self._jobs_waits)
