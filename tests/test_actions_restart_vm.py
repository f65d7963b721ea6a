"""restart_vm: the QMP steps of each method, verification, and the restart guard.

``FakeQemu`` is an in-test double of a VM's QMP connection (a plain class with
QEMU's run-state rules for these few commands); the real-QEMU restart test
belongs to the integration suite.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse

from reactor.actions.exec import DISABLED
from reactor.actions.restart_vm import Plugin, RestartGuard, RestartParams, make_restart_vm
from reactor.errors import PermanentActionError, TransientActionError
from reactor.plugins.api import ActionContext, ActionSettings, CheckContext

CAUSE = ("panic", "restart_vm")


def qmp_error(command: str, desc: str) -> ExecuteError:
    error = {"class": "GenericError", "desc": desc}
    return ExecuteError(ErrorResponse({"error": error}), Message({"execute": command}), Message({}))


class FakeQemu:
    """QEMU's run states for reset, cont, powerdown and quit, with every command recorded."""

    def __init__(self, status: str = "running", *, obeys_powerdown: bool = True) -> None:
        self.name = "web1"
        self.status = status
        self.obeys_powerdown = obeys_powerdown
        self.stuck = False  # cont is accepted but the VM never runs
        self.calls: list[str] = []
        self.causes: set[tuple[str, str] | None] = set()

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        cause: tuple[str, str] | None = None,
    ) -> Any:
        self.calls.append(command)
        self.causes.add(cause)
        return getattr(self, command.replace("-", "_"))()

    def query_status(self) -> dict[str, Any]:
        return {"status": self.status, "running": self.status == "running"}

    def system_reset(self) -> dict[str, Any]:
        if self.status != "running":
            self.status = "prelaunch"
        return {}

    def cont(self) -> dict[str, Any]:
        if self.status in ("shutdown", "guest-panicked"):
            raise qmp_error("cont", "Resetting the Virtual Machine is required")
        if not self.stuck:
            self.status = "running"
        return {}

    def system_powerdown(self) -> dict[str, Any]:
        if self.obeys_powerdown:
            self.status = "shutdown"
        return {}

    def quit(self) -> dict[str, Any]:
        raise EOFError("connection closed")


Emitted = list[tuple[str, dict[str, Any]]]


def make_ctx(
    vm: FakeQemu | None, invocation: str = "inv-1", emitted: Emitted | None = None, **settings: Any
) -> ActionContext:
    sink: Emitted = [] if emitted is None else emitted
    return ActionContext(
        invocation_id=invocation,
        idempotency_key=invocation,
        rule="panic",
        action_index=0,
        envelope={"event": "GUEST_PANICKED", "vm": "web1", "data": {}},
        context={},
        attempt=1,
        settings=ActionSettings(**settings),
        vm=vm,
        emit=lambda event, data: sink.append((event, data)),
    )


def restart(
    vm: FakeQemu | None,
    params: dict[str, Any] | None = None,
    *,
    guard: RestartGuard | None = None,
    ctx: ActionContext | None = None,
) -> Any:
    kind = make_restart_vm(guard or RestartGuard(), poll_interval=0.005)
    model = RestartParams.model_validate(params or {})
    return asyncio.run(kind.run(model, ctx or make_ctx(vm)))


def test_reset_of_a_running_vm() -> None:
    vm = FakeQemu("running")
    assert restart(vm) == {"method": "reset", "suppressed": False}
    assert vm.calls == ["system_reset", "query-status"]
    assert vm.causes == {CAUSE}


@pytest.mark.parametrize("status", ["paused", "guest-panicked"])
def test_reset_of_a_stopped_vm_continues_it(status: str) -> None:
    vm = FakeQemu(status)
    restart(vm)
    assert vm.calls == ["system_reset", "query-status", "cont", "query-status"]
    assert vm.status == "running" and vm.causes == {CAUSE}


def test_powerdown_waits_for_the_guest_then_resets_and_continues() -> None:
    vm = FakeQemu("running")
    restart(vm, {"method": "powerdown"})
    assert vm.calls == [
        "system_powerdown",
        "query-status",
        "system_reset",
        "query-status",
        "cont",
        "query-status",
    ]
    assert vm.status == "running"


def test_powerdown_ignored_by_the_guest_is_forced_by_a_reset() -> None:
    vm = FakeQemu("running", obeys_powerdown=False)
    restart(vm, {"method": "powerdown", "powerdown_timeout": "50ms"})
    assert vm.calls[0] == "system_powerdown"
    assert vm.calls.count("query-status") >= 3
    assert vm.calls[-2:] == ["system_reset", "query-status"]


