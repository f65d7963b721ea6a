"""What every VM of every source shares: its envelopes' fixed fields, ``seq``, and the
synthetic ``REACTOR_CONNECTED`` / ``REACTOR_DISCONNECTED`` that frame each session.

``VmEvents`` is the base of a QMP socket's ``VmConnection`` (``reactor.sources.vm``)
and of a libvirt domain's ``LibvirtDomain`` (``reactor.sources.domain``); each
builds its own QMP events' envelopes on its own path, and delivers through here.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from reactor.model import Envelope
from reactor.sources.caused_by import Expectations
from reactor.sources.reconcile import TRACKED, RunState

log = logging.getLogger(__name__)

OnEnvelope = Callable[[Envelope], None]
OnState = Callable[[str, bool], None]


@cache
def hostname() -> str:
    """This host's name, read once per process."""
    return socket.gethostname()


def qemu_timestamp(when: float) -> dict[str, int]:
    """``when`` (epoch seconds) in QEMU's event timestamp format."""
    seconds = int(when)
    return {"seconds": seconds, "microseconds": int((when - seconds) * 1_000_000)}


class VmEvents:
    """One VM's envelopes: ``on_envelope`` gets them, ``on_state(vm, up)`` hears (dis)connects.

    ``seq`` counts every envelope of the object and never restarts.
    """

    def __init__(
        self,
        address: str,
        name: str,
        on_envelope: OnEnvelope,
        *,
        on_state: OnState | None = None,
        seq: int = 0,
    ) -> None:
        self.address = address
        self.name = name
        self.seq = seq
        self.connected = False
        self.host = hostname()
        self._on_envelope = on_envelope
        self._on_state = on_state
        self._expect = Expectations()
        self._shutdown_seen = False
        self.labels: Mapping[str, Any] = {}
        """The VM's labels from the configuration, in every envelope as ``labels``."""
        self.run_state = RunState()
        """The run state its events imply (``reactor.sources.reconcile``)."""

    def _event(self, event: str, data: dict[str, Any], timestamp: Any, received: float) -> None:
        """Deliver one of QEMU's events (the hot path), marked ``caused_by`` if we provoked it."""
        self.seq += 1
        env = {
            "event": event,
            "data": data,
            "timestamp": timestamp,
            "vm": self.name,
            "host": self.host,
            "source": self.address,
            "seq": self.seq,
            "received_at": received,
            "labels": self.labels,
        }
        if self._expect:
            cause = self._expect.match(event, time.monotonic())
            if cause is not None:
                env["caused_by"] = cause
        if event in TRACKED:
            self.run_state.observe(event, data)
            if event == "SHUTDOWN":
                self._shutdown_seen = True
        self._deliver(env)

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Deliver a synthetic event for this VM, stamped now, through ``on_envelope``."""
        now = time.time()
        self.seq += 1
        self._deliver(
            {
                "event": event,
                "data": data,
                "timestamp": qemu_timestamp(now),
                "vm": self.name,
                "host": self.host,
                "source": self.address,
                "seq": self.seq,
                "received_at": now,
                "labels": self.labels,
            }
        )

    def _deliver(self, env: Envelope) -> None:
        try:
            self._on_envelope(env)
        except Exception:
            # The consumer's bug must not cost us the connection (and every event after).
            log.exception("%s: on_envelope failed for %s #%d", self.name, env["event"], env["seq"])

    def _announce(self, version: Any, status: Any) -> dict[str, Any]:
        """``REACTOR_CONNECTED`` with QEMU's ``query-version`` and ``query-status`` replies;
        returns its data."""
        self._shutdown_seen = False
        self.connected = True
        qemu = version.get("qemu", {}) if isinstance(version, dict) else {}
        status = status if isinstance(status, dict) else {}
        data = {
            "version": version,
            "qemu": f"{qemu.get('major')}.{qemu.get('minor')}.{qemu.get('micro')}",
            "status": status.get("status", "unknown"),
            "running": bool(status.get("running", False)),
            "address": self.address,
        }
        self.emit("REACTOR_CONNECTED", data)
        return data

    def _announce_end(self, reason: str) -> None:
        """``REACTOR_DISCONNECTED`` (``shutdown_seen`` false: QEMU went away without a SHUTDOWN)."""
        self.connected = False
        data = {"shutdown_seen": self._shutdown_seen, "reason": reason, "address": self.address}
        self.emit("REACTOR_DISCONNECTED", data)
        self._tell_state(False)

    def _tell_state(self, up: bool) -> None:
        if self._on_state is None:
            return
        try:
            self._on_state(self.name, up)
        except Exception:
            log.exception("%s: on_state failed", self.name)
