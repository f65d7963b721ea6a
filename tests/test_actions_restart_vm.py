"""restart_vm: the QMP steps of each method, verification, the restart guard and its backoff,
the wait for jobs and migration, and the memory dump.

Waits the action hands back to the dispatcher (``ActionNotDue``) are run again by
``restart_when_due``, as the dispatcher does, with the guard's clocks moved on instead of
sleeping.

``FakeQemu`` is an in-test double of a VM's QMP connection (a plain class with
QEMU's run-state rules for these few commands); the real-QEMU tests are in
``test_restart_qemu.py`` and ``test_e2e_guest.py``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse

from reactor.actions import _restart_guard
from reactor.actions._restart_guard import JOBS_WAITS_KEPT, Backoff
from reactor.actions._restart_prep import dump_path_problem
from reactor.actions.exec import DISABLED
from reactor.actions.restart_vm import Plugin, RestartGuard, RestartParams, make_restart_vm
from reactor.dispatch.dispatcher import Dispatcher
from reactor.errors import ActionNotDue, Location, PermanentActionError, TransientActionError
from reactor.model import ActionSpec, Firing, RetryPolicy, Rule
from reactor.plugins.api import (
    ActionContext,
    ActionParams,
    ActionSettings,
    ActionType,
    CheckContext,
)
from reactor.plugins.hookspecs import ActionOutcome

CAUSE = ("panic", "restart_vm")
PREP = ("query-jobs", "query-migrate")


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
        self.jobs: list[list[dict[str, Any]]] = []  # query-jobs answers, one per call, last kept
        self.migration: dict[str, Any] = {}
        self.dumps: list[dict[str, Any]] = []
        self.dump_states = ["active", "completed"]

    @property
    def steps(self) -> list[str]:
        """The commands sent, without the checks for jobs and migration."""
        return [c for c in self.calls if c not in PREP]

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        cause: tuple[str, str] | None = None,
    ) -> Any:
        self.calls.append(command)
        self.causes.add(cause)
        if command == "dump-guest-memory":
            self.dumps.append(dict(arguments or {}))
            return {}
        return getattr(self, command.replace("-", "_"))()

    def query_jobs(self) -> list[dict[str, Any]]:
        return self.jobs.pop(0) if len(self.jobs) > 1 else (self.jobs or [[]])[0]

    def query_migrate(self) -> dict[str, Any]:
        return self.migration

    def query_dump(self) -> dict[str, Any]:
        status = self.dump_states.pop(0) if len(self.dump_states) > 1 else self.dump_states[0]
        return {"status": status, "completed": 0, "total": 1}

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


class Clocks:
    """A guard's two clocks, moved on by hand: ``clock`` (the history's) and ``monotonic``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def guard(self) -> RestartGuard:
        return RestartGuard(clock=self, monotonic=self)


def restart_when_due(
    vm: FakeQemu,
    params: dict[str, Any] | None = None,
    *,
    clocks: Clocks,
    guard: RestartGuard,
    ctx: ActionContext | None = None,
    not_due: list[ActionNotDue] | None = None,
) -> Any:
    """As ``restart``, but run again after each ``ActionNotDue`` (kept in ``not_due``), as the
    dispatcher does: the clocks move on by its ``retry_after`` instead of a sleep."""
    kind = make_restart_vm(guard, poll_interval=0.005)
    model = RestartParams.model_validate(params or {})
    context = ctx or make_ctx(vm)
    seen: list[ActionNotDue] = [] if not_due is None else not_due

    async def runs() -> Any:
        for _ in range(1000):
            try:
                return await kind.run(model, context)
            except ActionNotDue as err:
                seen.append(err)
                clocks.now += float(err.retry_after or 0.0)
        raise AssertionError("still not due after 1000 runs")

    return asyncio.run(runs())


def test_reset_of_a_running_vm() -> None:
    vm = FakeQemu("running")
    assert restart(vm) == {"method": "reset", "suppressed": False}
    assert vm.steps == ["system_reset", "query-status"]
    assert vm.causes == {CAUSE}


@pytest.mark.parametrize("status", ["paused", "guest-panicked"])
def test_reset_of_a_stopped_vm_continues_it(status: str) -> None:
    vm = FakeQemu(status)
    restart(vm)
    assert vm.steps == ["system_reset", "query-status", "cont", "query-status"]
    assert vm.status == "running" and vm.causes == {CAUSE}


