"""Overload slows the readers down instead of refusing firings; a failing journal does not.

Real parts: a SQLite journal in tmp_path, the dispatcher, a fake QMP peer
flooding a real unix socket, the connection layers reading it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import BaseModel

from reactor.dispatch.dispatcher import Dispatcher
from reactor.dispatch.journal import Invocation, Journal
from reactor.errors import Location
from reactor.model import ActionSpec, Envelope, Firing, Rule
from reactor.plugins.api import ActionContext, ActionSettings, ActionType
from reactor.sources.manager import ConnectionManager
from reactor.sources.session import BURST
from tests import fakeqmp
from tests.fakeqmp import FakeQmp


class NoParams(BaseModel):
    pass


async def noop(params: NoParams, ctx: ActionContext) -> None:
    return None


def render(inv: Invocation, atype: ActionType) -> BaseModel:
    return atype.params.model_validate(inv.spec.params)


RULE = Rule(
    "r", ("RESET",), (ActionSpec("noop", {}, Location("r.yaml", 1, 1)),), Location("r.yaml")
)


def dispatcher(journal: Journal | None) -> Dispatcher:
    types = {"noop": ActionType("noop", NoParams, noop)}
    return Dispatcher(action_types=types, settings=ActionSettings(), render=render, journal=journal)


def firing(i: int) -> Firing:
    return Firing(RULE, {"event": "RESET", "data": {}, "vm": f"vm{i % 7}", "seq": i}, 0.0)


async def blocked(d: Dispatcher, seconds: float = 0.05) -> bool:
    """Whether ``backpressure()`` still holds readers back after ``seconds``."""
    gate = d.backpressure()
    if gate is None:
        return False
    try:
        await asyncio.wait_for(gate.wait(), seconds)
    except TimeoutError:
        return True
    return d.backpressure() is not None


def test_an_overloaded_journal_closes_the_gate_until_the_writer_catches_up(tmp_path: Path) -> None:
    async def main() -> tuple[bool, bool, bool, int]:
        journal = Journal(tmp_path / "journal.sqlite3")
        d = dispatcher(journal)
        d._outbox.high_water = 50
        d._outbox.low_water = 25
        open_before = not await blocked(d)
        for i in range(60):  # no await in between: the writer has not had a turn
            d.submit(firing(i))
        closed = d.backpressure() is not None
        await d.start()
        reopened = not await blocked(d, 10)  # the writer committed: open again
        await d.drain()
        await d.shutdown(1.0)
        journal.close()
        return open_before, closed, reopened, d.rejected

    open_before, closed, reopened, rejected = asyncio.run(main())
    assert (open_before, closed, reopened, rejected) == (True, True, True, 0)


def test_a_failing_journal_keeps_the_gate_open(tmp_path: Path) -> None:
    async def main() -> tuple[bool, bool]:
        journal = Journal(tmp_path / "journal.sqlite3", max_bytes=64 * 1024)
        d = dispatcher(journal)
        d._outbox.high_water = 50
        d._outbox.low_water = 25
        await d.start()
        for i in range(500):
            d.submit(firing(i))
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        healthy = d.healthy
        gate_open = not await blocked(d)
        await d.shutdown(0.1)  # the writer retries the failing disk until stop gives up
        journal.close()
        return healthy, gate_open

    healthy, gate_open = asyncio.run(main())
    assert not healthy  # the size cap made the writes fail
    assert gate_open  # readers go on; max_unwritten decides what is refused


def test_readers_wait_while_the_pace_says_so(tmp_path: Path) -> None:
    path = str(tmp_path / "flood.qmp")
    seen: list[Envelope] = []

    async def main() -> tuple[int, int, int]:
        gate = asyncio.Event()

        def pace() -> asyncio.Event | None:
            return None if gate.is_set() else gate

        async with FakeQmp(path, fakeqmp.flood(5_000)):
            manager = ConnectionManager(seen.append, pace=pace)
            manager.add(path)
            await asyncio.sleep(0.5)
            held = len(seen)
            await asyncio.sleep(0.2)
            still = len(seen)
            gate.set()
            async with asyncio.timeout(20):
                while len(seen) < 5_001:
                    await asyncio.sleep(0.01)
            await manager.aclose()
            return held, still, len(seen)

    held, still, total = asyncio.run(main())
    assert held == still  # nothing more was read while the pace held the reader
    # REACTOR_CONNECTED and what came while the session opened (never held): one burst at most
    assert held <= 1 + BURST
    assert total >= 5_001  # everything arrived once the gate opened
