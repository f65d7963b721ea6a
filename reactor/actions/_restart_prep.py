"""Before a restart: wait out the VM's block jobs and migration, and dump the guest's memory.

A reset in the middle of a backup, a snapshot or a migration spoils it, so
``wait_idle`` asks ``query-jobs`` and ``query-migrate`` whether something runs
(a QEMU too old for one of them has nothing of that kind to wait for). While
something does, it raises ``ActionNotDue``: the attempt ends, the dispatcher
gives its concurrency slot back and runs the invocation again a poll interval
later, uncounted. The ``RestartGuard`` remembers when the invocation first found
the VM busy, so that ``jobs_timeout`` after that the wait fails like any
attempt (``TransientActionError``, counted by the rule's ``retry:``; the retry
waits anew).
``dump_memory`` has QEMU write ``dump-guest-memory`` to a file in the
background and follows it with ``query-dump``; QEMU announces the end with
DUMP_COMPLETED, which reaches the rules marked as caused by ``restart_vm``.
A dump that fails or takes too long is reported, never a reason to leave the
VM down.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from reactor.actions._restart_guard import RestartGuard
from reactor.actions._vmcall import execute, require_vm
from reactor.errors import ActionNotDue, PermanentActionError, TransientActionError
from reactor.plugins.api import ActionContext

log = logging.getLogger("reactor.actions.restart_vm")

ACTION = "restart_vm"
IDLE_JOB_STATES = frozenset({"concluded", "null", "ready"})
"""Job states a restart does not spoil: finished, or a mirror that is in sync and stays so."""
IDLE_MIGRATION_STATES = frozenset({"none", "completed", "failed", "cancelled"})
MAX_DUMP_PATH = 4096


async def _query(ctx: ActionContext, command: str) -> Any:
    try:
        return await execute(ctx, ACTION, command)
    except PermanentActionError as err:
        log.debug("%s refused, taken as nothing running: %s", command, err)
        return None


def _shown(value: Any) -> str:
    """A value QEMU sent, bounded and printable, for a message."""
    text = str(value)[:64]
    return text if text.isidentifier() or text.replace("-", "_").isidentifier() else repr(text)


async def busy(ctx: ActionContext) -> str | None:
    """What on the VM a restart would spoil now (``backup job 'b0' running``), or None."""
    jobs = await _query(ctx, "query-jobs")
    for job in jobs if isinstance(jobs, list) else []:
        if not isinstance(job, dict) or str(job.get("status")) in IDLE_JOB_STATES:
            continue
        kind, status = _shown(job.get("type", "block")), _shown(job.get("status"))
        return f"{kind} job {str(job.get('id', ''))[:64]!r} {status}"
    migration = await _query(ctx, "query-migrate")
    status = migration.get("status", "none") if isinstance(migration, dict) else "none"
    if str(status) not in IDLE_MIGRATION_STATES:
        return f"migration {_shown(status)}"
    return None


async def wait_idle(
    ctx: ActionContext, guard: RestartGuard, timeout: float, interval: float
) -> None:
    """Return once no job or migration runs on the VM.

    While one does, raise ``ActionNotDue`` to be run again in ``interval``, holding
    nothing; once ``timeout`` passed since this invocation first found the VM busy
    (``guard.jobs_wait``), raise ``TransientActionError`` instead.
    """
    waiting = await busy(ctx)
    vm = require_vm(ctx).name
    if waiting is None:
        waited = guard.end_jobs_wait(ctx.invocation_id)
        if waited is not None:
            log.info("restart of VM %s waited %.1fs for jobs and migration", vm, waited)
        return
    waited, starts = guard.jobs_wait(ctx.invocation_id)
    if starts:
        log.info("restart of VM %s waits: %s", vm, waiting)
    if waited >= timeout:
        guard.end_jobs_wait(ctx.invocation_id)
        raise TransientActionError(
            f"VM {vm} not restarted: {waiting} after {timeout:g}s of waiting"
        )
    raise ActionNotDue(
        f"restart of VM {vm} waits: {waiting} ({waited:.0f}s of {timeout:g}s)",
        retry_after=interval,
    )


def dump_path_problem(path: str) -> str | None:
    """Why a rendered dump path is refused (not absolute, ``..``, control characters), or None."""
    if len(path) > MAX_DUMP_PATH:
        return "longer than 4096 characters"
    if not path.startswith("/"):
        return "not an absolute path"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "control characters"
    if ".." in path.split("/"):
        return "a '..' component"
    return None


async def dump_memory(
    ctx: ActionContext, path: str, timeout: float, interval: float
) -> dict[str, Any]:
    """Dump the guest's memory to ``path`` (ELF); the outcome as ``{path, status[, error]}``.

    ``status`` is ``completed``, ``failed`` or ``timeout``; only a lost connection raises.
    """
    outcome: dict[str, Any] = {"path": path}
    problem = dump_path_problem(path)
    if problem is not None:
        return {**outcome, "status": "failed", "error": f"dump path refused: {problem}"}
    arguments = {"paging": False, "protocol": f"file:{path}", "detach": True}
    try:
        await execute(ctx, ACTION, "dump-guest-memory", arguments)
    except PermanentActionError as err:
        return {**outcome, "status": "failed", "error": ctx.redact(str(err))}
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        reply = await execute(ctx, ACTION, "query-dump")
        status = reply.get("status") if isinstance(reply, dict) else None
        if status in ("completed", "failed"):
            return {**outcome, "status": status}
        if asyncio.get_running_loop().time() >= deadline:
            return {**outcome, "status": "timeout", "error": f"still {status} after {timeout:g}s"}
        await asyncio.sleep(interval)
