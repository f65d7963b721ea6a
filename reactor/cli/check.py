"""``qmp-reactor check PATH...``: validate rule files without running anything."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from reactor.cli._common import (
    add_plugin_args,
    default_settings,
    load_action_types,
    loading,
    print_diagnostics,
    rule_paths,
)


def register(sub: Any) -> None:
    """Add the ``check`` subcommand."""
    p: argparse.ArgumentParser = sub.add_parser(
        "check", help="validate rule files", description="Validate rule files and directories."
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="rule files or directories")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="configuration file: validated, its action settings apply, its rules and "
        "plugin directories are the defaults",
    )
    add_plugin_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the rules; 0 when all is well, 1 on any error."""
    with loading():
        return _check(args)


def _check(args: argparse.Namespace) -> int:
    from reactor.rules.compiler import load_rules
    from reactor.service.permissions import obeyed_paths_warnings

    cfg = None
    if args.config is not None:
        from reactor.service.config import load_config

        cfg = load_config(args.config)
    if cfg is not None and not args.plugin_dir:
        args.plugin_dir = list(cfg.plugin_dirs)
    paths = rule_paths(args.paths or (cfg.rules if cfg is not None else None))
    # Before any plugin code runs: a plugin others can write is worth knowing about first.
    warnings = obeyed_paths_warnings(
        config_file=args.config,
        rules=paths,
        plugin_dirs=[Path(d) for d in (args.plugin_dir or ["plugins"])],
    )
    action_types, _ = load_action_types(args)
    settings = cfg.actions.settings() if cfg is not None else default_settings()
    ruleset, diags = load_rules(paths, action_types=action_types, settings=settings)
    errors = print_diagnostics([*warnings, *diags], strict=args.strict)
    if errors:
        return 1
    files = {r.location.file for r in ruleset.rules}
    print(f"ok: {len(ruleset)} rules in {len(files)} files")
    return 0