def test_quit_succeeds_when_the_connection_closes() -> None:
    vm = FakeQemu("running")
    assert restart(vm, {"method": "quit"}) == {"method": "quit", "suppressed": False}
    assert vm.calls == ["quit"]


def test_a_vm_that_does_not_run_again_fails_the_verification() -> None:
    vm = FakeQemu("paused")
    vm.stuck = True
    with pytest.raises(TransientActionError, match=r"VM web1 not running 0\.05s after reset"):
        restart(vm, {"timeout": "50ms"})
    assert vm.calls.count("cont") >= 2


def test_no_vm_connection_is_transient() -> None:
    with pytest.raises(TransientActionError, match="VM not connected"):
        restart(None)


def test_guard_suppresses_past_the_limit_and_emits_an_event() -> None:
    guard = RestartGuard()
    vm = FakeQemu("running")
    for n in range(2):
        restart(vm, {"limit": 2, "window": "10m"}, guard=guard, ctx=make_ctx(vm, f"inv-{n}"))
    vm.calls.clear()
    emitted: Emitted = []
    ctx = make_ctx(vm, "inv-3", emitted)
    result = restart(vm, {"limit": 2, "window": "10m"}, guard=guard, ctx=ctx)
    assert result == {
        "method": "reset",
        "suppressed": True,
        "rule": "panic",
        "restarts": 2,
        "window": 600.0,
        "limit": 2,
    }
    assert vm.calls == []
    assert emitted == [
        (
            "REACTOR_RESTART_SUPPRESSED",
            {"rule": "panic", "restarts": 2, "window": 600.0, "limit": 2},
        )
    ]


def test_guard_defaults_come_from_settings() -> None:
    guard = RestartGuard()
    vm = FakeQemu("running")
    restart(vm, guard=guard, ctx=make_ctx(vm, "a", restart_limit=1))
    result = restart(vm, guard=guard, ctx=make_ctx(vm, "b", restart_limit=1))
    assert result["suppressed"] is True and result["limit"] == 1


def test_guard_counts_an_invocation_once_and_forgets_after_the_window() -> None:
    now = [1000.0]
    guard = RestartGuard(clock=lambda: now[0])
    assert guard.admit("web1", "inv-a", limit=1, window=60) == (True, 1)
    assert guard.admit("web1", "inv-a", limit=1, window=60) == (True, 1)  # a retry
    assert guard.admit("web1", "inv-b", limit=1, window=60) == (False, 1)
    assert guard.admit("web2", "inv-c", limit=1, window=60) == (True, 1)  # per VM
    now[0] += 60.5
    assert guard.admit("web1", "inv-b", limit=1, window=60) == (True, 1)


def test_method_command_needs_exec(tmp_path: Path) -> None:
    kind = make_restart_vm(RestartGuard())
    assert kind.check is not None
    params = RestartParams(method="command", command=["touch", str(tmp_path / "restarted")])
    problems = kind.check(params, CheckContext(settings=ActionSettings(), rule="r"))
    assert problems == [f"restart_vm method: command runs a program, but {DISABLED}"]
    with pytest.raises(PermanentActionError, match="exec is disabled"):
        restart(FakeQemu(), params.model_dump())
    assert not (tmp_path / "restarted").exists()


def test_method_command_runs_the_program_when_enabled(tmp_path: Path) -> None:
    params = {"method": "command", "command": ["touch", str(tmp_path / "restarted")]}
    vm = FakeQemu()
    result = restart(vm, params, ctx=make_ctx(vm, exec_enabled=True))
    assert result == {"method": "command", "suppressed": False}
    assert (tmp_path / "restarted").exists()
    with pytest.raises(TransientActionError, match="exited with 1"):
        restart(
            vm, {"method": "command", "command": ["false"]}, ctx=make_ctx(vm, exec_enabled=True)
        )


@pytest.mark.parametrize(
    "params", [{"method": "command"}, {"method": "reset", "command": ["x"]}, {"limit": 0}]
)
def test_parameter_rules(params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RestartParams.model_validate(params)


def test_a_fresh_plugin_has_a_fresh_guard() -> None:
    """Restart history belongs to the plugin instance a manager registers, not to the process."""
    first, second = Plugin(), Plugin()
    params = RestartParams(limit=1)

    def suppressed(plugin: Plugin, invocation: str) -> bool:
        ctx = make_ctx(FakeQemu("running"), invocation)
        return bool(asyncio.run(plugin.action_type.run(params, ctx))["suppressed"])

    assert first.guard is not second.guard
    assert not suppressed(first, "inv-1")
    assert suppressed(first, "inv-2")
    assert not suppressed(second, "inv-2")
