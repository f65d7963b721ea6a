"""A second pair of ears on a real QEMU: every event of one QMP monitor, with its arrival time.

QEMU sends every event to every connected monitor at the same moment, so an ``EventTap`` on its
own monitor (``ThrowawayQemu(extra_qmp=["tap", ...])``) sees exactly what the sidecar's monitor
is sent, and when. End-to-end tests compare what the sidecar did with this ground truth.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from reactor.demo.machine import QmpDriver, QmpError

Event = dict[str, Any]


class EventTap:
    """Reads one QMP monitor in a thread; :meth:`events` are ``(arrival, event)`` pairs.

    ``arrival`` is ``time.time()`` when the event was read off the socket. The tap reconnects
    when QEMU comes back after a restart, so it can watch a VM across ``restart()``.
    """

    def __init__(self, path: Path, *, poll: float = 0.05) -> None:
        self.path = path
        self._poll = poll
        self._driver = QmpDriver(path)
        self._driver.connect()
        self._received: list[tuple[float, Event]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._driver.next_event(self._poll)
            except TimeoutError:
                continue
            except (QmpError, OSError):
                self._reconnect()
                continue
            arrival = time.time()
            with self._cond:
                self._received.append((arrival, event))
                self._cond.notify_all()

    def _reconnect(self) -> None:
        while not self._stop.is_set():
            try:
                self._driver.connect(timeout=self._poll)
            except (QmpError, OSError, TimeoutError):
                time.sleep(self._poll)
                continue
            return

    def events(self, name: str | None = None) -> list[tuple[float, Event]]:
        """The events received so far (only those called ``name`` if given), oldest first."""
        with self._cond:
            return [(t, e) for t, e in self._received if name is None or e["event"] == name]

    def wait(
        self, predicate: Callable[[list[tuple[float, Event]]], bool], timeout: float
    ) -> list[tuple[float, Event]]:
        """Wait until ``predicate(all events)`` holds; return the events, or raise TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._received), timeout):
                names = [e["event"] for _, e in self._received]
                raise TimeoutError(f"tap: condition not met within {timeout} s; saw {names}")
            return list(self._received)

    def wait_count(self, name: str, count: int, timeout: float) -> list[tuple[float, Event]]:
        """Wait until ``count`` events called ``name`` arrived; return those events."""
        self.wait(lambda evs: sum(e["event"] == name for _, e in evs) >= count, timeout)
        return self.events(name)

    def close(self) -> None:
        """Stop the thread and close the monitor connection (idempotent)."""
        self._stop.set()
        self._thread.join()
        self._driver.close()

    def __enter__(self) -> EventTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
