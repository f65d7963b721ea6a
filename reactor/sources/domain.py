"""One libvirt domain as a VM: its envelopes, and actions through libvirt's own API.

A ``LibvirtDomain`` is what a ``VmConnection`` is for a QMP socket, for a domain
of a libvirt connection (``reactor.sources.libvirt`` owns them): it turns the raw
QMP events libvirt passes on into envelopes (``source`` is the libvirt URI, and
``uuid`` the domain's), announces itself with ``REACTOR_CONNECTED`` and ends
with ``REACTOR_DISCONNECTED``, and implements ``VmControl``.

Commands never open a second monitor. The ones ``restart_vm`` and the default
``qmp`` allowlist use map to libvirt's API: ``system_reset`` is a domain reset
(and a resume when the domain was crashed: QEMU then waits paused, while libvirt
keeps calling it crashed), ``cont`` a resume, ``stop`` a suspend,
``system_powerdown`` a shutdown request, ``quit`` a destroy, ``query-status``
the domain's state in QEMU's words, and ``query-jobs``/``query-migrate`` (which
``restart_vm`` asks before a restart) libvirt's job of the domain. Any other
command (``restart_vm``'s ``dump`` among them) goes through libvirt's
monitor passthrough, after which libvirt marks the domain tainted
(``custom-monitor``); that is said once per domain in the log.

Every call to libvirtd runs on one of the source's ``Calls`` threads
(``reactor.sources.lvthreads``) and is awaited: a destroy takes about a second,
and the event loop serves every other VM meanwhile. The domain's own state
(envelopes, ``seq``, ``caused_by`` expectations) stays on the loop's thread;
``caused_by`` is expected before the command is handed to a thread.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from reactor.errors import PermanentActionError, TransientActionError
from reactor.model import Envelope
from reactor.sources.envelopes import OnEnvelope, OnState, VmEvents
from reactor.sources.lvthreads import Calls

log = logging.getLogger(__name__)

HOLD_MAX = 10_000
"""Events kept for a domain that is not announced yet; older ones are dropped past this."""

# virDomainState (libvirt-domain.h): a stable ABI, spelled here so that the
# mapping needs no libvirt module to be tested.
NOSTATE, RUNNING, BLOCKED, PAUSED, SHUTDOWN, SHUTOFF, CRASHED, PMSUSPENDED = range(8)
PAUSED_IOERROR, PAUSED_CRASHED = 2, 10
PAUSED_REASONS = {
    PAUSED_IOERROR: "io-error",
    3: "watchdog",
    4: "inmigrate",  # paused for migration (from this side)
    5: "save-vm",
    7: "shutdown",
    8: "restore-vm",
    9: "postmigrate",
    PAUSED_CRASHED: "guest-panicked",
    11: "prelaunch",  # starting up
    13: "postcopy-paused",
}
STATES = {
    NOSTATE: "unknown",
    RUNNING: "running",
    BLOCKED: "running",
    PAUSED: "paused",
    SHUTDOWN: "running",  # shutting down: QEMU still runs until the guest is done
    SHUTOFF: "shutdown",
    CRASHED: "guest-panicked",
    PMSUSPENDED: "suspended",
}

PROVOKED_BY_RESET_OF_CRASHED = ("system_reset", "cont")


def qmp_status(state: int, reason: int) -> dict[str, Any]:
    """libvirt's ``(state, reason)`` of a domain as QEMU's ``query-status`` would say it."""
    status = STATES.get(state, "unknown")
    if state == PAUSED:
        status = PAUSED_REASONS.get(reason, "paused")
    return {"status": status, "running": state in (RUNNING, BLOCKED, SHUTDOWN)}


def qemu_version(number: int) -> dict[str, Any]:
    """libvirt's hypervisor version number (major * 1,000,000 + minor * 1,000 + micro)
    in the shape of QEMU's ``query-version``."""
    major, rest = divmod(number, 1_000_000)
    minor, micro = divmod(rest, 1_000)
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": ""}


def job_reply(api: Any, command: str, stats: Mapping[str, Any]) -> Any:
    """``query-jobs`` / ``query-migrate`` from libvirt's job of a domain (``jobStats``).

    libvirt runs one job at a time per domain (a migration, a backup, a dump...);
    a migration is reported as ``query-migrate`` says it, any other as a running job.
    """
    active = stats.get("type") in (api.VIR_DOMAIN_JOB_BOUNDED, api.VIR_DOMAIN_JOB_UNBOUNDED)
    operation = stats.get("operation", 0)
    migrating = active and operation in (
        getattr(api, "VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN", 2),
        getattr(api, "VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT", 3),
    )
    if command == "query-migrate":
        return {"status": "active" if migrating else "none"}
    if active and not migrating:
        return [{"id": f"libvirt-job-{operation}", "type": "libvirt", "status": "running"}]
    return []


