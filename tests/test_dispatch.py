"""The dispatcher with a real SQLite journal: retries, timeouts, modes, limits, resume."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from reactor.dispatch.dispatcher import ActionOutcome, Dispatcher
from reactor.dispatch.journal import Invocation, Journal
from reactor.errors import ActionNotDue, Location, PermanentActionError, TransientActionError
from reactor.model import ActionSpec, Firing, RetryPolicy, Rule, RuleMode
from reactor.plugins.api import ActionContext, ActionSettings, ActionType

FAST = RetryPolicy(attempts=5, initial=1.0, max=30.0, multiplier=2.0, jitter=0.0)


class Params(BaseModel):
    fail: int = 0
    seconds: float = 0.0
    retry_after: float | None = None
    tag: str = ""


@dataclass
class Lab:
    """Test action types that record what they were asked to do."""

    calls: list[ActionContext] = field(default_factory=list)
    log: list[tuple[str, str]] = field(default_factory=list)
    running: int = 0
    max_running: int = 0
    by_rule: Counter[str] = field(default_factory=Counter)
    max_by_rule: Counter[str] = field(default_factory=Counter)
    journal_path: Path | None = None
    seen_rows: list[tuple[str, int] | None] = field(default_factory=list)

    def types(self) -> dict[str, ActionType]:
        return {
            name: ActionType(name, Params, fn)
            for name, fn in (
                ("flaky", self.flaky),
                ("perm", self.perm),
                ("boom", self.boom),
                ("sleepy", self.sleepy),
                ("sleepy2", self.sleepy),
                ("peek", self.peek),
                ("emitter", self.emitter),
                ("later", self.later),
            )
        }

    async def flaky(self, p: Params, ctx: ActionContext) -> None:
        self.calls.append(ctx)
        if ctx.attempt <= p.fail:
            raise TransientActionError(f"503 from s3cret-host ({p.tag})", retry_after=p.retry_after)

    async def perm(self, p: Params, ctx: ActionContext) -> None:
        self.calls.append(ctx)
        raise PermanentActionError("404 not found")

    async def boom(self, p: Params, ctx: ActionContext) -> None:
        self.calls.append(ctx)
        raise RuntimeError("a plugin bug")

    async def sleepy(self, p: Params, ctx: ActionContext) -> None:
        self.calls.append(ctx)
        self.log.append(("start", p.tag))
        self.running += 1
        self.by_rule[ctx.rule] += 1
        self.max_running = max(self.max_running, self.running)
        self.max_by_rule[ctx.rule] = max(self.max_by_rule[ctx.rule], self.by_rule[ctx.rule])
        try:
            await asyncio.sleep(p.seconds)
        finally:
            self.running -= 1
            self.by_rule[ctx.rule] -= 1
            self.log.append(("end", p.tag))

    async def later(self, p: Params, ctx: ActionContext) -> None:
        """Not due the first ``fail`` times it runs (for ``retry_after`` each)."""
        self.calls.append(ctx)
        self.log.append(("later", str(ctx.attempt)))
        if sum(c.invocation_id == ctx.invocation_id for c in self.calls) <= p.fail:
            raise ActionNotDue("waits for its backoff", retry_after=p.retry_after or 0.0)

    async def emitter(self, p: Params, ctx: ActionContext) -> None:
        self.calls.append(ctx)
        assert ctx.emit is not None
        ctx.emit("REACTOR_RESTART_SUPPRESSED", {"rule": ctx.rule, "vm": ctx.vm})

    async def peek(self, p: Params, ctx: ActionContext) -> None:
        # A second connection, as another process would see the file.
        assert self.journal_path is not None
        with sqlite3.connect(self.journal_path) as db:
            row = db.execute(
                "SELECT status, attempts FROM invocations WHERE id = ?", (ctx.invocation_id,)
            ).fetchone()
        db.close()
        self.seen_rows.append(row)


def rule(
    name: str = "r",
    *actions: tuple[str, dict[str, Any]],
    mode: RuleMode = "queued",
    retry: RetryPolicy | None = FAST,
    timeout: float | None = None,
) -> Rule:
    loc = Location("rules.yaml", 1, 1)
    specs = tuple(
        ActionSpec(t, params, loc, index=i, retry=retry, timeout=timeout)
        for i, (t, params) in enumerate(actions or [("flaky", {})])
    )
    return Rule(name, ("GUEST_PANICKED",), specs, loc, mode=mode)


def firing(r: Rule, vm: str = "vm1", seq: int = 1) -> Firing:
    env = {"event": "GUEST_PANICKED", "data": {"action": "pause"}, "vm": vm, "seq": seq}
    return Firing(r, env, 0.0, {"count": 1})


def render(inv: Invocation, atype: ActionType) -> BaseModel:
    return atype.params.model_validate(inv.spec.params)


@dataclass
class Rig:
    lab: Lab
    dispatcher: Dispatcher
    journal: Journal | None
    outcomes: list[ActionOutcome]
    delays: list[float]
    emitted: list[tuple[str, str, dict[str, Any]]]


def run(
    tmp_path: Path | None,
    body: Callable[[Rig], Coroutine[Any, Any, None]],
    lab: Lab | None = None,
    **kw: Any,
) -> Rig:
    """Run ``body`` with a started dispatcher, then drain, shut down and close."""
    lab = lab or Lab()
    outcomes: list[ActionOutcome] = []
    delays: list[float] = []
    emitted: list[tuple[str, str, dict[str, Any]]] = []

    async def no_sleep(seconds: float) -> None:
        delays.append(seconds)

    async def main() -> Rig:
        journal = Journal(tmp_path / "journal.sqlite3") if tmp_path else None
        lab.journal_path = journal.path if journal else None
        kw.setdefault("render", render)
        d = Dispatcher(
            action_types=lab.types(), settings=ActionSettings(), journal=journal,
            on_outcome=outcomes.append, sleep=no_sleep, redact=lambda s: s.replace("s3cret", "***"),
            emit=lambda vm, name, data, source: emitted.append((vm, name, data)), **kw,
        )  # fmt: skip
        rig = Rig(lab, d, journal, outcomes, delays, emitted)
        await d.start()
        try:
            await body(rig)
            async with asyncio.timeout(10):
                await d.drain()
        finally:
            await d.shutdown(0.0)
            if journal:
                journal.close()
        return rig

    return asyncio.run(main())


def row(tmp_path: Path, inv_id: str) -> Invocation | None:
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        return journal.get(inv_id)
    finally:
        journal.close()


def submit_all(*firings: Firing) -> Callable[[Rig], Coroutine[Any, Any, None]]:
    async def body(rig: Rig) -> None:
        for f in firings:
            rig.dispatcher.submit(f)

    return body


def test_transient_errors_are_retried_with_exponential_waits(tmp_path: Path) -> None:
    ids: list[str] = []

    async def body(rig: Rig) -> None:
        ids.extend(i.id for i in rig.dispatcher.submit(firing(rule("r", ("flaky", {"fail": 2})))))

    rig = run(tmp_path, body)
    assert [c.attempt for c in rig.lab.calls] == [1, 2, 3]
    assert {c.idempotency_key for c in rig.lab.calls} == {ids[0]}
    assert rig.delays == [1.0, 2.0]
    assert [o.status for o in rig.outcomes] == ["retry", "retry", "ok"]
    assert rig.outcomes[0].error == "503 from ***-host ()"
    stored = row(tmp_path, ids[0])
    assert stored is not None and (stored.status, stored.attempts) == ("done", 3)


def test_out_of_retries_goes_to_the_dead_letters_redacted(tmp_path: Path) -> None:
    retry = RetryPolicy(attempts=3, initial=0.5, max=0.75, multiplier=3.0, jitter=0.0)
    r = rule("r", ("flaky", {"fail": 99}), retry=retry)
    rig = run(tmp_path, submit_all(firing(r, vm="web")))
    assert len(rig.lab.calls) == 3
    assert rig.delays == [0.5, 0.75]  # capped by max
    assert [o.status for o in rig.outcomes] == ["retry", "retry", "failed", "dead"]
    assert rig.dispatcher.dead_letters == 1
    assert rig.emitted == [
        (
            "web",
            "REACTOR_ACTION_FAILED",
            {"rule": "r", "action": "flaky", "error": "503 from ***-host ()", "attempts": 3},
        )
    ]
    journal = Journal(tmp_path / "journal.sqlite3")
    [dead] = journal.dead_letters()
    assert (dead.status, dead.attempts, dead.last_error) == ("dead", 3, "503 from ***-host ()")
    assert journal.pending() == []
    journal.close()


def test_jitter_adds_at_most_its_amount(tmp_path: Path) -> None:
    retry = RetryPolicy(attempts=4, initial=1.0, max=30.0, multiplier=2.0, jitter=0.5)
    rig = run(tmp_path, submit_all(firing(rule("r", ("flaky", {"fail": 3}), retry=retry))))
    for base, delay in zip([1.0, 2.0, 4.0], rig.delays, strict=True):
        assert base <= delay <= base + 0.5


def test_retry_after_wins_when_longer(tmp_path: Path) -> None:
    longer = rule("a", ("flaky", {"fail": 1, "retry_after": 7.0}))
    shorter = rule("b", ("flaky", {"fail": 1, "retry_after": 0.25}))
    assert run(tmp_path, submit_all(firing(longer))).delays == [7.0]
    assert run(tmp_path, submit_all(firing(shorter))).delays == [1.0]


def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    rig = run(tmp_path, submit_all(firing(rule("r", ("perm", {})))))
    assert len(rig.lab.calls) == 1
    assert [(o.status, o.error) for o in rig.outcomes] == [
        ("failed", "404 not found"),
        ("dead", "404 not found"),
    ]
    assert rig.delays == []


def test_a_plugin_bug_is_logged_with_traceback_and_dead_lettered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="reactor.dispatch.attempts"):
        rig = run(tmp_path, submit_all(firing(rule("r", ("boom", {})))))
    assert len(rig.lab.calls) == 1
    assert rig.outcomes[-1].status == "dead"
    assert rig.outcomes[-1].error == "RuntimeError: a plugin bug"
    [record] = [r for r in caplog.records if r.exc_info]
    assert "a plugin bug" in str(record.exc_info[1])  # type: ignore[index]


def test_a_timed_out_attempt_is_retried(tmp_path: Path) -> None:
    retry = RetryPolicy(attempts=2, initial=0.0, max=0.0, multiplier=1.0, jitter=0.0)
    r = rule("r", ("sleepy", {"seconds": 30}), retry=retry, timeout=0.05)
    rig = run(tmp_path, submit_all(firing(r)))
    assert [c.attempt for c in rig.lab.calls] == [1, 2]
    assert [o.status for o in rig.outcomes] == ["retry", "failed", "dead"]
    assert rig.outcomes[-1].error == "timed out after 0.05 s"


def test_render_errors_and_async_render(tmp_path: Path) -> None:
    async def bad_render(inv: Invocation, atype: ActionType) -> BaseModel:
        raise PermanentActionError("unknown secret 'token'")

    rig = run(tmp_path, submit_all(firing(rule())), render=bad_render)
    assert rig.lab.calls == []
    assert [(o.status, o.error) for o in rig.outcomes] == [
        ("failed", "unknown secret 'token'"),
        ("dead", "unknown secret 'token'"),
    ]

    async def good_render(inv: Invocation, atype: ActionType) -> BaseModel:
        return Params(tag="rendered")

    rig = run(tmp_path, submit_all(firing(rule("r", ("sleepy", {})))), render=good_render)
    assert rig.lab.log == [("start", "rendered"), ("end", "rendered")]


def test_unknown_action_type_is_dead_lettered(tmp_path: Path) -> None:
    rig = run(tmp_path, submit_all(firing(rule("r", ("nosuch", {})))))
    assert [(o.status, o.error) for o in rig.outcomes][-1] == (
        "dead",
        "unknown action type 'nosuch'",
    )


def test_without_journal_a_final_failure_is_failed(tmp_path: Path) -> None:
    rig = run(None, submit_all(firing(rule("r", ("perm", {})))))
    assert [o.status for o in rig.outcomes] == ["failed"]
    assert rig.dispatcher.dead_letters == 0


def sleepers(mode: RuleMode, *tags: str, seconds: float = 0.02, vm: str = "vm1") -> list[Firing]:
    return [
        firing(rule("s", ("sleepy", {"seconds": seconds, "tag": t}), mode=mode), vm, n)
        for n, t in enumerate(tags)
    ]


def test_queued_runs_one_after_another_in_order(tmp_path: Path) -> None:
    rig = run(tmp_path, submit_all(*sleepers("queued", "1", "2", "3")))
    assert rig.lab.log == [(e, t) for t in "123" for e in ("start", "end")]


def test_queued_lanes_of_different_vms_run_side_by_side(tmp_path: Path) -> None:
    fs = sleepers("queued", "a1", "a2", vm="a") + sleepers("queued", "b1", "b2", vm="b")
    rig = run(tmp_path, submit_all(*fs))
    assert rig.lab.max_running == 2
    assert [t for e, t in rig.lab.log if e == "start" and t[0] == "a"] == ["a1", "a2"]


def test_single_ignores_a_firing_while_running(tmp_path: Path) -> None:
    ids: list[list[Invocation]] = []

    async def body(rig: Rig) -> None:
        first, second = sleepers("single", "1", "2")
        ids.append(rig.dispatcher.submit(first))
        ids.append(rig.dispatcher.submit(second))
        await rig.dispatcher.drain()
        ids.append(rig.dispatcher.submit(sleepers("single", "3")[0]))  # the first is over

    rig = run(tmp_path, body)
    assert [t for e, t in rig.lab.log if e == "start"] == ["1", "3"]
    assert [o.status for o in rig.outcomes] == ["suppressed", "ok", "ok"]
    stored = row(tmp_path, ids[1][0].id)
    assert stored is not None and stored.status == "skipped"


def test_restart_cancels_the_running_one(tmp_path: Path) -> None:
    ids: list[str] = []

    async def body(rig: Rig) -> None:
        old = sleepers("restart", "old", seconds=30)[0]
        ids.append(rig.dispatcher.submit(old)[0].id)
        while not rig.lab.log:
            await asyncio.sleep(0.001)
        ids.append(rig.dispatcher.submit(sleepers("restart", "new", seconds=0.01)[0])[0].id)

    rig = run(tmp_path, body)
    assert rig.lab.log == [("start", "old"), ("end", "old"), ("start", "new"), ("end", "new")]
    assert [(o.status, o.invocation_id) for o in rig.outcomes] == [
        ("cancelled", ids[0]),
        ("ok", ids[1]),
    ]
    stored = row(tmp_path, ids[0])
    assert stored is not None and (stored.status, stored.attempts) == ("cancelled", 1)
    assert len(rig.lab.calls) == 2  # the cancelled one was not retried


def test_parallel_runs_at_once(tmp_path: Path) -> None:
    rig = run(tmp_path, submit_all(*sleepers("parallel", "1", "2", "3", seconds=0.05)))
    assert rig.lab.max_running == 3


def test_a_firings_actions_run_in_order_and_a_dead_one_does_not_stop_the_next(
    tmp_path: Path,
) -> None:
    r = rule(
        "r",
        ("sleepy", {"tag": "first", "seconds": 0.01}),
        ("perm", {}),
        ("sleepy", {"tag": "third"}),
    )
    rig = run(tmp_path, submit_all(firing(r)))
    assert rig.lab.log == [
        ("start", "first"),
        ("end", "first"),
        ("start", "third"),
        ("end", "third"),
    ]
    assert [(o.action, o.status) for o in rig.outcomes] == [
        ("sleepy", "ok"),
        ("perm", "failed"),
        ("perm", "dead"),
        ("sleepy", "ok"),
    ]


def test_global_limit(tmp_path: Path) -> None:
    fs = sleepers("parallel", *"abcdefghij", seconds=0.02)
    rig = run(tmp_path, submit_all(*fs), max_concurrency=3)
    assert rig.lab.max_running == 3
    assert len(rig.lab.calls) == 10


def test_an_action_not_due_waits_without_a_slot_or_an_attempt(tmp_path: Path) -> None:
    once = RetryPolicy(attempts=1, initial=1.0, max=1.0, multiplier=2.0, jitter=0.0)
    waiting = rule("w", ("later", {"fail": 1, "retry_after": 4.0}), retry=once)
    other = rule("o", ("flaky", {}), mode="parallel")
    ids: list[str] = []

    async def body(rig: Rig) -> None:
        ids.extend(i.id for i in rig.dispatcher.submit(firing(waiting, vm="crashing")))
        while len(rig.lab.calls) < 1:
            await asyncio.sleep(0.01)
        rig.dispatcher.submit(firing(other, vm="web"))  # the one slot is free meanwhile
        async with asyncio.timeout(60):
            while not rig.outcomes:
                await asyncio.sleep(0.01)
        await rig.dispatcher.flush()
        # Waiting: pending in the journal, no attempt spent (kill -9 now resumes it whole).
        waits = row(tmp_path, ids[0])
        assert waits is not None and (waits.status, waits.attempts) == ("pending", 0)
        assert waits.last_error == "waits for its backoff"

    rig = run(tmp_path, body, max_concurrency=1)
    assert [(o.rule, o.status) for o in rig.outcomes] == [("o", "ok"), ("w", "ok")]
    assert [c.attempt for c in rig.lab.calls if c.rule == "w"] == [1, 1]
    assert rig.delays == []  # not the retry policy's (zeroed) waits: the action's, for real
    done = row(tmp_path, ids[0])
    assert done is not None and (done.status, done.attempts) == ("done", 1)


def test_per_type_limit_leaves_other_types_free(tmp_path: Path) -> None:
    lab = Lab()
    limited = sleepers("parallel", *"abcdef", seconds=0.03)
    other = rule("f", ("sleepy2", {"seconds": 0.03}), mode="parallel")
    free = [firing(other, seq=n) for n in range(4)]
    observed: list[int] = []

    async def body(rig: Rig) -> None:
        for f in limited + free:
            rig.dispatcher.submit(f)
        for _ in range(200):
            observed.append(rig.dispatcher.in_flight)
            await asyncio.sleep(0.001)

    run(tmp_path, body, lab=lab, per_type_limits={"sleepy": 2})
    assert len(lab.calls) == 10
    assert lab.max_by_rule == {"s": 2, "f": 4}
    assert max(observed) == 6


def test_the_row_is_committed_before_the_action_runs(tmp_path: Path) -> None:
    r = rule("r", ("peek", {}))
    rig = run(tmp_path, submit_all(*(firing(r, seq=n) for n in range(20))))
    assert len(rig.lab.seen_rows) == 20
    assert all(seen is not None for seen in rig.lab.seen_rows)


def test_submit_returns_before_anything_runs(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        invs = rig.dispatcher.submit(sleepers("queued", "x")[0])
        assert rig.lab.calls == [] and len(invs) == 1
        assert rig.dispatcher.backlog == 1

    rig = run(tmp_path, body)
    assert len(rig.lab.calls) == 1
    assert rig.dispatcher.backlog == 0


def test_resume_after_restart_keeps_ids_and_attempts(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    submitted: list[str] = []

    async def first_life() -> None:
        lab = Lab()
        journal = Journal(path)
        d = Dispatcher(action_types=lab.types(), settings=ActionSettings(), render=render,
                       journal=journal)  # fmt: skip
        await d.start()
        for f in sleepers("queued", "1", "2", "3", seconds=30):
            submitted.extend(i.id for i in d.submit(f))
        while not lab.calls:
            await asyncio.sleep(0.001)
        await d.shutdown(grace=0.01)  # "1" is cut off mid-attempt; "2" and "3" never started
        journal.close()

    asyncio.run(first_life())
    journal = Journal(path)
    assert [(i.id, i.status, i.attempts) for i in journal.pending()] == [
        (submitted[0], "running", 1),
        (submitted[1], "pending", 0),
        (submitted[2], "pending", 0),
    ]
    journal.close()

    def shorter(inv: Invocation, atype: ActionType) -> BaseModel:
        return Params(tag=inv.spec.params["tag"], seconds=0.0)

    rig = run(tmp_path, lambda rig: asyncio.sleep(0), render=shorter)
    assert [(c.invocation_id, c.idempotency_key, c.attempt) for c in rig.lab.calls] == [
        (submitted[0], submitted[0], 2),
        (submitted[1], submitted[1], 1),
        (submitted[2], submitted[2], 1),
    ]
    assert [c.envelope["seq"] for c in rig.lab.calls] == [0, 1, 2]
    assert rig.lab.calls[0].context == {"count": 1}


def test_shutdown_refuses_new_work(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await rig.dispatcher.shutdown(0.0)
        assert rig.dispatcher.submit(firing(rule())) == []

    rig = run(tmp_path, body)
    assert rig.dispatcher.rejected == 1
    assert rig.lab.calls == []


def test_observer_bugs_do_not_stop_actions(tmp_path: Path) -> None:
    def bad_observer(outcome: ActionOutcome) -> None:
        raise ValueError("observer bug")

    lab = Lab()

    async def main() -> None:
        d = Dispatcher(action_types=lab.types(), settings=ActionSettings(), render=render,
                       journal=None, on_outcome=bad_observer)  # fmt: skip
        await d.start()
        d.submit(firing(rule()))
        await d.drain()
        await d.shutdown(0)

    asyncio.run(main())
    assert len(lab.calls) == 1


def test_actions_get_their_vm_and_can_raise_events(tmp_path: Path) -> None:
    vms = {"web1": "the web1 connection"}
    rig = run(tmp_path, submit_all(firing(rule("r", ("emitter", {})), vm="web1")),
              vm_lookup=lambda vm, source: vms.get(vm))  # fmt: skip
    assert rig.emitted == [
        ("web1", "REACTOR_RESTART_SUPPRESSED", {"rule": "r", "vm": "the web1 connection"})
    ]
