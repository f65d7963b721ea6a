"""The qmp action: allowlist at check and at run, errors sorted, cause passed on.

The VM is an in-test double (a plain class recording commands); the real QMP
connection is exercised by the integration suite.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from qemu.qmp import ExecuteError
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse

from reactor.actions.qmp import QMP, QmpParams
from reactor.errors import PermanentActionError, TransientActionError
from reactor.plugins.api import ActionSettings, CheckContext
from tests.support.dispatched import dispatch_once

ENVELOPE = {"event": "BLOCK_IO_ERROR", "data": {"device": "virtio0"}, "vm": "db1", "seq": 3}


class RecordingVm:
    """Answers every command with ``reply``, or raises ``error``; records what it got."""

    def __init__(self, reply: Any = None, error: BaseException | None = None) -> None:
        self.name = "db1"
        self.reply = {} if reply is None else reply
        self.error = error
        self.calls: list[tuple[str, dict[str, Any] | None, tuple[str, str] | None]] = []

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        cause: tuple[str, str] | None = None,
    ) -> Any:
        self.calls.append((command, dict(arguments) if arguments else None, cause))
        if self.error is not None:
            raise self.error
        return self.reply


def run(params: dict[str, Any], vm: RecordingVm | None, **kw: Any) -> Any:
    """Run as the daemon does: a real dispatcher renders ``params`` and runs ``qmp`` once."""
    return dispatch_once(QMP, params, ENVELOPE, rule="io-error", vm=vm, **kw).value()


def test_check_refuses_commands_off_the_allowlist() -> None:
    assert QMP.check is not None
    ctx = CheckContext(settings=ActionSettings(qmp_allowlist=frozenset({"cont", "stop"})), rule="r")
    assert QMP.check(QmpParams(command="cont"), ctx) == []
    assert QMP.check(QmpParams(command="quit"), ctx) == [
        "qmp command 'quit' is not on the allowlist (cont, stop); add it to actions.qmp.allow"
    ]


def test_run_refuses_commands_off_the_allowlist_without_sending() -> None:
    vm = RecordingVm()
    with pytest.raises(PermanentActionError, match="'human-monitor-command' is not on"):
        run({"command": "human-monitor-command"}, vm)
    assert vm.calls == []


def test_run_sends_templated_arguments_with_the_cause() -> None:
    vm = RecordingVm(reply={"status": "running", "running": True})
    settings = ActionSettings(qmp_allowlist=frozenset({"block-set-write-threshold"}))
    reply = run(
        {
            "command": "block-set-write-threshold",
            "arguments": {"node-name": "{{ data.device }}", "write-threshold": 1024},
        },
        vm,
        settings=settings,
    )
    assert reply == {"status": "running", "running": True}
    assert vm.calls == [
        (
            "block-set-write-threshold",
            {"node-name": "virtio0", "write-threshold": 1024},
            ("io-error", "qmp"),
        )
    ]


def test_no_vm_connection_is_transient() -> None:
    with pytest.raises(TransientActionError, match="VM not connected"):
        run({"command": "cont"}, None)


def test_error_reply_is_permanent() -> None:
    error = {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}
    reply = ErrorResponse({"error": error})
    err = ExecuteError(reply, Message({"execute": "cont"}), Message({"error": error}))
    with pytest.raises(PermanentActionError, match="qmp cont on db1 failed: Resetting"):
        run({"command": "cont"}, RecordingVm(error=err))


@pytest.mark.parametrize("error", [ConnectionResetError("peer reset"), EOFError()])
def test_lost_connection_is_transient(error: BaseException) -> None:
    with pytest.raises(TransientActionError, match="connection lost"):
        run({"command": "stop"}, RecordingVm(error=error))


def test_action_errors_from_the_connection_pass_through() -> None:
    with pytest.raises(TransientActionError, match=r"^reconnecting$"):
        run({"command": "stop"}, RecordingVm(error=TransientActionError("reconnecting")))
