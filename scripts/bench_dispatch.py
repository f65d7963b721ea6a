"""Throughput of journal + dispatcher with a no-op action: invocations per second.

Usage: python scripts/bench_dispatch.py [N] [--memory] [--parallel] [--gc]

``--gc`` freezes the start-up objects and raises the collector's thresholds
(``gc.freeze(); gc.set_threshold(50_000, 20, 20)``), as a daemon may: the
cyclic collector otherwise costs about a third of the CPU time here.
Submits N firings of one single-action rule (spread over 50 VMs) as fast as the
event loop allows, then waits until every invocation is done and marked so.
Wall-clock rates depend on what else the machine runs; the CPU time per
invocation (all threads of this process) does much less.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from reactor.dispatch.dispatcher import Dispatcher
from reactor.dispatch.journal import Invocation, Journal
from reactor.errors import Location
from reactor.model import ActionSpec, Firing, Rule
from reactor.plugins.api import ActionContext, ActionSettings, ActionType


class NoParams(BaseModel):
    pass


async def noop(params: Any, ctx: ActionContext) -> None:
    return None


def render(inv: Invocation, atype: ActionType) -> BaseModel:
    return atype.params.model_validate(inv.spec.params)


async def main(n: int, memory: bool, mode: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        journal = None if memory else Journal(Path(tmp) / "journal.sqlite3")
        types = {"noop": ActionType("noop", NoParams, noop)}
        dispatcher = Dispatcher(
            action_types=types, settings=ActionSettings(), render=render, journal=journal
        )
        spec = ActionSpec("noop", {}, Location("bench.yaml"))
        rule = Rule("bench", ("GUEST_PANICKED",), (spec,), Location("bench.yaml"), mode=mode)  # type: ignore[arg-type]
        await dispatcher.start()
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            env = {
                "event": "GUEST_PANICKED",
                "data": {"action": "pause"},
                "vm": f"vm{i % 50}",
                "seq": i,
                "timestamp": {"seconds": 0, "microseconds": 0},
            }
            dispatcher.submit(Firing(rule, env, 0.0))
            if i % 1000 == 999:
                await asyncio.sleep(0)  # let the writer and the actions in, as an engine would
        t1 = time.perf_counter()
        await dispatcher.drain()
        t2, c2 = time.perf_counter(), time.process_time()
        await dispatcher.shutdown(1.0)
        if journal is not None:
            journal.close()
        cpu = (c2 - c0) / n
        print(
            f"{n} invocations ({'memory' if memory else 'journal'}, {mode}): submit "
            f"{n / (t1 - t0):,.0f}/s, end to end {n / (t2 - t0):,.0f}/s; "
            f"CPU {cpu * 1e6:.1f} us per invocation (= {1 / cpu:,.0f}/s on a free core)"
        )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--gc" in sys.argv:
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
    asyncio.run(
        main(
            int(args[0]) if args else 100_000,
            "--memory" in sys.argv,
            "parallel" if "--parallel" in sys.argv else "queued",
        )
    )
