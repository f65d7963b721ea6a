"""Keyed windows of one length on one clock, expired lazily: the machinery under windows.py.

A window set maps keys to states (``_Slot``) that each live for a window. The
naive way, one clock timer per window, costs a timer object, a heap push and a
callback for every window, and most windows end with nothing to do. Here an
offer looks at its own key's state only, and treats a state whose window has
ended as gone (and reuses it), exactly as if a timer had removed it. Memory is
freed in one of two ways:

- ``Rotating`` (QEMU's stage and ``qemu`` throttles, ``once_within``): states
  live in two generations; every window length or more the older one is
  dropped whole, since a window opened before a rotation has ended by the next.
- ``Windows`` (``once_after``, thresholds): each (re)opened window appends
  ``(end, key)`` to a FIFO, sorted by end since a set has one window length and
  the clock never goes back; ended windows are settled from its head. A FIFO
  entry whose key has no state, or whose state has another end, is stale (the
  state was reopened, extended or dropped) and is skipped.

Each set has one clock timer, armed at the earliest moment something must
happen on time (a held event going out at its window's end), else for the next
rotation or a window after the oldest end, so that memory is freed when events
stop too; ``len()`` counts the windows still open.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from operator import itemgetter
from typing import Any, Generic, TypeVar

from reactor.clock import Clock, TimerHandle
from reactor.durations import secs
from reactor.model import Envelope

Out = Callable[[Envelope, int], None]


class _Slot:
    """One key's window: its VM, its end, a held event and the events folded in."""

    __slots__ = ("count", "end", "env", "seq", "vm")

    def __init__(self, vm: str, end: float, env: Envelope | None = None, count: int = 0) -> None:
        self.vm = vm
        self.end = end
        self.env = env
        self.count = count
        self.seq = 0


class _Tally(_Slot):
    """A threshold key's arrival times, oldest first, all younger than the window."""

    __slots__ = ("times",)

    def __init__(self, vm: str, end: float) -> None:
        super().__init__(vm, end)
        self.times: deque[float] = deque()


S = TypeVar("S", bound=_Slot)

Row = list[Any]
"""One window as durable state: ``[key, vm, end, env, count, times]``, times relative to a base."""


def thaw(key: Any) -> Hashable:
    """A key read back from JSON: its lists become the tuples they were."""
    if isinstance(key, list):
        return tuple(thaw(part) for part in key)
    return key  # type: ignore[no-any-return]


def _row(key: Hashable, slot: _Slot, base: float) -> Row:
    times = getattr(slot, "times", None)
    ago = [t - base for t in times] if times is not None else None
    return [key, slot.vm, slot.end - base, slot.env, slot.count, ago]