def test_powerdown_waits_for_the_guest_then_resets_and_continues() -> None:
    vm = FakeQemu("running")
    restart(vm, {"method": "powerdown"})
    assert vm.steps == [
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
    assert vm.steps[0] == "system_powerdown"
    assert vm.steps.count("query-status") >= 3
    assert vm.steps[-2:] == ["system_reset", "query-status"]


def test_quit_succeeds_when_the_connection_closes() -> None:
    vm = FakeQemu("running")
    assert restart(vm, {"method": "quit"}) == {"method": "quit", "suppressed": False}
    assert vm.steps == ["quit"]


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


BACKOFF = Backoff(initial=10, max=60, reset_after=300)


def test_backoff_doubles_up_to_max() -> None:
    assert [BACKOFF.delay(n) for n in range(1, 7)] == [0, 10, 20, 40, 60, 60]
    assert BACKOFF.delay(10_000) == 60


def test_guard_backoff_counts_consecutive_restarts_and_resets_after_a_good_run() -> None:
    now = [1000.0]
    guard = RestartGuard(clock=lambda: now[0])

    def admit(invocation: str) -> tuple[int, float]:
        answer = guard.decide("web1", invocation, limit=10, window=3600, backoff=BACKOFF)
        assert answer.admitted
        return answer.streak, answer.due - now[0]

    assert admit("a") == (1, 0)
    guard.note("web1", "a", ran=True)
    now[0] += 30  # panicked again after running 30 s
    assert admit("b") == (2, 10)
    assert admit("b") == (2, 10)  # a retry waits what is left, counts once
    now[0] += 4
    assert admit("b") == (2, 6)
    now[0] += 6
    guard.note("web1", "b", ran=True)
    now[0] += 299
    assert admit("c") == (3, 20)
    now[0] += 20
    guard.note("web1", "c", ran=True)
    now[0] += 300  # ran reset_after without a panic: starts over
    assert admit("d") == (1, 0)
    assert guard.decide("web2", "e", 10, 3600, BACKOFF).streak == 1  # per VM


def test_guard_backoff_keeps_the_cap() -> None:
    now = [0.0]
    guard = RestartGuard(clock=lambda: now[0])
    slow = Backoff(initial=10, max=60, reset_after=3600)
    for invocation in "ab":
        assert guard.decide("web1", invocation, 2, 600, slow).admitted
        now[0] += 1
    answer = guard.decide("web1", "c", 2, 600, slow)
    assert (answer.admitted, answer.restarts) == (False, 2)
    now[0] += 600  # the window passed, reset_after did not: the streak goes on
    answer = guard.decide("web1", "c", 2, 600, slow)
    assert (answer.admitted, answer.streak, answer.due - now[0]) == (True, 3, 20)


def test_consecutive_restarts_wait_longer_each_time() -> None:
    guard = RestartGuard()
    vm = FakeQemu("guest-panicked")
    params = {"backoff": {"initial": "50ms", "max": "80ms", "reset_after": "1h"}}
    results = []
    for n in range(3):
        vm.status = "guest-panicked"
        results.append(restart(vm, params, guard=guard, ctx=make_ctx(vm, f"inv-{n}")))
    assert [(r["streak"], r["suppressed"]) for r in results] == [(1, False), (2, False), (3, False)]
    assert results[0]["waited"] == 0
    assert 0.03 < results[1]["waited"] <= 0.05
    assert 0.06 < results[2]["waited"] <= 0.08
    assert vm.status == "running"
    fourth = restart(vm, params, guard=guard, ctx=make_ctx(vm, "inv-4"))
    assert fourth["suppressed"] is True and fourth["restarts"] == 3


BACKUP = {"id": "b0", "type": "backup", "status": "running"}
JOBS_POLL = 0.025
"""The wait between two looks at jobs and migration with ``poll_interval=0.005``."""


def test_restart_waits_for_jobs_and_migration_holding_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", "reactor.actions.restart_vm")
    clocks = Clocks()
    guard = clocks.guard()
    vm = FakeQemu("guest-panicked")
    vm.jobs = [[BACKUP], [BACKUP], [{**BACKUP, "status": "concluded"}]]
    not_due: list[ActionNotDue] = []
    assert restart_when_due(vm, clocks=clocks, guard=guard, not_due=not_due)["suppressed"] is False
    # Each look at the jobs was a run of its own, ended by ActionNotDue while the backup ran.
    assert [(e.retry_after, str(e)) for e in not_due] == [
        (JOBS_POLL, "restart of VM web1 waits: backup job 'b0' running (0s of 600s)"),
        (JOBS_POLL, "restart of VM web1 waits: backup job 'b0' running (0s of 600s)"),
    ]
    assert vm.calls[: vm.calls.index("system_reset")].count("query-jobs") == 3
    assert vm.status == "running"
    logged = [r.getMessage() for r in caplog.records]
    assert logged[0] == "restart of VM web1 waits: backup job 'b0' running"  # once
    assert re.fullmatch(r"restart of VM web1 waited 0\.[01]s for jobs and migration", logged[1])
    assert len(logged) == 2
    assert guard.jobs_waiting == 0
    assert guard.decide("web1", "inv-2", 10, 600).restarts == 2  # the runs counted once

    guard, vm = clocks.guard(), FakeQemu("guest-panicked")
    vm.migration = {"status": "active"}
    not_due.clear()
    with pytest.raises(TransientActionError, match=r"not restarted: migration active after 0\.05s"):
        restart_when_due(vm, {"jobs_timeout": "50ms"}, clocks=clocks, guard=guard, not_due=not_due)
    assert 2 <= len(not_due) <= 3 and all(e.retry_after == JOBS_POLL for e in not_due)
    assert "system_reset" not in vm.calls and vm.status == "guest-panicked"
    assert guard.jobs_waiting == 0  # the retry the rule's retry: makes waits anew


def test_a_run_after_a_wait_for_jobs_counts_once_and_dumps_once(tmp_path: Path) -> None:
    clocks = Clocks()
    guard = clocks.guard()
    vm = FakeQemu("guest-panicked")
    params = {
        "backoff": {"initial": "20s", "max": "20s", "reset_after": "1h"},
        "dump": str(tmp_path / "web1.elf"),
    }
    restart_when_due(vm, params, clocks=clocks, guard=guard, ctx=make_ctx(vm, "inv-1"))
    assert len(vm.dumps) == 1
    vm.status = "guest-panicked"
    vm.calls.clear()
    vm.jobs = [[BACKUP], [BACKUP], [BACKUP], []]
    not_due: list[ActionNotDue] = []
    second = make_ctx(vm, "inv-2")
    result = restart_when_due(vm, params, clocks=clocks, guard=guard, ctx=second, not_due=not_due)
    # First the backoff, then the jobs; the dump and the reset only after both.
    assert [e.retry_after for e in not_due] == [20, JOBS_POLL, JOBS_POLL, JOBS_POLL]
    assert "restart 2 in a row (backoff)" in str(not_due[0])
    dumped = vm.calls.index("dump-guest-memory")
    assert vm.calls.count("query-jobs") == 4 and "query-jobs" not in vm.calls[dumped:]
    assert (result["streak"], result["waited"], result["dump"]["status"]) == (2, 20, "completed")
    assert len(vm.dumps) == 2 and vm.status == "running"
    assert guard.decide("web1", "inv-3", 10, 600).restarts == 3  # inv-2 counted once


class NoParams(ActionParams):
    """No parameters."""


def test_through_the_dispatcher_a_restart_waiting_for_jobs_holds_no_slot() -> None:
    """One slot: another rule's action runs while the restart waits, and the wait outlasts
    the attempt's ``timeout`` without spending an attempt."""
    vm = FakeQemu("guest-panicked")
    vm.jobs = [[BACKUP]]
    guard = RestartGuard()
    delivered: list[str] = []
    outcomes: list[ActionOutcome] = []

    async def deliver(params: NoParams, ctx: ActionContext) -> None:
        delivered.append(ctx.envelope["vm"])

    here = Location("rules.yaml", 1, 1)
    once = RetryPolicy(attempts=1, initial=1.0, max=1.0, multiplier=2.0, jitter=0.0)
    panic = Rule(
        "panic",
        ("GUEST_PANICKED",),
        (ActionSpec("restart_vm", {}, here, retry=once, timeout=1.0),),
        here,
    )
    hook = Rule("hook", ("POWERDOWN",), (ActionSpec("deliver", {}, here, retry=once),), here)

    async def main() -> None:
        dispatcher = Dispatcher(
            action_types={
                "restart_vm": make_restart_vm(guard, poll_interval=0.005),
                "deliver": ActionType("deliver", NoParams, deliver),
            },
            settings=ActionSettings(),
            render=lambda inv, atype: atype.params.model_validate(inv.spec.params),
            journal=None,
            vm_lookup=lambda name, source: vm if name == "web1" else None,
            on_outcome=outcomes.append,
            max_concurrency=1,
        )
        await dispatcher.start()
        try:
            envelope = {"event": "GUEST_PANICKED", "vm": "web1", "seq": 1, "data": {}}
            dispatcher.submit(Firing(panic, envelope, 0.0))
            async with asyncio.timeout(30):
                while not guard.jobs_waiting:
                    await asyncio.sleep(0.01)
                waiting = time.monotonic()
                dispatcher.submit(Firing(hook, {"event": "POWERDOWN", "vm": "web2", "seq": 1}, 0.0))
                while not delivered:
                    await asyncio.sleep(0.01)
                assert vm.status == "guest-panicked" and not outcomes[1:]
                await asyncio.sleep(max(0.0, waiting + 1.5 - time.monotonic()))  # > timeout
                vm.jobs = [[]]  # the backup ends
                await dispatcher.drain()
        finally:
            await dispatcher.shutdown(0.0)

    asyncio.run(main())
    assert delivered == ["web2"] and vm.status == "running"
    assert [(o.rule, o.status, o.attempt) for o in outcomes] == [
        ("hook", "ok", 1),
        ("panic", "ok", 1),
    ]
    assert vm.calls.count("query-jobs") >= 3 and guard.jobs_waiting == 0


def test_a_vm_started_by_someone_else_while_the_restart_waits_for_jobs_is_left() -> None:
    clocks = Clocks()
    guard = clocks.guard()
    vm = FakeQemu("guest-panicked")
    params = {"backoff": {"initial": "1m", "max": "1m"}}
    restart_when_due(vm, params, clocks=clocks, guard=guard, ctx=make_ctx(vm, "inv-1"))
    vm.status = "guest-panicked"  # seen stopped during the backoff below
    vm.calls.clear()
    vm.jobs = [[BACKUP]]
    kind = make_restart_vm(guard, poll_interval=0.005)
    second = make_ctx(vm, "inv-2")
    with pytest.raises(ActionNotDue, match="restart 2 in a row"):
        asyncio.run(kind.run(RestartParams(**params), second))
    clocks.now += 60
    with pytest.raises(ActionNotDue, match="waits: backup job 'b0' running"):
        asyncio.run(kind.run(RestartParams(**params), second))
    assert guard.jobs_waiting == 1
    vm.status = "running"  # an operator's system_reset and cont, while the backup runs
    result = asyncio.run(kind.run(RestartParams(**params), second))
    assert result["skipped"] == "running again" and result["streak"] == 2
    assert "system_reset" not in vm.calls and guard.jobs_waiting == 0


def test_a_run_that_fails_while_it_waits_for_jobs_ends_its_wait() -> None:
    clocks = Clocks()
    guard = clocks.guard()
    vm = FakeQemu("guest-panicked")
    vm.jobs = [[BACKUP], []]  # then over, but the connection is lost
    kind = make_restart_vm(guard, poll_interval=0.005)
    with pytest.raises(ActionNotDue):
        asyncio.run(kind.run(RestartParams(), make_ctx(vm)))
    assert guard.jobs_waiting == 1

    def lost() -> None:
        raise EOFError("connection closed")

    vm.query_migrate = lost  # type: ignore[method-assign]
    with pytest.raises(TransientActionError, match="query-migrate on web1: connection lost"):
        asyncio.run(kind.run(RestartParams(), make_ctx(vm)))
    assert guard.jobs_waiting == 0


def test_the_guard_forgets_a_wait_for_jobs_that_ended_and_keeps_a_bounded_number() -> None:
    clocks = Clocks()
    guard = clocks.guard()
    assert guard.jobs_wait("a") == (0.0, True)
    clocks.now += 3
    assert guard.jobs_wait("a") == (3.0, False)
    assert guard.end_jobs_wait("a") == 3.0
    assert guard.end_jobs_wait("a") is None and guard.jobs_waiting == 0
    assert guard.jobs_wait("a") == (0.0, True)  # a new wait
    for n in range(JOBS_WAITS_KEPT + 5):  # invocations cancelled while they waited
        guard.jobs_wait(f"inv-{n}")
    assert guard.jobs_waiting == JOBS_WAITS_KEPT
    assert guard.jobs_wait("a")[1] is True  # the oldest went first
    assert guard.jobs_wait("inv-5") == (0.0, True)
    assert guard.jobs_wait(f"inv-{JOBS_WAITS_KEPT + 4}") == (0.0, False)
    assert _restart_guard.JOBS_WAITS_KEPT == 10_000


def test_the_jobs_wait_is_on_the_monotonic_clock_with_a_wall_clock_history() -> None:
    wall, monotonic = Clocks(), Clocks()
    guard = RestartGuard(monotonic=monotonic)
    guard.attach(_restart_guard.MemoryHistory(), clock=wall)
    guard.jobs_wait("a")
    wall.now -= 3600  # the wall clock set back an hour
    monotonic.now += 2
    assert guard.jobs_wait("a") == (2.0, False)


def test_a_restart_waiting_for_jobs_keeps_its_record_past_the_window() -> None:
    clocks = Clocks()
    guard = clocks.guard()
    assert guard.decide("web1", "a", 10, 60).restarts == 1
    guard.jobs_wait("a")  # a waits for a backup
    clocks.now += 1
    assert guard.decide("web1", "b", 10, 60).restarts == 2
    clocks.now += 120
    assert guard.decide("web1", "c", 10, 60).restarts == 1  # a and b out of the window
    again = guard.decide("web1", "a", 10, 60)  # a's next run: admitted as before
    assert again.admitted and again.at == 1000.0


def test_dump_before_the_reset_once_per_invocation(tmp_path: Path) -> None:
    guard = RestartGuard()
    vm = FakeQemu("guest-panicked")
    vm.stuck = True  # the first attempt fails its verification, the retry must not dump again
    params = {"dump": str(tmp_path / "web1.elf"), "timeout": "50ms"}
    with pytest.raises(TransientActionError):
        restart(vm, params, guard=guard)
    assert vm.calls[vm.calls.index("dump-guest-memory") :][:3] == [
        "dump-guest-memory",
        "query-dump",
        "query-dump",
    ]
    assert vm.dumps == [{"paging": False, "protocol": f"file:{tmp_path}/web1.elf", "detach": True}]
    vm.stuck = False
    result = restart(vm, params, guard=guard)
    assert len(vm.dumps) == 1 and vm.status == "running"
    assert "dump" not in result


@pytest.mark.parametrize(("state", "expected"), [("failed", "failed"), ("active", "timeout")])
def test_a_dump_that_fails_does_not_keep_the_vm_down(state: str, expected: str) -> None:
    vm = FakeQemu("guest-panicked")
    vm.dump_states = [state]
    result = restart(vm, {"dump": "/var/crash/web1.elf", "dump_timeout": "30ms"})
    assert result["dump"]["status"] == expected
    assert vm.status == "running"


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/var/crash/../../etc/passwd", "a '..' component"),
        ("/var/crash/a\nb.elf", "control characters"),
        ("var/crash", "not an absolute path"),
        ("/" + "a" * 5000, "longer than 4096 characters"),
        ("/var/crash/web1..elf", None),
    ],
)
def test_dump_paths_a_guest_could_steer_are_refused(path: str, problem: str | None) -> None:
    assert dump_path_problem(path) == problem


