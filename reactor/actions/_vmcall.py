"""Running a QMP command on the event's VM, with failures sorted into transient and permanent.

A ``VmControl`` may raise our own action errors, or qemu.qmp's: an error reply
(``ExecuteError``) cannot be mended by retrying; a lost or absent connection can.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qemu.qmp import ExecuteError, QMPError

from reactor.errors import ActionError, PermanentActionError, TransientActionError
from reactor.plugins.api import ActionContext, VmControl

CONNECTION_ERRORS = (QMPError, ConnectionError, EOFError, OSError)


def require_vm(ctx: ActionContext) -> VmControl:
    """The event's VM connection; TransientActionError when there is none right now."""
    if ctx.vm is None:
        raise TransientActionError("VM not connected")
    return ctx.vm


async def execute(
    ctx: ActionContext, action: str, command: str, arguments: Mapping[str, Any] | None = None
) -> Any:
    """Run ``command`` on the event's VM, marking what it provokes as caused by (rule, action).

    An error reply raises PermanentActionError; a lost connection TransientActionError.
    """
    vm = require_vm(ctx)
    try:
        return await vm.execute(command, arguments, cause=(ctx.rule, action))
    except ActionError:
        raise
    except ExecuteError as err:
        raise PermanentActionError(f"qmp {command} on {vm.name} failed: {err}") from err
    except CONNECTION_ERRORS as err:
        raise TransientActionError(
            f"qmp {command} on {vm.name}: connection lost: {type(err).__name__}: {err}"
        ) from err
