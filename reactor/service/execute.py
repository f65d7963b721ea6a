"""``replay --execute``: the replay's firings, run for real by the dispatcher.

The firings are computed on the virtual clock exactly as in a dry run (and
printed the same way); then each action runs through the dispatcher, with
retries, in memory (no journal). There are no QMP connections in a replay, so
actions that act on a VM (``restart_vm``, ``qmp``) fail and say so.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from reactor.dispatch.dispatcher import Dispatcher
from reactor.engine.replay import DryRunWriter, open_inputs, replay
from reactor.model import Firing
from reactor.plugins.api import ActionSettings
from reactor.plugins.hookspecs import ActionOutcome
from reactor.rules.ruleset import RuleSet
from reactor.service.config import Config
from reactor.service.reactor import Renderer


async def _run_all(
    firings: list[Firing], plugins: Any, settings: ActionSettings
) -> list[ActionOutcome]:
    outcomes: list[ActionOutcome] = []

    def report(outcome: ActionOutcome) -> None:
        outcomes.append(outcome)
        error = f": {outcome.error}" if outcome.error else ""
        print(
            f"{outcome.action} {outcome.status} rule={outcome.rule} vm={outcome.vm} "
            f"event={outcome.event} attempt={outcome.attempt}{error}",
            file=sys.stderr,
        )
        plugins.action_outcome(outcome)

    acts = Config().actions
    render = Renderer()
    dispatcher = Dispatcher(
        action_types=plugins.action_types(),
        settings=settings,
        render=render,
        journal=None,
        on_outcome=report,
        redact=render.resolver.redactor.redact,
        default_retry=acts.retry.policy(),
        default_timeout=acts.timeout,
        max_concurrency=acts.max_concurrency,
    )
    await dispatcher.start()
    try:
        for firing in firings:
            dispatcher.submit(firing)
        await dispatcher.drain()
    finally:
        await dispatcher.shutdown(5.0)
    return outcomes


def execute_replay(
    args: argparse.Namespace, rules: RuleSet, plugins: Any, settings: ActionSettings
) -> int:
    """Replay, print the firings, run their actions; 1 if a line or an action failed."""
    result = replay(
        open_inputs(args.events),
        rules,
        sink=DryRunWriter(sys.stdout),
        qemu_stage=not args.no_qemu_stage,
        qemu_version=getattr(args, "qemu", None),
    )
    sys.stdout.flush()
    for problem in result.problems:
        print(problem, file=sys.stderr)
    outcomes = asyncio.run(_run_all(result.firings, plugins, settings))
    dead = [o for o in outcomes if o.status == "dead"]
    return 1 if result.problems or dead else 0
