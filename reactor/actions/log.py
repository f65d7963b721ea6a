"""The ``log`` action: one structured line in the audit log."""

from __future__ import annotations

import json
import logging
from typing import Literal

from pydantic import Field

from reactor.plugins.api import ActionContext, ActionParams, ActionType
from reactor.plugins.hookspecs import Register, hookimpl

AUDIT = logging.getLogger("reactor.audit")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class LogParams(ActionParams):
    """Parameters of ``log``."""

    message: str | None = Field(
        None, description='the line to log (template); default "EVENT on VM"'
    )
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="the log level of the line"
    )


async def run_log(params: LogParams, ctx: ActionContext) -> str:
    """Log ``message`` with the rule, VM, event, sequence number and invocation id."""
    envelope = ctx.envelope
    fields = {
        "rule": ctx.rule,
        "vm": envelope.get("vm"),
        "event": envelope.get("event"),
        "seq": envelope.get("seq"),
        "invocation": ctx.invocation_id,
    }
    message = ctx.redact(params.message or f"{envelope.get('event')} on {envelope.get('vm')}")
    line = " ".join(f"{key}={json.dumps(value)}" for key, value in fields.items())
    AUDIT.log(
        _LEVELS[params.level],
        "%s message=%s",
        line,
        json.dumps(message, ensure_ascii=False),
        extra={"reactor": {**fields, "message": message}},
    )
    return message


LOG = ActionType(
    name="log",
    params=LogParams,
    run=run_log,
    description="Write one structured line to the reactor.audit log.",
)


@hookimpl
def reactor_register_actions(register: Register) -> None:
    """Register ``log``."""
    register(LOG)
