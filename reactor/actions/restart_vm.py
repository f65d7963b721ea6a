"""The ``restart_vm`` action: reset, power-cycle or quit the VM, then check it runs again.

Restarts are rationed: at most ``limit`` per VM per ``window`` (counted by the
``RestartGuard`` of the plugin instance a plugin manager registers, so each
manager, and the reactor built on it, has its own history; retries of one
invocation count once). Past that the action
does nothing, raises the synthetic ``REACTOR_RESTART_SUPPRESSED`` event and
reports itself suppressed: a restart loop is worse than a stopped VM.
Every command carries ``cause=(rule, "restart_vm")``, so the RESET and RESUME
events it provokes arrive marked ``caused_by`` and rules can ignore them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from reactor.actions._vmcall import execute, require_vm
from reactor.actions.exec import DISABLED, last_line, refuse_unless_enabled, run_argv
from reactor.errors import PermanentActionError, TransientActionError
from reactor.plugins.api import ActionContext, ActionParams, ActionType, CheckContext, Duration
from reactor.plugins.hookspecs import Register, hookimpl

log = logging.getLogger(__name__)

ACTION = "restart_vm"
RESUMABLE = frozenset({"paused", "prelaunch"})
POLL_INTERVAL = 0.2


class RestartParams(ActionParams):
    """Parameters of ``restart_vm``."""

    method: Literal["reset", "powerdown", "quit", "command"] = Field(
        "reset", description="reset, powerdown (ACPI, then reset), quit, or command"
    )
    timeout: Duration = Field(30.0, gt=0, description="how long to wait for the VM to run again")
    powerdown_timeout: Duration = Field(
        60.0, gt=0, description="how long the guest may take to power down before a reset"
    )
    command: list[str] | None = Field(
        None, min_length=1, description="argv run by method: command (needs exec enabled)"
    )
    limit: int | None = Field(None, ge=1, description="restarts allowed per VM per window")
    window: Duration | None = Field(None, gt=0, description="the window of limit")

    @model_validator(mode="after")
    def _command_iff_method_command(self) -> RestartParams:
        if (self.method == "command") != (self.command is not None):
            raise ValueError("command is required with method: command, and only with it")
        return self


class HistoryStore(Protocol):
    """Where a guard keeps its restarts across restarts of the sidecar (wall-clock times)."""

    def load(self) -> dict[str, list[tuple[float, str]]]: ...

    def record(self, vm: str, when: float, invocation: str) -> None: ...


class RestartGuard:
    """Counts restarts per VM in a sliding window on a monotonic clock.

    With a ``store`` (``attach``) its history survives the sidecar: restarts are
    recorded there at wall-clock times and read back when attached.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._restarts: dict[str, deque[tuple[float, str]]] = {}
        self._lock = threading.Lock()
        self._store: HistoryStore | None = None

    def attach(self, store: HistoryStore) -> None:
        """Keep the history in ``store`` from now on, taking in what it holds."""
        skew = self._clock() - time.time()  # wall-clock time + skew = our clock's time
        with self._lock:
            for vm, entries in store.load().items():
                known = self._restarts.setdefault(vm, deque())
                seen = {inv for _, inv in known}
                fresh = [(when + skew, inv) for when, inv in entries if inv not in seen]
                self._restarts[vm] = deque(sorted([*known, *fresh]))
            self._store = store

    def admit(self, vm: str, invocation_id: str, limit: int, window: float) -> tuple[bool, int]:
        """Whether ``vm`` may restart now, and the restarts counted in the window.

        An admitted restart is counted; another attempt of the same invocation is
        admitted again without counting twice.
        """
        now = self._clock()
        with self._lock:
            entries = self._restarts.setdefault(vm, deque())
            while entries and entries[0][0] <= now - window:
                entries.popleft()
            if any(inv == invocation_id for _, inv in entries):
                return True, len(entries)
            if len(entries) >= limit:
                return False, len(entries)
            entries.append((now, invocation_id))
            if self._store is not None:
                self._store.record(vm, time.time(), invocation_id)
            return True, len(entries)