def event_data(details: object) -> dict[str, Any]:
    """The ``data`` of a QMP event from libvirt's ``details`` (a JSON object as text, or None)."""
    if not isinstance(details, str):
        return {}
    try:
        data = json.loads(details)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class LibvirtDomain(VmEvents):
    """One domain of a libvirt connection (implements ``reactor.plugins.api.VmControl``).

    ``api`` is the ``libvirt`` module (for its error class and codes); ``calls``
    the threads its libvirt calls run on. ``dom`` (a ``virDomain``) is set by
    ``begin`` and cleared by ``end``; in between the domain is connected. Every
    method runs on the event loop's thread.
    """

    def __init__(
        self,
        uri: str,
        name: str,
        uuid: str,
        on_envelope: OnEnvelope,
        api: Any,
        qemu: Any,
        calls: Calls,
        *,
        on_state: OnState | None = None,
        seq: int = 0,
    ) -> None:
        super().__init__(uri, name, on_envelope, on_state=on_state, seq=seq)
        self.uuid = uuid
        self.dom: Any = None
        self._api = api
        self._qemu = qemu
        self._calls = calls
        self._held: deque[tuple[str, int, int, object, float]] = deque(maxlen=HOLD_MAX)
        self._tainted_said = False

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<LibvirtDomain {self.name} {self.address} {state} seq={self.seq}>"

    # -- envelopes --------------------------------------------------------------------

    def qmp_event(
        self, event: str, seconds: int, micros: int, details: object, received: float
    ) -> None:
        """One QMP event libvirt passed on at ``received`` (epoch seconds), held until the
        domain is announced."""
        if not self.connected:
            self._held.append((event, seconds, micros, details, received))
            return
        self._libvirt_event(event, seconds, micros, details, received)

    def _libvirt_event(
        self, event: str, seconds: int, micros: int, details: object, at: float
    ) -> None:
        timestamp = {"seconds": seconds, "microseconds": micros}
        self._event(event, event_data(details), timestamp, at)

    def _deliver(self, env: Envelope) -> None:
        env["uuid"] = self.uuid
        super()._deliver(env)

    # -- life -------------------------------------------------------------------------

    def begin(self, dom: Any, state: tuple[int, int], version: int) -> None:
        """Announce the domain (``REACTOR_CONNECTED`` with its QEMU and libvirt's
        ``(state, reason)`` of it), then its held events."""
        status = qmp_status(*state)
        self.dom = dom
        self._announce(qemu_version(version), status)
        log.info("%s: found on %s (%s)", self.name, self.address, status["status"])
        held, self._held = self._held, deque(maxlen=HOLD_MAX)
        for item in held:
            self._libvirt_event(*item)
        self._tell_state(True)

    def end(self, reason: str) -> None:
        """End the domain's session with ``REACTOR_DISCONNECTED``."""
        self._held.clear()
        if not self.connected:
            return
        self.dom = None
        log.info("%s: gone from %s: %s", self.name, self.address, reason)
        self._announce_end(reason)

    # -- commands ---------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        cause: tuple[str, str] | None = None,
    ) -> Any:
        """Run one QMP command through libvirt's API (see the module) and return its result.

        ``cause`` (rule, action) marks the events it provokes with ``caused_by``.
        Raises ``TransientActionError`` when libvirt is not connected or the domain
        is gone, ``PermanentActionError`` when libvirt or QEMU refuses the command.
        """
        dom = self.dom
        if dom is None:
            raise TransientActionError(f"{self.name}: not connected to {self.address}")
        pending = []
        try:
            commands: tuple[str, ...] = (command,)
            if command == "system_reset" and (await self._calls.run(dom.state))[0] == CRASHED:
                commands = PROVOKED_BY_RESET_OF_CRASHED
            if cause is not None:
                now = time.monotonic()
                pending = [x for c in commands for x in self._expect.add(c, *cause, now)]
            return await self._call(dom, command, arguments, commands)
        except self._api.libvirtError as err:
            self._expect.cancel(pending)
            raise self._failure(command, err) from err

    async def _call(
        self, dom: Any, command: str, arguments: Mapping[str, Any] | None, steps: tuple[str, ...]
    ) -> Any:
        native: dict[str, Callable[[], Any]] = {
            "system_reset": lambda: dom.reset(0),
            "cont": dom.resume,
            "stop": dom.suspend,
            "system_powerdown": dom.shutdown,
            "quit": dom.destroy,
        }
        run = self._calls.run
        if command == "query-status":
            return qmp_status(*await run(dom.state))
        if command in ("query-jobs", "query-migrate") and not arguments:
            return job_reply(self._api, command, await run(dom.jobStats))
        if command in native and not arguments:
            for step in steps:
                await run(native[step])
            return {}
        return await self._passthrough(dom, command, arguments)

    async def _passthrough(
        self, dom: Any, command: str, arguments: Mapping[str, Any] | None
    ) -> Any:
        if not self._tainted_said:
            self._tainted_said = True
            log.warning(
                "%s: qmp %s goes through libvirt's monitor passthrough; "
                "libvirt marks the domain tainted (custom-monitor)",
                self.name,
                command,
            )
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        text = await self._calls.run(self._qemu.qemuMonitorCommand, dom, json.dumps(request), 0)
        reply = json.loads(text)
        if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
            error = reply["error"]
            raise PermanentActionError(
                f"{self.name}: {command}: {error.get('class')}: {error.get('desc')}"
            )
        return reply.get("return") if isinstance(reply, dict) else None

    def _failure(self, command: str, err: Any) -> Exception:
        api = self._api
        refused = {
            api.VIR_ERR_OPERATION_INVALID,
            api.VIR_ERR_OPERATION_UNSUPPORTED,
            api.VIR_ERR_ARGUMENT_UNSUPPORTED,
            api.VIR_ERR_INVALID_ARG,
            api.VIR_ERR_NO_SUPPORT,
            api.VIR_ERR_OPERATION_DENIED,
            api.VIR_ERR_ACCESS_DENIED,
        }
        text = " ".join(str(err).split())
        if err.get_error_code() in refused:
            return PermanentActionError(f"{self.name}: {command}: libvirt: {text}")
        return TransientActionError(f"{self.name}: {command}: libvirt: {text}")
