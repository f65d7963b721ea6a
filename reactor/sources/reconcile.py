"""Reconciliation: the run state the events implied, checked against what QEMU says.

Events get lost (the sidecar or its connection was down, or they came while a
session was being set up), and a VM's state can change without an event the
rules saw. ``RunState`` follows a VM's run state from its events (RESUME,
STOP, GUEST_PANICKED, BLOCK_IO_ERROR with ``action: stop``, SHUTDOWN and the
state ``REACTOR_CONNECTED`` reports) and, given what a probe found
(``query-status`` and ``query-block``'s ``io-status``), says whether the two
disagree: then the owner raises ``REACTOR_STATE_CHANGED`` with the old and the
new state. A STOP implies only "not running" (QEMU's STOP does not say why),
so a probe finding ``postmigrate`` after a STOP is no news. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RUNNING = "running"
UNKNOWN = "unknown"

RUN_STATES = (
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
    "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog",
    "guest-panicked", "colo",
)  # fmt: skip
"""QEMU's RunState values (qapi/run-state.json)."""

TRACKED = frozenset({"RESUME", "STOP", "GUEST_PANICKED", "BLOCK_IO_ERROR", "SHUTDOWN"})
"""The QMP events that move the implied run state."""


class RunState:
    """One VM's run state as its events imply it, and the probes that check it."""

    __slots__ = ("changes", "exact", "status")

    def __init__(self) -> None:
        self.status = UNKNOWN
        self.exact = False
        """False when only "not running" is known (after a STOP or SHUTDOWN)."""
        self.changes = 0
        """Bumped by every tracked event: a probe that overlaps one is inconclusive."""

    def observe(self, event: str, data: Mapping[str, Any]) -> None:
        """Follow one QMP event (call it only for events in ``TRACKED``)."""
        self.changes += 1
        if event == "RESUME":
            self._set(RUNNING, exact=True)
        elif event == "GUEST_PANICKED" and data.get("action") == "pause":
            self._set("guest-panicked", exact=True)
        elif event == "BLOCK_IO_ERROR" and data.get("action") == "stop":
            self._set("io-error", exact=True)
        elif event in ("STOP", "SHUTDOWN") and (self.status in (RUNNING, UNKNOWN)):
            # QEMU says why it stopped in an event before this one, if at all.
            self._set("paused" if event == "STOP" else "shutdown", exact=False)

    def _set(self, status: str, *, exact: bool) -> None:
        self.status, self.exact = status, exact

    def agrees(self, status: str) -> bool:
        """Whether QEMU's ``status`` is one the events implied (unknown agrees with anything)."""
        if self.status == UNKNOWN or status == self.status:
            return True
        return not self.exact and status != RUNNING

    def probed(self, status: str, running: bool, io_errors: list[dict[str, str]], probe: str
               ) -> dict[str, Any] | None:  # fmt: skip
        """Take a probe's finding; the data of ``REACTOR_STATE_CHANGED`` if it disagrees."""
        changed = None
        if not self.agrees(status):
            changed = {"old": self.status, "new": status, "running": running,
                       "io_errors": io_errors, "probe": probe}  # fmt: skip
        self._set(status, exact=True)
        return changed


def io_errors(block: Any) -> list[dict[str, str]]:
    """The devices of a ``query-block`` reply whose ``io-status`` is not ``ok``."""
    found = []
    for dev in block if isinstance(block, list) else []:
        io_status = dev.get("io-status", "ok") if isinstance(dev, dict) else "ok"
        if io_status != "ok":
            inserted = dev.get("inserted")
            node = inserted.get("node-name", "") if isinstance(inserted, dict) else ""
            found.append(
                {"device": str(dev.get("device", "")), "node-name": str(node),
                 "io-status": str(io_status)}
            )  # fmt: skip
    return found