def test_a_refused_dump_path_still_restarts() -> None:
    vm = FakeQemu("guest-panicked")
    result = restart(vm, {"dump": "/var/crash/x/../y.elf"})
    assert result["dump"] == {
        "path": "/var/crash/x/../y.elf",
        "status": "failed",
        "error": "dump path refused: a '..' component",
    }
    assert vm.dumps == [] and vm.status == "running"


@pytest.mark.parametrize(
    "params",
    [
        {"backoff": {"initial": "2m", "max": "1m"}},
        {"backoff": {"initial": 0}},
        {"backoff": {"factor": 3}},
        {"backoff": True},
        {"dump": "crash.elf"},
        {"dump": "{{ vm }}.elf"},
        {"jobs_timeout": 0},
    ],
)
def test_backoff_and_dump_parameter_rules(params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RestartParams.model_validate(params)


def test_what_qemu_says_of_its_jobs_is_bounded_and_escaped() -> None:
    clocks = Clocks()
    vm = FakeQemu("guest-panicked")
    vm.jobs = [[{"id": "x" * 500, "type": "backup\n\x1b[2J", "status": {"deep": [1]}}]]
    not_due: list[ActionNotDue] = []
    with pytest.raises(TransientActionError) as caught:
        guard = clocks.guard()
        restart_when_due(vm, {"jobs_timeout": "20ms"}, clocks=clocks, guard=guard, not_due=not_due)
    shown = f"'backup\\n\\x1b[2J' job '{'x' * 64}' \"{{'deep': [1]}}\""
    for message in [str(caught.value), *map(str, not_due)]:
        assert "\n" not in message and "\x1b" not in message and len(message) < 300
        assert shown in message


def test_a_wait_longer_than_a_moment_is_handed_back_to_the_dispatcher() -> None:
    now = [1000.0]
    guard = RestartGuard(clock=lambda: now[0])
    vm = FakeQemu("guest-panicked")
    params = {"backoff": {"initial": "20s", "max": "20s", "reset_after": "1h"}}
    restart(vm, params, guard=guard, ctx=make_ctx(vm, "inv-1"))
    vm.status = "guest-panicked"
    vm.calls.clear()
    with pytest.raises(ActionNotDue, match=r"waits 20\.0s: restart 2 in a row") as caught:
        restart(vm, params, guard=guard, ctx=make_ctx(vm, "inv-2"))
    assert caught.value.retry_after == 20
    now[0] += 15  # the dispatcher ran it again early: it waits what is left
    with pytest.raises(ActionNotDue) as caught:
        restart(vm, params, guard=guard, ctx=make_ctx(vm, "inv-2"))
    assert caught.value.retry_after == 5
    assert "system_reset" not in vm.calls and vm.status == "guest-panicked"
    now[0] += 5
    result = restart(vm, params, guard=guard, ctx=make_ctx(vm, "inv-2"))
    assert (result["streak"], result["waited"], vm.status) == (2, 20, "running")
    assert guard.decide("web1", "inv-3", 10, 600).restarts == 3  # inv-2 counted once


def test_the_configurations_backoff_applies_unless_the_rule_sets_one() -> None:
    site = {"initial": 30.0, "max": 60.0, "reset_after": 600.0}
    for params, wait in [({}, 30), ({"backoff": {"initial": "20s"}}, 20), ({"backoff": False}, 0)]:
        guard, vm = RestartGuard(), FakeQemu("guest-panicked")
        restart(vm, params, guard=guard, ctx=make_ctx(vm, "inv-1", restart_backoff=site))
        vm.status = "guest-panicked"
        second = make_ctx(vm, "inv-2", restart_backoff=site)
        if wait:
            with pytest.raises(ActionNotDue) as caught:
                restart(vm, params, guard=guard, ctx=second)
            assert round(caught.value.retry_after) == wait
        else:
            assert "streak" not in restart(vm, params, guard=guard, ctx=second)


def test_a_vm_started_by_someone_else_during_the_backoff_is_not_reset_again() -> None:
    now = [1000.0]
    guard = RestartGuard(clock=lambda: now[0])
    vm = FakeQemu("guest-panicked")
    params = {"backoff": {"initial": "1m", "max": "1m"}}
    restart(vm, params, guard=guard, ctx=make_ctx(vm, "inv-1"))
    vm.status = "guest-panicked"
    vm.calls.clear()
    with pytest.raises(ActionNotDue):
        restart(vm, params, guard=guard, ctx=make_ctx(vm, "inv-2"))
    vm.status = "running"  # an operator's system_reset and cont
    now[0] += 60
    result = restart(vm, params, guard=guard, ctx=make_ctx(vm, "inv-2"))
    assert result["skipped"] == "running again" and result["streak"] == 2
    assert vm.steps == ["query-status", "query-status"]


def test_a_short_wait_is_slept_in_the_attempt_and_a_vm_started_meanwhile_is_left() -> None:
    guard = RestartGuard()
    vm = FakeQemu("guest-panicked")
    params = {"backoff": {"initial": "500ms", "max": "500ms"}}
    restart(vm, params, guard=guard, ctx=make_ctx(vm, "inv-1"))
    vm.status = "guest-panicked"
    vm.calls.clear()

    async def second() -> Any:
        kind = make_restart_vm(guard, poll_interval=0.005)
        running = asyncio.create_task(kind.run(RestartParams(**params), make_ctx(vm, "inv-2")))
        await asyncio.sleep(0.2)
        vm.status = "running"
        return await running

    result = asyncio.run(second())
    assert result["skipped"] == "running again" and result["streak"] == 2
    assert vm.steps == ["query-status", "query-status"]
