"""Waiting work costs memory by its count: big envelopes wait in the journal, not in memory.

A real SQLite journal and the real dispatcher. Invocations of events of 930 KB
(a guest can make QEMU send those) are written, then resumed by a new
dispatcher, as after a restart, or kept retrying against an action that fails:
their envelopes are read back one attempt at a time, every action still sees
its whole envelope, and a dead letter keeps it whole.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from reactor.dispatch.dispatcher import Dispatcher
from reactor.dispatch.invocation import ActionSpecData, new_id
from reactor.dispatch.journal import Invocation, Journal
from reactor.errors import Location, TransientActionError
from reactor.model import ActionSpec, Firing, RetryPolicy, Rule
from reactor.plugins.api import ActionContext, ActionSettings, ActionType

BIG = 930 * 1024
COUNT = 60  # 56 MB of envelopes
NO_WAIT = RetryPolicy(attempts=3, initial=0.0, max=0.0, multiplier=1.0, jitter=0.0)


class Params(BaseModel):
    fail: int = 0


class Seen:
    """An action that notes each envelope's size and marker, failing its first ``fail`` tries."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    async def run(self, params: Params, ctx: ActionContext) -> None:
        self.seen.append((ctx.envelope["seq"], len(ctx.envelope["data"]["blob"])))
        if ctx.attempt <= params.fail:
            raise TransientActionError("receiver down")

    def types(self) -> dict[str, ActionType]:
        return {"seen": ActionType("seen", Params, self.run)}


def big_firing(rule: Rule, seq: int) -> Firing:
    blob = chr(ord("a") + seq % 26) * BIG  # each its own string: nothing shared
    env = {"event": "BLOCK_IO_ERROR", "data": {"blob": blob}, "vm": "vm1", "seq": seq}
    return Firing(rule, env, 0.0, {})


def a_rule(fail: int, mode: str = "parallel") -> Rule:
    loc = Location("rules.yaml", 1, 1)
    spec = ActionSpec("seen", {"fail": fail}, loc, index=0, retry=NO_WAIT)
    return Rule("big", ("BLOCK_IO_ERROR",), (spec,), loc, mode=mode)  # type: ignore[arg-type]


def dispatcher(journal: Journal, lab: Seen, **extra: Any) -> Dispatcher:
    return Dispatcher(action_types=lab.types(), settings=ActionSettings(), render=render,
                      journal=journal, max_concurrency=2, **extra)  # fmt: skip


def render(inv: Any, kind: ActionType) -> BaseModel:
    return kind.params.model_validate(dict(inv.spec.params))


def write_pending(path: Path, fail: int) -> None:
    """COUNT big invocations in the journal, none run (a sidecar that stopped at once)."""

    spec = ActionSpecData("seen", {"fail": fail}, NO_WAIT, 30.0)
    journal = Journal(path)
    try:
        for seq in range(1, COUNT + 1):
            env = big_firing(a_rule(fail), seq).envelope
            journal.add_many([Invocation(new_id(), new_id(), "big", 0, spec, "parallel", "vm1",
                                         "BLOCK_IO_ERROR", seq, env, {}, time.time())])  # fmt: skip
    finally:
        journal.close()


def test_a_restart_reads_big_envelopes_back_one_attempt_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    write_pending(path, fail=1)
    lab = Seen()

    async def main() -> None:
        journal = Journal(path)
        d = dispatcher(journal, lab)
        await d.start()
        await d.drain()
        await d.shutdown(0)
        journal.close()

    tracemalloc.start()
    try:
        asyncio.run(main())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sorted(lab.seen) == sorted([(seq, BIG) for seq in range(1, COUNT + 1)] * 2)
    assert peak < 16 * BIG, f"peak {peak / 2**20:.0f} MiB for {COUNT * BIG / 2**20:.0f} MiB"


def test_a_dead_letter_keeps_its_whole_envelope(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    write_pending(path, fail=9)  # never succeeds: dead after its 3 attempts

    async def main() -> None:
        journal = Journal(path)
        d = dispatcher(journal, Seen())
        await d.start()
        await d.drain()
        await d.shutdown(0)
        journal.close()

    asyncio.run(main())
    journal = Journal(path)
    try:
        dead = journal.dead_letters()
    finally:
        journal.close()
    assert len(dead) == COUNT
    assert all(len(inv.envelope["data"]["blob"]) == BIG and not inv.parked for inv in dead)
    assert sorted(inv.envelope["seq"] for inv in dead) == list(range(1, COUNT + 1))


def test_live_retries_wait_without_their_big_envelopes(tmp_path: Path) -> None:
    lab = Seen()
    waiting = asyncio.Event

    async def main() -> int:
        journal = Journal(tmp_path / "journal.sqlite3")
        gate = waiting()
        slept = 0

        async def sleep(seconds: float) -> None:  # every retry waits here until released
            nonlocal slept
            slept += 1
            await gate.wait()

        d = dispatcher(journal, lab, sleep=sleep)
        await d.start()
        rule = a_rule(fail=1)
        for seq in range(1, COUNT + 1):
            d.submit(big_firing(rule, seq))
        async with asyncio.timeout(120):
            while slept < COUNT:  # every invocation failed once and waits for its retry
                await asyncio.sleep(0.01)
        current, _ = tracemalloc.get_traced_memory()
        gate.set()
        await d.drain()
        await d.shutdown(0)
        journal.close()
        return current

    tracemalloc.start()
    try:
        waiting_bytes = asyncio.run(main())
    finally:
        tracemalloc.stop()
    assert sorted(lab.seen) == sorted([(seq, BIG) for seq in range(1, COUNT + 1)] * 2)
    assert waiting_bytes < 8 * BIG, f"{waiting_bytes / 2**20:.0f} MiB held while waiting"
