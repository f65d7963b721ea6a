"""The ``resume_vm`` action: continue a VM paused by an I/O error once the cause is gone.

A disk with ``werror=stop``/``rerror=stop`` pauses the VM (run state
``io-error``) on a failed request; QEMU retries the request on ``cont`` and
pauses again at once if the error persists. One attempt of this action is one
try: it checks that the VM is still paused for an I/O error (``query-status``,
and ``query-block``'s ``io-status`` for the devices to name), that ``min_free``
bytes are free on a path and that the ``probe`` program (exec must be enabled)
succeeds, then sends ``cont`` and watches the VM run for ``settle``. A failed
try is retried by the dispatcher no sooner than the action's own backoff
(``initial * 2**n`` up to ``max``), so no concurrency slot is held while it
waits. The try numbered ``max_tries`` that fails raises ``REACTOR_RESUME_GAVE_UP``
and ends the invocation. A VM that runs, or is paused for another reason (an
operator's ``stop``, a guest panic), is left alone.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from reactor.actions._vmcall import execute
from reactor.actions.exec import DISABLED, last_line, refuse_unless_enabled, run_argv
from reactor.errors import TransientActionError
from reactor.plugins.api import ActionContext, ActionParams, ActionType, CheckContext, Duration
from reactor.plugins.hookspecs import Register, hookimpl
from reactor.sources.reconcile import io_errors

ACTION = "resume_vm"
GAVE_UP = "REACTOR_RESUME_GAVE_UP"
IO_ERROR = "io-error"
POLL_INTERVAL = 0.2

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_UNITS |= {u + "ib": n for u, n in _UNITS.items() if u not in ("", "b")}
_UNITS |= {"kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


def parse_size(value: Any) -> int:
    """Bytes for ``1048576``, ``"512MiB"``, ``"1GiB"``, ``"10G"`` (as QEMU: 1024s) or ``"1GB"``."""
    if type(value) is int and value >= 0:
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    unit = _UNITS.get(m.group(2).lower()) if m is not None else None
    if m is None or unit is None:
        raise ValueError(f"invalid size {value!r}: write e.g. 1073741824, 512MiB or 1GiB")
    return int(float(m.group(1)) * unit)


Size = Annotated[int, BeforeValidator(parse_size)]


class Backoff(ActionParams):
    """Waits between tries: ``initial``, doubling up to ``max``."""

    initial: Duration = Field(10.0, ge=0, description="wait after the first failed try")
    max: Duration = Field(300.0, ge=0, description="the longest wait")


class MinFree(ActionParams):
    """Space that must be free before a try (the file system holding the images)."""

    path: str = Field(description="a path on the file system to check")
    bytes: Size = Field(description="bytes that must be available, e.g. 1GiB")


class ResumeParams(ActionParams):
    """Parameters of ``resume_vm``."""

    max_tries: int = Field(5, ge=1, description="tries before REACTOR_RESUME_GAVE_UP")
    settle: Duration = Field(5.0, ge=0, description="how long the VM must keep running")
    backoff: Backoff = Field(default_factory=Backoff, description="waits between tries")
    min_free: MinFree | None = Field(None, description="space needed before a try")
    probe: list[str] | None = Field(
        None, min_length=1, description="argv that must exit 0 before a try (needs exec enabled)"
    )
    probe_timeout: Duration = Field(30.0, gt=0, description="kill the probe after this long")


class _NotReady(Exception):
    """This try found the cause still there (or the VM paused again)."""


class _Try:
    """One try on one VM, polling at ``interval``."""

    def __init__(self, params: ResumeParams, ctx: ActionContext, interval: float) -> None:
        self.params = params
        self.ctx = ctx
        self.interval = interval

    async def status(self) -> str:
        reply = await execute(self.ctx, ACTION, "query-status")
        return str(reply.get("status", "unknown")) if isinstance(reply, dict) else "unknown"

    async def failed_devices(self) -> list[dict[str, str]]:
        """The block devices whose ``io-status`` is not ``ok``."""
        return io_errors(await execute(self.ctx, ACTION, "query-block"))

    async def preconditions(self) -> None:
        """``min_free`` and ``probe``; _NotReady says which one is not met."""
        need = self.params.min_free
        if need is not None:
            free = _free_bytes(need.path)
            if free < need.bytes:
                raise _NotReady(f"{free} bytes free on {need.path}, {need.bytes} needed")
        if self.params.probe is not None:
            refuse_unless_enabled(self.ctx.settings)
            argv = self.params.probe
            result = await run_argv(argv, timeout=self.params.probe_timeout, redact=self.ctx.redact)
            if result.exit_code != 0:
                detail = last_line(result.stderr) or last_line(result.stdout)
                raise _NotReady(
                    self.ctx.redact(f"probe {argv[0]!r} exited with {result.exit_code}: {detail}")
                )

    async def resume_and_settle(self) -> None:
        """``cont``, then the VM must run for ``settle``; _NotReady if it pauses again."""
        await execute(self.ctx, ACTION, "cont")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.params.settle
        while True:
            status = await self.status()
            if status != "running":
                raise _NotReady(f"paused again ({status}) after cont")
            left = deadline - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(min(left, self.interval))


def _free_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError as err:
        raise _NotReady(f"cannot check free space on {path}: {err.strerror}") from err
    return st.f_bavail * st.f_frsize


def backoff_delay(backoff: Backoff, tries: int) -> float:
    """The wait after ``tries`` failed tries: ``initial * 2**(tries-1)``, at most ``max``."""
    return float(min(backoff.initial * 2 ** max(tries - 1, 0), backoff.max))


def make_resume_vm(*, poll_interval: float = POLL_INTERVAL) -> ActionType:
    """The ``resume_vm`` action type, polling the VM every ``poll_interval`` seconds."""

    async def run_resume_vm(params: ResumeParams, ctx: ActionContext) -> dict[str, Any]:
        """One try: resumed, left alone, or (after ``max_tries``) given up."""
        one = _Try(params, ctx, poll_interval)
        status = await one.status()
        if status != IO_ERROR:
            return {"resumed": False, "status": status, "tries": ctx.attempt}
        devices = await one.failed_devices()
        try:
            await one.preconditions()
            await one.resume_and_settle()
        except _NotReady as err:
            return _failed_try(params, ctx, str(err), devices)
        return {"resumed": True, "tries": ctx.attempt, "devices": devices}

    return ActionType(
        name=ACTION,
        params=ResumeParams,
        run=run_resume_vm,
        check=check_resume_vm,
        description="Continue a VM paused by an I/O error once the cause is gone, with backoff.",
    )


def _failed_try(
    params: ResumeParams, ctx: ActionContext, reason: str, devices: list[dict[str, str]]
) -> dict[str, Any]:
    vm = ctx.vm.name if ctx.vm is not None else str(ctx.envelope.get("vm", ""))
    if ctx.attempt < params.max_tries:
        delay = backoff_delay(params.backoff, ctx.attempt)
        raise TransientActionError(
            f"VM {vm} not resumed (try {ctx.attempt} of {params.max_tries}): {reason}",
            retry_after=delay,
        )
    data = {"rule": ctx.rule, "tries": ctx.attempt, "reason": reason, "devices": devices}
    if ctx.emit is not None:
        ctx.emit(GAVE_UP, data)
    return {"resumed": False, "gave_up": True, **data}


def check_resume_vm(params: ResumeParams, ctx: CheckContext) -> list[str]:
    """A probe runs a program, so it needs exec enabled."""
    if params.probe is not None and not ctx.settings.exec_enabled:
        return [f"resume_vm probe runs a program, but {DISABLED}"]
    return []


RESUME_VM = make_resume_vm()


@hookimpl
def reactor_register_actions(register: Register) -> None:
    """Register ``resume_vm``."""
    register(RESUME_VM)
