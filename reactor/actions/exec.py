"""The ``exec`` action: run a program (no shell), off unless the operator enables it.

The program gets the event envelope as JSON on standard input, the process
environment plus ``env``, and its own process group, so a timeout kills the
program and everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import Field

from reactor.errors import PermanentActionError, TransientActionError
from reactor.plugins.api import (
    ActionContext,
    ActionParams,
    ActionSettings,
    ActionType,
    CheckContext,
    Duration,
)
from reactor.plugins.hookspecs import Register, hookimpl

DISABLED = "exec is disabled; set actions.exec.enabled: true in the configuration"
OUTPUT_LIMIT = 4096


class ExecParams(ActionParams):
    """Parameters of ``exec``."""

    argv: list[str] = Field(min_length=1, description="program and arguments (templates)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
    timeout: Duration = Field(30.0, gt=0, description="kill the program after this long")
    cwd: str | None = Field(None, description="working directory")


@dataclass(frozen=True, slots=True)
class ExecResult:
    """How a program ended: exit code and the tail of its output."""

    exit_code: int
    stdout: str
    stderr: str


def refuse_unless_enabled(settings: ActionSettings) -> None:
    """Raise PermanentActionError unless the operator enabled running programs."""
    if not settings.exec_enabled:
        raise PermanentActionError(DISABLED)


async def run_argv(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: bytes = b"",
    redact: Callable[[str], str],
) -> ExecResult:
    """Run ``argv`` to completion; TransientActionError on a timeout (process group killed).

    Error messages go through ``redact`` (they quote ``argv[0]``, maybe rendered from a secret).
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as err:
        raise PermanentActionError(redact(f"cannot start {argv[0]!r}: {err.strerror}")) from err
    try:
        out, err_out = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        raise TransientActionError(redact(f"{argv[0]!r} timed out after {timeout:g}s")) from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: leave nothing behind
            _kill_group(proc)
            await proc.wait()
            await _drain(proc)
    return ExecResult(proc.returncode or 0, _tail(out), _tail(err_out))


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _drain(proc: asyncio.subprocess.Process) -> None:
    # Read what is left so the pipe transports close before the loop does.
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            await stream.read()


def _tail(data: bytes) -> str:
    return data[-OUTPUT_LIMIT:].decode("utf-8", errors="replace")


def last_line(text: str) -> str:
    """The last non-empty line of ``text`` (empty if none)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


async def run_exec(params: ExecParams, ctx: ActionContext) -> dict[str, object]:
    """Run the program; a non-zero exit is a TransientActionError with the last stderr line."""
    refuse_unless_enabled(ctx.settings)
    stdin = json.dumps(ctx.envelope, default=str).encode()
    result = await run_argv(
        params.argv,
        timeout=params.timeout,
        env=params.env,
        cwd=params.cwd,
        stdin=stdin,
        redact=ctx.redact,
    )
    if result.exit_code != 0:
        detail = last_line(result.stderr)
        message = f"{params.argv[0]!r} exited with status {result.exit_code}"
        raise TransientActionError(ctx.redact(f"{message}: {detail}" if detail else message))
    return {"exit_code": 0, "stdout": ctx.redact(result.stdout)}


def check_exec(params: ExecParams, ctx: CheckContext) -> list[str]:
    """Refuse ``exec`` unless the operator enabled it."""
    return [] if ctx.settings.exec_enabled else [DISABLED]


EXEC = ActionType(
    name="exec",
    params=ExecParams,
    run=run_exec,
    check=check_exec,
    description="Run a program with arguments (no shell); the envelope arrives as JSON on stdin.",
)


@hookimpl
def reactor_register_actions(register: Register) -> None:
    """Register ``exec``."""
    register(EXEC)
