"""Example installed plugin: the ``stdout`` action prints a rendered line on standard output.

Installed distributions are found through the ``qmp_reactor`` entry-point group
(see this directory's pyproject.toml).
"""

from __future__ import annotations

import sys

from pydantic import BaseModel, ConfigDict, Field

from reactor import ActionContext, ActionType, Register, hookimpl


class StdoutParams(BaseModel):
    """Parameters of ``stdout``."""

    model_config = ConfigDict(extra="forbid")
    line: str = Field(description="what to print (template)")


async def print_line(params: StdoutParams, ctx: ActionContext) -> str:
    """Print ``line`` and return it."""
    sys.stdout.write(params.line + "\n")
    sys.stdout.flush()
    return params.line


@hookimpl
def reactor_register_actions(register: Register) -> None:
    """Register ``stdout``."""
    register(
        ActionType(
            name="stdout",
            params=StdoutParams,
            run=print_line,
            description="Print a line on standard output.",
        )
    )
