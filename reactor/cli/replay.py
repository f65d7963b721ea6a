"""``qmp-reactor replay EVENTS...``: recorded events through the rules, deterministically."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from reactor.cli._args import Positionals
from reactor.cli._common import (
    add_plugin_args,
    add_rules_arg,
    default_settings,
    load_action_types,
    loading,
    print_diagnostics,
    rule_paths,
)

if TYPE_CHECKING:
    from reactor.model import Envelope, Rule


def register(sub: Any) -> None:
    """Add the ``replay`` subcommand."""
    p: argparse.ArgumentParser = sub.add_parser(
        "replay",
        usage="%(prog)s EVENTS... [--rules PATH...] [options]",
        help="replay recorded events through the rules",
        description="Replay QMP events (JSON lines) through the rules on a virtual clock. "
        "Dry run by default: one JSON line per action that would run.",
    )
    p.add_argument(
        "events",
        action=Positionals,
        lender="rules",
        metavar="EVENTS",
        help="one or more JSON-lines files, or - for stdin",
    )
    add_rules_arg(p)
    p.add_argument("--explain", action="store_true", help="say on stderr why rules fired or not")
    p.add_argument("--execute", action="store_true", help="run the actions for real")
    p.add_argument(
        "--no-qemu-stage",
        action="store_true",
        help="do not apply QEMU's rate limits before matching",
    )
    add_plugin_args(p)
    p.set_defaults(func=run)


def _explainer(env: Envelope, rule: Rule | None, message: str) -> None:
    who = f"rule {rule.name}" if rule is not None else "event"
    print(f"seq {env.get('seq')} {env['event']} vm={env['vm']}: {who}: {message}", file=sys.stderr)


def _explain_event(env: Envelope) -> None:
    print(
        f"seq {env.get('seq')} {env['event']} vm={env['vm']}: event reaches the rules",
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    """Replay; exit 1 if a line was malformed or rules are invalid."""
    with loading():
        from reactor.engine.replay import DryRunWriter, open_inputs, replay
        from reactor.errors import RuleError
        from reactor.rules.compiler import load_rules

        action_types, plugins = load_action_types(args)
        settings = default_settings()
        ruleset, diags = load_rules(
            rule_paths(args.rules), action_types=action_types, settings=settings
        )
    if any(d.severity == "error" for d in diags):
        raise RuleError("invalid rules", diags)
    print_diagnostics(diags)
    if args.execute:
        from reactor.service.execute import execute_replay

        return execute_replay(args, ruleset, plugins, settings)

    result = replay(
        open_inputs(args.events),
        ruleset,
        sink=DryRunWriter(sys.stdout),
        qemu_stage=not args.no_qemu_stage,
        explain=_explainer if args.explain else None,
        observe=_explain_event if args.explain else None,
        collect=False,
    )
    sys.stdout.flush()
    for problem in result.problems:
        print(problem, file=sys.stderr)
    return 1 if result.problems else 0
