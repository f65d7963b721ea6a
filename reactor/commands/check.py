"""``qmp-reactor check PATH...``: validate rule files without running anything."""

from __future__ import annotations

import argparse
from typing import Any

from reactor.commands._common import (
    add_plugin_args,
    default_settings,
    load_action_types,
    print_diagnostics,
    rule_paths,
)
from reactor.rules import load_rules


def register(sub: Any) -> None:
    """Add the ``check`` subcommand."""
    p: argparse.ArgumentParser = sub.add_parser(
        "check", help="validate rule files", description="Validate rule files and directories."
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="rule files or directories")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors")
    add_plugin_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the rules; 0 when all is well, 1 on any error."""
    action_types, _ = load_action_types(args)
    paths = rule_paths(args.paths)
    ruleset, diags = load_rules(paths, action_types=action_types, settings=default_settings())
    errors = print_diagnostics(diags, strict=args.strict)
    if errors:
        return 1
    files = {r.location.file for r in ruleset.rules}
    print(f"ok: {len(ruleset)} rules in {len(files)} files")
    return 0
