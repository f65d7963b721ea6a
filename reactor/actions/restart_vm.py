"""The ``restart_vm`` action: reset, power-cycle or quit the VM, then check it runs again.

Restarts are rationed by the ``RestartGuard`` of the plugin instance a plugin
manager registers (``_restart_guard``; each manager, and the reactor built on
it, has its own history; retries of one invocation count once): at most
``limit`` per VM per ``window``. Past that the action does nothing, raises the
synthetic ``REACTOR_RESTART_SUPPRESSED`` event and reports itself suppressed: a
restart loop is worse than a stopped VM. With ``backoff`` consecutive restarts
of a VM wait longer each time, until it ran ``reset_after`` without one (the
rule's ``backoff``, else the configuration's ``actions.restart.backoff``). A
restart not yet due raises ``ActionNotDue`` so that the dispatcher runs it again
then, holding no concurrency slot and spending no attempt while it waits.

Before the restart the action waits for the VM's block jobs and migration to
end, also holding no slot: while one runs it raises ``ActionNotDue`` to be run
again a second later, and the guard remembers since when the invocation has
waited, so that ``jobs_timeout`` after that the wait fails like an attempt
(``_restart_prep.wait_idle``). The backoff comes first, then the jobs: a run
after either wait is admitted again without counting twice, and nothing is
dumped or reset before both are over. With ``dump`` QEMU then writes the
guest's memory to a file. Every command carries ``cause=(rule, "restart_vm")``,
so the RESET, RESUME and DUMP_COMPLETED events it provokes arrive marked
``caused_by`` and rules can ignore them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from reactor.actions._restart_guard import Admission, Backoff, Restart, RestartGuard
from reactor.actions._restart_prep import dump_memory, wait_idle
from reactor.actions._vmcall import execute, require_vm
from reactor.actions.exec import DISABLED, last_line, refuse_unless_enabled, run_argv
from reactor.errors import (
    ActionError,
    ActionNotDue,
    PermanentActionError,
    TransientActionError,
)
from reactor.plugins.api import (
    ActionContext,
    ActionParams,
    ActionSettings,
    ActionType,
    CheckContext,
    Duration,
    PluginState,
)
from reactor.plugins.hookspecs import Register, hookimpl

log = logging.getLogger(__name__)

ACTION = "restart_vm"
RESUMABLE = frozenset({"paused", "prelaunch"})
VERIFIED = frozenset({"reset", "powerdown"})
"""Methods after which the VM is seen running (the backoff's ``reset_after`` counts from then)."""
POLL_INTERVAL = 0.2
JOBS_POLLS_SLOWER = 5
"""Jobs and migrations last minutes: ask about them every second, not five times a second
(each time in a run of its own, after an ``ActionNotDue``)."""
INLINE_WAIT = 1.0
"""A backoff wait up to this long is slept in the attempt: not worth giving the slot back."""


class BackoffParams(ActionParams):
    """``backoff:`` of ``restart_vm``: how consecutive restarts of a VM are spaced."""

    initial: Duration = Field(10.0, gt=0, description="wait before the second restart in a row")
    max: Duration = Field(300.0, gt=0, description="the longest wait; each doubles up to it")
    reset_after: Duration = Field(
        600.0, gt=0, description="a VM that ran this long since its last restart starts over"
    )

    @model_validator(mode="after")
    def _initial_within_max(self) -> BackoffParams:
        if self.initial > self.max:
            raise ValueError("initial must not be longer than max")
        return self

    def backoff(self) -> Backoff:
        """As the guard's Backoff."""
        return Backoff(self.initial, self.max, self.reset_after)


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
    backoff: BackoffParams | Literal[False] | None = Field(
        None,
        description="{initial: 10s, max: 5m, reset_after: 10m}: each restart in a row waits "
        "longer (default: the configuration's actions.restart.backoff; false: none)",
    )
    dump: str | None = Field(
        None, min_length=2, description="file QEMU writes the guest's memory to before the restart"
    )
    dump_timeout: Duration = Field(300.0, gt=0, description="how long the dump may take")
    jobs_timeout: Duration = Field(
        600.0, gt=0, description="how long to wait for block jobs and migration to end"
    )

    @model_validator(mode="after")
    def _command_iff_method_command(self) -> RestartParams:
        if (self.method == "command") != (self.command is not None):
            raise ValueError("command is required with method: command, and only with it")
        return self

    @field_validator("dump")
    @classmethod
    def _dump_is_absolute(cls, dump: str | None) -> str | None:
        # Written absolute, a template can only steer the name below a directory the operator
        # chose; what it renders to is checked again before the dump (_restart_prep).
        if dump is not None and not dump.startswith("/"):
            raise ValueError("dump must be an absolute path (templates only after a literal '/')")
        return dump


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
        ended = True
        try:
            return await _restart(the_guard, params, ctx, poll_interval)
        except ActionNotDue:
            ended = False  # run again: a wait for jobs and migration goes on
            raise
        finally:
            if ended:  # done, skipped, suppressed or failed: its wait is over too
                the_guard.end_jobs_wait(ctx.invocation_id)

    return ActionType(
        name=ACTION,
        params=RestartParams,
        run=run_restart_vm,
        check=check_restart_vm,
        description="Reset, power-cycle or quit the VM (rationed per VM), then verify it runs.",
    )


async def _restart(
    the_guard: RestartGuard, params: RestartParams, ctx: ActionContext, poll_interval: float
) -> dict[str, Any]:
    """One run: admission, the backoff, the wait for jobs and migration, the dump, the restart.

    A run after ``ActionNotDue`` (a wait not over) is admitted again by ``decide`` without
    counting twice, finds the backoff over and checks again whether someone else started a
    VM seen stopped during it; the dump and the restart only follow the end of both waits.
    """
    if params.method == "command":
        refuse_unless_enabled(ctx.settings)
    vm = ctx.vm.name if ctx.vm is not None else str(ctx.envelope.get("vm", ""))
    limit = params.limit or ctx.settings.restart_limit
    window = params.window or ctx.settings.restart_window
    backoff = _backoff(params, ctx.settings)
    admission = the_guard.decide(vm, ctx.invocation_id, limit, window, backoff)
    if not admission.admitted:
        return _suppressed(params, ctx, vm, admission.restarts, limit, window)
    result: dict[str, Any] = {"method": params.method, "suppressed": False}
    if backoff is not None:
        meanwhile = await _when_due(the_guard, vm, admission, ctx)
        waited = max(admission.due - admission.at, 0.0)
        result.update(streak=admission.streak, waited=round(waited, 3))
        if meanwhile:
            the_guard.note(vm, ctx.invocation_id, ran=True)
            return {**result, "skipped": "running again"}
    if ctx.vm is not None or params.method != "command":
        await wait_idle(ctx, the_guard, params.jobs_timeout, poll_interval * JOBS_POLLS_SLOWER)
    if params.dump is not None and not admission.dumped and ctx.vm is not None:
        result["dump"] = await _dump(params, ctx, poll_interval)
        the_guard.note(vm, ctx.invocation_id, dumped=True)
    restarter = _Restarter(params, ctx, poll_interval)
    step: Callable[[], Awaitable[None]] = getattr(restarter, params.method)
    await step()
    if params.method in VERIFIED:
        the_guard.note(vm, ctx.invocation_id, ran=True)
    return result


def _backoff(params: RestartParams, settings: ActionSettings) -> Backoff | None:
    """The rule's backoff, else the configuration's; ``backoff: false`` is none."""
    if params.backoff is False:
        return None
    if params.backoff is not None:
        return params.backoff.backoff()
    if settings.restart_backoff is not None:
        return BackoffParams.model_validate(settings.restart_backoff).backoff()
    return None


async def _when_due(guard: RestartGuard, vm: str, admission: Admission, ctx: ActionContext) -> bool:
    """Return once the admitted restart is due, or raise ``ActionNotDue`` for a wait longer
    than ``INLINE_WAIT``; whether the VM was started by someone else meanwhile (seen
    stopped while the restart waited, running now)."""
    delay = admission.due - guard.clock()
    stopped = admission.stopped
    if delay > 0 and not stopped and await _running(ctx) is False:
        stopped = True
        guard.note(vm, ctx.invocation_id, stopped=True)
    if delay > INLINE_WAIT:
        streak = admission.streak
        message = f"restart of VM {vm} waits {delay:.1f}s: restart {streak} in a row (backoff)"
        log.info("%s", message)
        raise ActionNotDue(message, retry_after=delay)
    if delay > 0:
        log.debug("restart of VM %s waits %.3fs (backoff)", vm, delay)
        await asyncio.sleep(delay)
    meanwhile = stopped and await _running(ctx) is True
    if meanwhile:
        log.info("restart of VM %s not needed: it was started again while it waited", vm)
    return meanwhile


async def _running(ctx: ActionContext) -> bool | None:
    """Whether the VM runs (None: not known, no connection)."""
    if ctx.vm is None:
        return None
    try:
        reply = await execute(ctx, ACTION, "query-status")
    except ActionError:
        return None
    return bool(reply.get("running")) if isinstance(reply, dict) else None


async def _dump(params: RestartParams, ctx: ActionContext, interval: float) -> dict[str, Any]:
    path = params.dump or ""
    vm = require_vm(ctx).name
    outcome = await dump_memory(ctx, path, params.dump_timeout, interval)
    if outcome["status"] == "completed":
        log.info("memory of VM %s dumped to %r", vm, path)
    else:
        error = outcome.get("error", outcome["status"])
        log.warning("memory of VM %s not dumped to %r: %s", vm, path, error)
    return outcome


def _suppressed(
    params: RestartParams, ctx: ActionContext, vm: str, restarts: int, limit: int, window: float
) -> dict[str, Any]:
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


class StoredHistory:
    """A ``RestartHistory`` in the plugin's durable state: one key per VM, ``restarts:<vm>``,
    its restarts as ``Restart`` fields (times on the wall clock).

    Read once when made, dropping VMs not restarted for ``KEEP`` seconds; then
    each ``save`` writes through (a restart must not be forgotten).
    """

    KEEP = 86400.0
    """Seconds a VM's history is kept after its last restart (longer than any window)."""
    PREFIX = "restarts:"

    def __init__(self, store: PluginState) -> None:
        self._store = store
        self._cache: dict[str, tuple[Restart, ...]] = {}
        since = time.time() - self.KEEP
        for key, rows, wall in store.entries():
            if not key.startswith(self.PREFIX):
                continue
            if wall <= since:
                store.delete(key)
                continue
            try:
                self._cache[key.removeprefix(self.PREFIX)] = tuple(Restart(**r) for r in rows)
            except (TypeError, ValueError) as err:
                log.warning("restart history %s unreadable (%s): ignored", key, err)

    def load(self, vm: str) -> tuple[Restart, ...]:
        """The restarts kept for ``vm``."""
        return self._cache.get(vm, ())

    def save(self, vm: str, restarts: tuple[Restart, ...]) -> None:
        """Replace the restarts kept for ``vm``, in memory and in the store."""
        self._cache[vm] = restarts
        self._store.put(self.PREFIX + vm, [dataclasses.asdict(r) for r in restarts])


class Plugin:
    """The built-in plugin: ``restart_vm`` rationed by a guard this instance owns.

    ``make_plugin_manager`` registers a fresh instance, so two managers (two
    reactors in one process) never share restart history. With durable state
    (``reactor_state``) the guard keeps its history there, on the wall clock, so a
    restart of the sidecar forgets no restart.
    """

    def __init__(self, guard: RestartGuard | None = None) -> None:
        self.guard = RestartGuard() if guard is None else guard
        self.action_type = make_restart_vm(self.guard)

    @hookimpl
    def reactor_register_actions(self, register: Register) -> None:
        """Register ``restart_vm``."""
        register(self.action_type)

    @hookimpl
    def reactor_state(self, store: PluginState) -> None:
        """Keep the guard's history in ``store`` from now on (again after a reload: the
        store holds every restart, so the history read anew is the same)."""
        self.guard.attach(StoredHistory(store), time.time)
