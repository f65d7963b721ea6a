"""``replay --execute``: the replay's firings, run for real by the dispatcher.

The firings are computed on the virtual clock exactly as in a dry run (and
printed the same way); then each action runs through the same reactor as
``run``'s (the generation's action types, settings, limits and renderer), with
retries, in memory (no journal). There are no QMP connections in a replay, so
actions that act on a VM (``restart_vm``, ``qmp``) fail and say so.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from reactor.clock import AsyncioClock
from reactor.engine.replay import DryRunWriter, open_inputs, replay
from reactor.model import Firing
from reactor.plugins.hookspecs import ActionOutcome
from reactor.service.generation import Generation
from reactor.service.reactor import Reactor


def _nowhere(vm: str, event: str, data: dict[str, Any]) -> None:
    """Synthetic events go nowhere: the replay's firings are computed already."""


async def _run_all(firings: list[Firing], gen: Generation) -> list[ActionOutcome]:
    outcomes: list[ActionOutcome] = []

    def report(outcome: ActionOutcome) -> None:
        outcomes.append(outcome)
        error = f": {outcome.error}" if outcome.error else ""
        print(
            f"{outcome.action} {outcome.status} rule={outcome.rule} vm={outcome.vm} "
            f"event={outcome.event} attempt={outcome.attempt}{error}",
            file=sys.stderr,
        )
        gen.plugins.action_outcome(outcome)

    reactor = Reactor.for_generation(
        gen, clock=AsyncioClock(), state_dir=None, on_outcome=report, emit=_nowhere
    )
    await reactor.start()
    try:
        for firing in firings:
            reactor.dispatcher.submit(firing)
        await reactor.dispatcher.drain()
    finally:
        await reactor.stop(5.0)
    return outcomes


def execute_replay(args: argparse.Namespace, gen: Generation) -> int:
    """Replay, print the firings, run their actions; 1 if a line or an action failed."""
    result = replay(
        open_inputs(args.events),
        gen.rules,
        sink=DryRunWriter(sys.stdout),
        qemu_stage=not args.no_qemu_stage,
        qemu_version=getattr(args, "qemu", None),
        labels=gen.config.labels_of if getattr(args, "config", None) is not None else None,
    )
    sys.stdout.flush()
    for problem in result.problems:
        print(problem, file=sys.stderr)
    outcomes = asyncio.run(_run_all(result.firings, gen))
    dead = [o for o in outcomes if o.status == "dead"]
    return 1 if result.problems or dead else 0
