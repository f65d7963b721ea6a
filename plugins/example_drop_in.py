"""Example drop-in plugin: the ``append_line`` action appends a rendered line to a file.

Copy a file like this into ./plugins (or a directory given with --plugin-dir).
"""

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from reactor import ActionContext, ActionType, Register, hookimpl


class AppendLineParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    line: str  # a template: "{{ vm }} panicked"


async def append_line(params: AppendLineParams, ctx: ActionContext) -> str:
    with Path(params.path).open("a", encoding="utf-8") as f:
        f.write(params.line + "\n")
    return params.line


@hookimpl
def reactor_register_actions(register: Register) -> None:
    register(ActionType(name="append_line", params=AppendLineParams, run=append_line))
