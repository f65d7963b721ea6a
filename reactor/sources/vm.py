"""The QMP connection to one VM: envelopes out, commands in, reconnects forever.

A ``VmConnection`` turns each QMP event into an envelope (a plain dict: QEMU's
``event``, ``data``, ``timestamp`` plus ``vm``, ``host``, ``source``, ``seq``,
``received_at``, the VM's ``labels`` and, after our own command, ``caused_by``) and hands it to
``on_envelope``. It announces each session with a synthetic
``REACTOR_CONNECTED`` (QEMU's version and run state, so a VM found paused is
seen) and ends it with ``REACTOR_DISCONNECTED`` (``shutdown_seen`` false: QEMU
went away without a SHUTDOWN). ``seq`` counts every envelope of the object and
never restarts.

Dialing (``dial_forever``) retries with capped, jittered exponential backoff and
retries at once when a unix socket file is re-created. In server mode the
listener hands over sessions QEMU opened to us (``serve``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_random_exponential

from reactor.errors import PermanentActionError, TransientActionError
from reactor.sources.discovery import TcpAddress, socket_identity
from reactor.sources.envelopes import (
    OnEnvelope,
    OnState,
    VmEvents,
    hostname,
    qemu_timestamp,
)
from reactor.sources.reconcile import io_errors
from reactor.sources.session import MAX_MESSAGE, Pace, QmpLink, RawEvent, describe, discard

log = logging.getLogger(__name__)

Labels = Callable[[str, str], Mapping[str, Any]]
"""``labels(vm name, address)``: the labels the configuration gives that VM."""

__all__ = [
    "Labels",
    "OnEnvelope",
    "OnState",
    "SessionFailed",
    "VmConnection",
    "hostname",
    "qemu_timestamp",
]

STABLE_AFTER = 5.0
"""A session shorter than this counts as a failed attempt, so backoff keeps growing."""

WAKE_POLL = 0.1
"""While backing off, how often a unix socket file is checked for re-creation."""


class SessionFailed(Exception):
    """A session that could not start (or ended too soon); worth a backoff."""


class VmConnection(VmEvents):
    """One VM's QMP connection (implements ``reactor.plugins.api.VmControl``)."""

    def __init__(
        self,
        address: str,
        name: str,
        on_envelope: OnEnvelope,
        *,
        greeting_timeout: float = 5.0,
        backoff_max: float = 2.0,
        max_message: int = MAX_MESSAGE,
        on_state: OnState | None = None,
        seq: int = 0,
        pace: Pace | None = None,
        reconcile: float = 0.0,
    ) -> None:
        super().__init__(address, name, on_envelope, on_state=on_state, seq=seq)
        self.pace = pace
        """Asked before each event of a session (``reactor.sources.session.Pace``)."""
        self.greeting_timeout = greeting_timeout
        self.backoff_max = backoff_max
        self.max_message = max_message
        self._link: QmpLink | None = None
        self._ident: tuple[int, int, int] | None = None
        self._failures = 0
        self.reconcile = reconcile
        """Seconds between probes of the run state (0: none)."""
        self.stop_reason = "closed by qmp-reactor"
        """The ``reason`` of REACTOR_DISCONNECTED when we end the session ourselves."""

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<VmConnection {self.name} {self.address} {state} seq={self.seq}>"

    # -- commands ---------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        cause: tuple[str, str] | None = None,
    ) -> Any:
        """Run one QMP command and return its result.

        ``cause`` (rule, action) marks the events the command provokes with
        ``caused_by``. Raises ``TransientActionError`` when not connected or the
        connection is lost, ``PermanentActionError`` when QEMU answers with an error.
        """
        link = self._link
        if link is None or not link.running:
            raise TransientActionError(f"{self.name}: not connected to {self.address}")
        pending = self._expect.add(command, *cause, time.monotonic()) if cause else []
        try:
            return await link.execute(command, dict(arguments) if arguments else None)
        except ExecuteError as err:
            self._expect.cancel(pending)
            raise PermanentActionError(f"{self.name}: {command}: {err.error_class}: {err}") from err
        except ExecInterruptedError as err:
            if command == "quit":
                return None  # QEMU may close the socket before its reply gets out
            raise TransientActionError(f"{self.name}: {command}: connection lost") from err
        except (QMPError, OSError) as err:
            raise TransientActionError(f"{self.name}: {command}: {describe(err)}") from err

    # -- envelopes (the hot path) -----------------------------------------------------

    def _on_event(self, obj: RawEvent, received: float) -> None:
        event = obj.get("event")
        if type(event) is not str:
            return
        data = obj.get("data")
        self._event(event, data if type(data) is dict else {}, obj.get("timestamp"), received)

    # -- sessions ---------------------------------------------------------------------

    async def serve(self, link: QmpLink) -> str:
        """Run one session on a link that is already through the QMP handshake.

        Announces it, streams its events and returns why it ended; raises
        ``SessionFailed`` if QEMU does not answer the opening queries in time.
        """
        try:
            async with asyncio.timeout(self.greeting_timeout):
                version = await link.execute("query-version")
                status = await link.execute("query-status")
        except (QMPError, OSError, TimeoutError) as err:
            await discard(link)
            raise SessionFailed(f"query-version/query-status: {describe(err)}") from err
        except BaseException:
            await discard(link)
            raise
        self._begin(link, version, status)
        reason: str | None = None  # stays None when we are cancelled: then stop_reason applies
        probes = asyncio.create_task(self._probe_forever(link)) if self.reconcile > 0 else None
        try:
            reason = await link.closed()
        finally:
            if probes is not None:
                probes.cancel()
                await asyncio.wait([probes])
            self._end(link, reason or self.stop_reason)
            await discard(link)
        return reason

    def _begin(self, link: QmpLink, version: Any, status: Any) -> None:
        self._link = link
        self._failures = 0
        data = self._announce(version, status)
        log.info("%s: connected to %s (%s)", self.name, self.address, data["status"])
        changed = self.run_state.probed(data["status"], data["running"], [], "reconnect")
        if changed is not None:
            self.emit("REACTOR_STATE_CHANGED", changed)
        link.release(self._on_event, self.pace)
        self._tell_state(True)

    def _end(self, link: QmpLink, reason: str) -> None:
        self._link = None
        if link.dropped:
            log.warning("%s: %d events dropped while connecting", self.name, link.dropped)
        log.info("%s: disconnected from %s: %s", self.name, self.address, reason)
        self._announce_end(reason)

    # -- reconciliation ---------------------------------------------------------------

    async def _probe_forever(self, link: QmpLink) -> None:
        """Every ``reconcile`` seconds, check the run state the events implied."""
        while True:
            await asyncio.sleep(self.reconcile)
            try:
                async with asyncio.timeout(self.greeting_timeout):
                    await self.probe(link)
            except (QMPError, OSError, TimeoutError) as err:
                log.debug("%s: probe failed: %s", self.name, describe(err))

    async def probe(self, link: QmpLink) -> None:
        """One probe: ``query-status`` and ``query-block``; REACTOR_STATE_CHANGED if they differ.

        A probe that an event overlapped says nothing: the event is newer news.
        """
        before = self.run_state.changes
        status = await link.execute("query-status")
        block = await link.execute("query-block")
        if self.run_state.changes != before or not isinstance(status, dict):
            return
        found = str(status.get("status", "unknown"))
        changed = self.run_state.probed(
            found, bool(status.get("running")), io_errors(block), "interval"
        )
        if changed is not None:
            log.warning("%s: run state %s, events implied %s", self.name, found, changed["old"])
            self.emit("REACTOR_STATE_CHANGED", changed)

    # -- dialing ----------------------------------------------------------------------

    async def dial_forever(self, target: str | TcpAddress) -> None:
        """Connect to ``target`` and keep reconnecting until cancelled."""
        wait = wait_random_exponential(multiplier=0.1, max=self.backoff_max)
        while True:
            retrying = AsyncRetrying(
                stop=stop_never,
                wait=wait,
                retry=retry_if_exception_type(SessionFailed),
                sleep=lambda seconds: self._pause(target, seconds),
            )
            async for attempt in retrying:
                with attempt:
                    await self._dial_once(target)

    async def _dial_once(self, target: str | TcpAddress) -> None:
        self._ident = socket_identity(target) if isinstance(target, str) else None
        link = QmpLink(self.max_message)
        try:
            async with asyncio.timeout(self.greeting_timeout):
                await link.connect(target)
        except (QMPError, OSError, TimeoutError) as err:
            await discard(link)
            self._failed(f"cannot connect: {describe(err)}")
        started = time.monotonic()
        try:
            reason = await self.serve(link)
        except SessionFailed as err:
            self._failed(str(err))
        if time.monotonic() - started < STABLE_AFTER:
            self._failed(f"session ended early: {reason}")

    def _failed(self, reason: str) -> NoReturn:
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "%s: %s: %s (retrying)", self.name, self.address, reason)
        raise SessionFailed(reason)

    async def _pause(self, target: str | TcpAddress, seconds: float) -> None:
        if not isinstance(target, str):
            await asyncio.sleep(seconds)
            return
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, WAKE_POLL))
            ident = socket_identity(target)
            if ident is not None and ident != self._ident:
                return  # the socket was re-created: QEMU is back, do not wait out the backoff
