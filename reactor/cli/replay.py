"""``qmp-reactor replay EVENTS...``: recorded events through the rules, deterministically."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reactor.cli._args import Positionals
from reactor.cli._common import (
    add_plugin_args,
    add_rules_arg,
    loading,
    print_diagnostics,
    qemu_version_arg,
)
from reactor.params.display import escape

if TYPE_CHECKING:
    from collections.abc import Callable

    from reactor.dispatch.silences import Silence, SilenceFilter
    from reactor.model import Envelope, Firing, Rule


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
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="configuration file: its VMs' labels and action settings apply, its rules "
        "unless --rules is given",
    )
    add_rules_arg(p, default="the configuration's, else ./rules, else the bundled pack")
    p.add_argument("--explain", action="store_true", help="say on stderr why rules fired or not")
    p.add_argument("--execute", action="store_true", help="run the actions for real")
    p.add_argument(
        "--no-qemu-stage",
        action="store_true",
        help="do not apply QEMU's rate limits before matching",
    )
    p.add_argument(
        "--qemu",
        metavar="VERSION",
        type=qemu_version_arg,
        help="apply the rate limits of this QEMU release to every VM "
        "(default: each VM's REACTOR_CONNECTED in the input, else the newest release)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="apply the silences of this state directory, at each firing's recorded time",
    )
    add_plugin_args(p)
    p.set_defaults(func=run)


def _explainer(env: Envelope, rule: Rule | None, message: str) -> None:
    who = f"rule {rule.name}" if rule is not None else "event"
    line = f"seq {env.get('seq')} {env['event']} vm={env['vm']}: {who}: {message}"
    print(escape(line), file=sys.stderr)


def _explain_event(env: Envelope) -> None:
    line = f"seq {env.get('seq')} {env['event']} vm={env['vm']}: event reaches the rules"
    print(escape(line), file=sys.stderr)


def _silenced(state_dir: Path, explain: bool) -> SilenceFilter:
    """The state directory's silences, judged at each firing's (virtual) time."""
    from reactor.dispatch.silences import SilenceFilter, SilenceStore, silence_path

    def said(firing: Firing, silence: Silence) -> None:
        if explain:
            _explainer(firing.envelope, firing.rule, f"silenced by silence {silence.id}")

    stored = SilenceStore(silence_path(state_dir)).all()
    return SilenceFilter(stored, now=lambda firing: firing.time, on_silenced=said)


@contextmanager
def _young_garbage_collected_rarely() -> Iterator[None]:
    """The cyclic collector every 20,000 new objects instead of 700, for the dry run.

    A replay's per-event objects form no reference cycles (their memory is freed
    as each event is done), so a collection only rescans the live windows: 5-10%
    of the events' CPU, spent for nothing. Lines that do leave cycles (bad ones,
    through their exceptions) are still collected, less often.
    """
    young, *older = gc.get_threshold()
    gc.set_threshold(max(young, 20_000), *older)
    try:
        yield
    finally:
        gc.set_threshold(young, *older)


def run(args: argparse.Namespace) -> int:
    """Replay; exit 1 if a line was malformed or rules are invalid."""
    with loading():
        from reactor.engine.replay import DryRunWriter, open_inputs, replay
        from reactor.service.generation import Options, load_generation

        gen = load_generation(
            Options(
                config=args.config,
                rules=args.rules,
                plugin_dirs=args.plugin_dir,
                block_plugins=args.block_plugin,
            )
        )
    print_diagnostics(gen.diagnostics)
    if args.execute:
        from reactor.service.execute import execute_replay

        return execute_replay(args, gen)

    sink: Callable[[Firing], None] = DryRunWriter(sys.stdout)
    if args.state_dir is not None:
        sink = _silenced(args.state_dir, args.explain).wrap(sink)
    with _young_garbage_collected_rarely():
        result = replay(
            open_inputs(args.events),
            gen.rules,
            sink=sink,
            qemu_stage=not args.no_qemu_stage,
            qemu_version=args.qemu,
            explain=_explainer if args.explain else None,
            observe=_explain_event if args.explain else None,
            collect=False,
            labels=gen.config.labels_of if args.config is not None else None,
        )
    sys.stdout.flush()
    for problem in result.problems:
        print(problem, file=sys.stderr)
    return 1 if result.problems else 0