class Windows(Generic[S]):
    """Keyed windows of one length on one clock, with lazy expiry (see the module docstring).

    A state belongs to the VM of the latest event that reached it (keys that span
    VMs are shared; ``drop_vm`` forgets those whose latest event came from the VM).
    Subclasses say what a window's end does (``_ended``) and which ends must be on
    time (``_wake``).
    """

    __slots__ = ("_clock", "_due", "_slots", "_timer", "_timer_at", "window")
    _EMPTY_ENDS_FORGET = True
    """Whether a window that ends holding nothing is simply forgotten (not so for thresholds)."""

    def __init__(self, clock: Clock, window: float) -> None:
        self._clock = clock
        self.window = window
        self._slots: dict[Hashable, S] = {}
        self._due: deque[tuple[float, Hashable]] = deque()
        self._timer: TimerHandle | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        self._settle(self._clock.now(), False)
        return len(self._slots)

    def drop_vm(self, vm: str) -> None:
        """Forget the states whose latest event came from ``vm`` (held events included)."""
        # A scan, not a per-VM index: dropping a VM is rare, pushing is the hot path.
        slots = self._slots
        gone = {k for k, s in slots.items() if s.vm == vm}
        for key in gone:
            del slots[key]
        # Their entries go too: a key opened again at this instant would match their end.
        self._due = deque(e for e in self._due if e[1] not in gone)
        self._settle(self._clock.now(), False)  # no window left: the timer goes too

    def held(self) -> list[tuple[Envelope, int]]:
        """The events waiting for their window's end, with the events each stands for."""
        return [(s.env, s.count) for s in self._slots.values() if s.env is not None]

    def dump(self, base: float) -> list[Row]:
        """The open windows as JSON-able rows, their times relative to ``base``."""
        self._settle(self._clock.now(), False)
        return [_row(key, slot, base) for key, slot in self._slots.items()]

    def restore(self, rows: Iterable[Row], base: float) -> None:
        """Open the windows ``dump`` wrote (times relative to ``base`` on this clock).

        Windows that ended meanwhile end at once: a held event goes out now.
        """
        entries = list(self._due)
        for key, vm, end, env, count, times in rows:
            slot = self._make(vm, base + end)
            slot.env, slot.count = env, count
            frozen = thaw(key)
            self._slots[frozen] = slot
            entries.append((slot.end, frozen))
            for t in times or ():
                slot.times.append(base + t)  # type: ignore[attr-defined]
                entries.append((base + t + self.window, frozen))
        self._due = deque(sorted(entries, key=itemgetter(0)))
        if self._due:
            when = self._next_on_time()
            self._arm(self._due[0][0] + self.window if when is None else when)

    def close(self) -> None:
        """Cancel the set's timer: nothing of it happens any more (its state was carried)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _make(self, vm: str, end: float) -> S:
        raise NotImplementedError

    def _open(self, key: Hashable, slot: S) -> None:
        """Register ``slot`` (its ``end`` set) as ``key``'s window."""
        self._slots[key] = slot
        self._due.append((slot.end, key))
        if self._timer is None:
            self._arm(slot.end + self.window)

    def _settle(self, now: float, on_time: bool) -> None:
        """End the windows due by ``now``; held ones only ``on_time`` (from the timer)."""
        due, slots = self._due, self._slots
        popleft, get, forgets = due.popleft, slots.get, self._EMPTY_ENDS_FORGET
        while due:
            entry = popleft()
            end, key = entry
            if end > now:
                due.appendleft(entry)
                break
            slot = get(key)
            if slot is None or slot.end != end:
                continue  # stale
            if slot.env is None:
                if forgets:
                    del slots[key]
                    continue
            elif not on_time:
                due.appendleft(entry)
                break  # its timer is due: it goes out at its time, not here
            self._ended(key, slot)
        if not slots:
            due.clear()  # only stale entries are left
        if not due and self._timer is not None:
            self._timer.cancel()  # no window left: nothing to wake up for
            self._timer = None

    def _ended(self, key: Hashable, slot: S) -> None:
        """The window of ``key`` ended (its state is ``slot``); the default forgets it."""
        del self._slots[key]

    def _wake(self, when: float) -> None:
        """Make sure the set's timer runs no later than ``when``."""
        if self._timer is None or when < self._timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._clock.call_at(when, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._settle(self._clock.now(), True)
        when = self._next_on_time()
        if when is not None:
            self._arm(when)
        elif self._due:
            self._arm(self._due[0][0] + self.window)

    def _next_on_time(self) -> float | None:
        """The earliest pending end that must run on time, if any."""
        return None


class Throttle(Windows[_Slot]):
    """Windows that pass events on; what goes out at a window's end goes to ``out``.

    ``offer`` returns None when the event passes now (the caller sends it on:
    one call less on the hot path), else why not; ``out(envelope, events folded
    in)`` receives what a window's end lets out.
    """

    __slots__ = ("_out", "_reason")
    REASON = ""

    def __init__(self, clock: Clock, window: float, out: Out) -> None:
        super().__init__(clock, window)
        self._out = out
        self._reason = self.REASON.format(secs(window))

    def offer(self, key: Hashable, env: Envelope) -> str | None:
        """None if ``env`` passes now (the caller sends it); else why not (for --explain)."""
        raise NotImplementedError

    def _make(self, vm: str, end: float) -> _Slot:
        return _Slot(vm, end)


class Rotating(Throttle):
    """Throttle windows forgotten a generation at a time: no work per window that ends empty.

    A window (re)opened before a rotation has ended by the next one, a window
    length later or more; so at each rotation the older of two dicts is dropped
    whole and the newer becomes the older. An offer looks its key up in both and
    treats a state whose window has ended as gone. Only a held event needs its
    window's end on time; the one clock timer runs for those and for rotations.
    """

    __slots__ = ("_old", "_rotate_at", "_seq")

    def __init__(self, clock: Clock, window: float, out: Out) -> None:
        super().__init__(clock, window, out)
        self._old: dict[Hashable, _Slot] = {}
        self._rotate_at = 0.0
        self._seq = 0

    def __len__(self) -> int:
        now = self._clock.now()
        live = 0
        for gen in (self._slots, self._old):
            for slot in gen.values():
                live += slot.env is not None or slot.end > now
        return live

    def drop_vm(self, vm: str) -> None:
        """Forget the states whose latest event came from ``vm`` (held events included)."""
        for gen in (self._slots, self._old):
            for key in [k for k, s in gen.items() if s.vm == vm]:
                del gen[key]
        if not self._slots and not self._old and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def held(self) -> list[tuple[Envelope, int]]:
        """The events waiting for their window's end, with the events each stands for."""
        slots = [*self._old.values(), *self._slots.values()]
        return [(s.env, s.count) for s in slots if s.env is not None]

    def dump(self, base: float) -> list[Row]:
        """The windows still open or holding an event, times relative to ``base``."""
        now = self._clock.now()
        return [
            _row(key, slot, base)
            for gen in (self._old, self._slots)
            for key, slot in gen.items()
            if slot.env is not None or slot.end > now
        ]

    def restore(self, rows: Iterable[Row], base: float) -> None:
        """Open the windows ``dump`` wrote; a held event whose window ended goes out now."""
        for key, vm, end, env, count, _ in rows:
            slot = _Slot(vm, base + end, env, count)
            frozen = thaw(key)
            self._open(frozen, slot)
            if env is not None:
                self._restored(frozen, slot)

    def _restored(self, key: Hashable, slot: _Slot) -> None:
        """A restored window holds an event (only the QEMU algorithm holds any)."""

    def _find(self, key: Hashable) -> _Slot | None:
        slot = self._slots.get(key)
        return self._old.get(key) if slot is None else slot

    def _open(self, key: Hashable, slot: _Slot) -> None:
        self._seq += 1
        slot.seq = self._seq  # the order windows opened in, for ends at the same instant
        if not self._slots and not self._old:  # the first state: rotations start
            self._rotate_at = self._clock.now() + self.window
            self._arm(self._rotate_at)
        self._slots[key] = slot

    def _reopen(self, key: Hashable, slot: _Slot, now: float) -> None:
        """``slot`` starts a new window now, in the newer generation."""
        if self._old.get(key) is slot:
            del self._old[key]
        slot.end = now + self.window
        self._open(key, slot)

    def _tick(self) -> None:
        self._timer = None
        now = self._clock.now()
        self._ends_due(now)
        if now >= self._rotate_at:
            self._old, self._slots = self._slots, {}
            self._rotate_at = now + self.window
        if self._slots or self._old:
            when = self._next_on_time()
            self._arm(self._rotate_at if when is None else min(when, self._rotate_at))

    def _ends_due(self, now: float) -> None:
        """What must happen at the windows' ends due by ``now`` (nothing by default)."""


class QemuWindows(Rotating):
    """QEMU's algorithm: first event out at once, then the last of each window at its end."""

    __slots__ = ("_held", "holds", "replaced")
    REASON = "held (qemu {})"

    def __init__(self, clock: Clock, window: float, out: Out) -> None:
        super().__init__(clock, window, out)
        self.holds = 0
        self.replaced = 0
        self._held: list[tuple[float, int, Hashable, _Slot]] = []

    def offer(self, key: Hashable, env: Envelope) -> str | None:
        """None if ``env`` passes now (the caller sends it); else why it is held."""
        now = self._clock.now()
        slot = self._slots.get(key)
        if slot is None:
            slot = self._old.get(key)
            if slot is None:
                self._open(key, _Slot(env["vm"], now + self.window))
                return None
        if slot.env is None:
            if slot.end <= now:  # the window ended empty: a new one opens
                slot.vm = env["vm"]
                self._reopen(key, slot, now)
                return None
            heapq.heappush(self._held, (slot.end, slot.seq, key, slot))
            self._wake(slot.end)
        else:
            self.replaced += 1
        self.holds += 1
        slot.env = env
        slot.vm = env["vm"]
        slot.count += 1
        return self._reason

    def _restored(self, key: Hashable, slot: _Slot) -> None:
        heapq.heappush(self._held, (slot.end, slot.seq, key, slot))
        self._wake(slot.end)

    def _ends_due(self, now: float) -> None:
        held = self._held
        while held and held[0][0] <= now:
            end, _, key, slot = heapq.heappop(held)
            if slot.env is None or slot.end != end or self._find(key) is not slot:
                continue  # dropped, or already out
            env, count = slot.env, slot.count
            slot.env = None
            slot.count = 0
            # State is settled before emitting, so a callback that pushes again sees it.
            self._reopen(key, slot, now)
            self._out(env, count)

    def _next_on_time(self) -> float | None:
        return self._held[0][0] if self._held else None


class OnceWithin(Rotating):
    """First event fires at once; the rest of its window is dropped."""

    __slots__ = ()
    REASON = "throttled (once_within {})"

    def offer(self, key: Hashable, env: Envelope) -> str | None:
        """None if ``env`` fires now (the caller sends it); else why it was dropped."""
        now = self._clock.now()
        slot = self._find(key)
        if slot is None:
            self._open(key, _Slot(env["vm"], now + self.window))
            return None
        slot.vm = env["vm"]
        if slot.end <= now:  # the window ended: a new one opens
            self._reopen(key, slot, now)
            return None
        return self._reason


class OnceAfter(Throttle):
    """First event opens the window; at its end the last event fires, counting them all."""

    __slots__ = ()
    REASON = "held (once_after {}, "

    def offer(self, key: Hashable, env: Envelope) -> str | None:
        """Why ``env`` is held: it never fires at once."""
        slot = self._slots.get(key)
        if slot is None:
            slot = _Slot(env["vm"], self._clock.now() + self.window, env, 1)
            self._open(key, slot)
            self._wake(slot.end)
        else:
            slot.env = env
            slot.vm = env["vm"]
            slot.count += 1
        n = slot.count
        return f"{self._reason}{n} event{'' if n == 1 else 's'})"

    def _ended(self, key: Hashable, slot: _Slot) -> None:
        del self._slots[key]
        if slot.env is not None:
            self._out(slot.env, slot.count)

    def _next_on_time(self) -> float | None:
        # Every window holds an event; entries of dropped VMs only wake the timer early.
        return self._due[0][0] if self._due else None


class Threshold(Windows[_Tally]):
    """Sliding-window counts per key; a key's state lives until its last event ages out.

    Each event adds a FIFO entry at its own age-out time; a state's ``end`` is the
    one entry that counts, as a per-state timer would have been re-armed: at the
    first event's age-out, then at the latest event's, until no event is left.
    """

    __slots__ = ("count",)
    _EMPTY_ENDS_FORGET = False

    def __init__(self, clock: Clock, window: float, count: int) -> None:
        super().__init__(clock, window)
        self.count = count

    def offer(self, key: Hashable, env: Envelope) -> str | None:
        """None if ``env`` made ``count`` within the window (counting restarts); else why not."""
        now = self._clock.now()
        slot = self._slots.get(key)
        if slot is not None and slot.end <= now and self._over(slot, now):
            slot = None
        if slot is None:
            slot = _Tally(env["vm"], now + self.window)
            self._open(key, slot)
        else:
            slot.vm = env["vm"]
            self._age(slot.times, now)
            self._due.append((now + self.window, key))
        times = slot.times
        times.append(now)
        n = len(times)
        if n >= self.count:
            # The state stays until its end so that resetting changes no timer.
            times.clear()
            return None
        return f"below threshold ({n}/{self.count} in {secs(self.window)})"

    def _age(self, times: deque[float], now: float) -> None:
        # ``t + window <= now`` is the very sum each FIFO entry holds, so a window
        # ending at its time always ages out its event, whatever float rounding does.
        window = self.window
        while times and times[0] + window <= now:
            times.popleft()

    def _make(self, vm: str, end: float) -> _Tally:
        return _Tally(vm, end)

    def _over(self, slot: _Tally, now: float) -> bool:
        """Whether a state whose ``end`` is due has no event left by ``now`` (else: extend it).

        What its timers would have done by ``now``: at ``end`` the events are aged;
        if some are left, the state lives until the latest one ages out.
        """
        times = slot.times
        self._age(times, slot.end)
        if not times or times[-1] + self.window <= now:
            return True
        slot.end = times[-1] + self.window
        return False

    def _ended(self, key: Hashable, slot: _Tally) -> None:
        times = slot.times
        self._age(times, slot.end)
        if times:
            slot.end = times[-1] + self.window
        else:
            del self._slots[key]