class _Restarter:
    """One restart: the QMP steps of each method, polling at ``interval``."""

    def __init__(self, params: RestartParams, ctx: ActionContext, interval: float) -> None:
        self.params = params
        self.ctx = ctx
        self.interval = interval

    async def status(self) -> dict[str, Any]:
        reply = await execute(self.ctx, ACTION, "query-status")
        return dict(reply) if isinstance(reply, dict) else {}

    async def reset(self) -> None:
        await execute(self.ctx, ACTION, "system_reset")
        await self.resume_until_running()

    async def powerdown(self) -> None:
        await execute(self.ctx, ACTION, "system_powerdown")
        deadline = _now() + self.params.powerdown_timeout
        while (await self.status()).get("running", False) and _now() < deadline:
            await asyncio.sleep(self.interval)
        await self.reset()

    async def quit(self) -> None:
        require_vm(self.ctx)
        # QEMU may close the connection before it answers: that is success too.
        with contextlib.suppress(TransientActionError):
            await execute(self.ctx, ACTION, "quit")

    async def command(self) -> None:
        refuse_unless_enabled(self.ctx.settings)
        argv = self.params.command or []
        result = await run_argv(argv, timeout=self.params.timeout, redact=self.ctx.redact)
        if result.exit_code != 0:
            detail = last_line(result.stderr)
            raise TransientActionError(
                self.ctx.redact(
                    f"restart command {argv[0]!r} exited with {result.exit_code}: {detail}"
                )
            )

    async def resume_until_running(self) -> None:
        """Poll until running, sending ``cont`` while the VM waits in a resumable state."""
        deadline = _now() + self.params.timeout
        status: dict[str, Any] = {}
        while _now() < deadline or not status:
            status = await self.status()
            if status.get("running"):
                return
            if status.get("status") in RESUMABLE:
                await self._try_cont()
            await asyncio.sleep(self.interval)
        vm = require_vm(self.ctx).name
        raise TransientActionError(
            f"VM {vm} not running {self.params.timeout:g}s after "
            f"{self.params.method} (status: {status.get('status', 'unknown')})"
        )

    async def _try_cont(self) -> None:
        try:
            await execute(self.ctx, ACTION, "cont")
        except PermanentActionError as err:
            # Right after system_reset QEMU may not accept cont yet; the next poll decides.
            log.debug("cont refused, polling on: %s", err)


def _now() -> float:
    return asyncio.get_running_loop().time()


def make_restart_vm(
    guard: RestartGuard | None = None, *, poll_interval: float = POLL_INTERVAL
) -> ActionType:
    """A ``restart_vm`` action type rationed by ``guard`` (default: a fresh one of its own)."""
    the_guard = RestartGuard() if guard is None else guard

    async def run_restart_vm(params: RestartParams, ctx: ActionContext) -> dict[str, Any]:
        """Restart unless rationed; verify the VM runs again (not for quit and command)."""
        if params.method == "command":
            refuse_unless_enabled(ctx.settings)
        suppressed = _suppressed(the_guard, params, ctx)
        if suppressed is not None:
            return suppressed
        restarter = _Restarter(params, ctx, poll_interval)
        step: Callable[[], Awaitable[None]] = getattr(restarter, params.method)
        await step()
        return {"method": params.method, "suppressed": False}

    return ActionType(
        name=ACTION,
        params=RestartParams,
        run=run_restart_vm,
        check=check_restart_vm,
        description="Reset, power-cycle or quit the VM (rationed per VM), then verify it runs.",
    )


def _suppressed(
    guard: RestartGuard, params: RestartParams, ctx: ActionContext
) -> dict[str, Any] | None:
    limit = params.limit or ctx.settings.restart_limit
    window = params.window or ctx.settings.restart_window
    vm = ctx.vm.name if ctx.vm is not None else str(ctx.envelope.get("vm", ""))
    admitted, restarts = guard.admit(vm, ctx.invocation_id, limit, window)
    if admitted:
        return None
    data = {"rule": ctx.rule, "restarts": restarts, "window": window, "limit": limit}
    log.warning("restart of VM %s suppressed: %d restarts in %gs", vm, restarts, window)
    if ctx.emit is not None:
        ctx.emit("REACTOR_RESTART_SUPPRESSED", data)
    return {"method": params.method, "suppressed": True, **data}


def check_restart_vm(params: RestartParams, ctx: CheckContext) -> list[str]:
    """method: command runs a program, so it needs exec enabled."""
    if params.method == "command" and not ctx.settings.exec_enabled:
        return [f"restart_vm method: command runs a program, but {DISABLED}"]
    return []


class Plugin:
    """The built-in plugin: ``restart_vm`` rationed by a guard this instance owns.

    ``make_plugin_manager`` registers a fresh instance, so two managers (two
    reactors in one process) never share restart history.
    """

    def __init__(self, guard: RestartGuard | None = None) -> None:
        self.guard = RestartGuard() if guard is None else guard
        self.action_type = make_restart_vm(self.guard)

    @hookimpl
    def reactor_register_actions(self, register: Register) -> None:
        """Register ``restart_vm``."""
        register(self.action_type)
