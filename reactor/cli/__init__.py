"""The ``qmp-reactor`` command line: one subcommand per module in ``reactor.cli``.

Layer 10, the top: may import every layer. Command modules import what they run
inside their ``func``, so building the parser (``--help``, ``--version``) stays cheap.

Each command module exposes ``register(subparsers)``, which adds its parser and
sets ``func(args) -> int``. A ``UserError`` prints as one line (or one line per
diagnostic) and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from reactor import __version__
from reactor.cli._args import Parser
from reactor.errors import UserError
from reactor.params.display import escape

COMMAND_MODULES = (
    "reactor.cli.check",
    "reactor.cli.replay",
    "reactor.cli.test",
    "reactor.cli.run",
    "reactor.cli.tail",
    "reactor.cli.demo",
    "reactor.cli.plugins",
    "reactor.cli.dlq",
    "reactor.cli.silence",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = Parser(
        prog="qmp-reactor",
        description="React to QEMU's QMP events with YAML rules.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue  # a command not built into this version
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        status: int = args.func(args)
    except UserError as err:
        for diag in err.diagnostics:
            print(escape(str(diag)), file=sys.stderr)
        if not err.diagnostics:
            print(escape(f"qmp-reactor: error: {err}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
