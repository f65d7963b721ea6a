"""The ``qmp`` action: one QMP command on the VM that sent the event, if allowed."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from reactor.actions._vmcall import execute
from reactor.errors import PermanentActionError
from reactor.plugins.api import ActionContext, ActionParams, ActionType, CheckContext
from reactor.plugins.hookspecs import Register, hookimpl


class QmpParams(ActionParams):
    """Parameters of ``qmp``."""

    command: str = Field(min_length=1, description="the QMP command, e.g. cont")
    arguments: dict[str, Any] = Field(
        default_factory=dict, description="its arguments (strings are templates)"
    )


def allowlist_problem(command: str, allowed: frozenset[str]) -> str | None:
    """Why ``command`` is refused, or None when the operator allows it."""
    if command in allowed:
        return None
    names = ", ".join(sorted(allowed)) or "empty"
    return f"qmp command {command!r} is not on the allowlist ({names}); add it to actions.qmp.allow"


def check_qmp(params: QmpParams, ctx: CheckContext) -> list[str]:
    """Refuse commands that are not on the operator's allowlist."""
    problem = allowlist_problem(params.command, ctx.settings.qmp_allowlist)
    return [problem] if problem else []


async def run_qmp(params: QmpParams, ctx: ActionContext) -> Any:
    """Run the command and return QEMU's reply; an error reply is permanent."""
    problem = allowlist_problem(params.command, ctx.settings.qmp_allowlist)
    if problem:
        raise PermanentActionError(problem)
    return await execute(ctx, "qmp", params.command, params.arguments)


QMP = ActionType(
    name="qmp",
    params=QmpParams,
    run=run_qmp,
    check=check_qmp,
    description="Run one allowed QMP command on the VM that sent the event.",
)


@hookimpl
def reactor_register_actions(register: Register) -> None:
    """Register ``qmp``."""
    register(QMP)
