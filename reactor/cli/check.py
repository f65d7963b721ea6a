"""``qmp-reactor check PATH...``: validate rule files without running anything."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from reactor.cli._common import add_plugin_args, loading, print_diagnostics, qemu_version_arg


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
    p.add_argument(
        "--qemu",
        action="append",
        type=qemu_version_arg,
        metavar="VERSION",
        help="judge events and fields against this QEMU release (repeatable; default: the "
        "configuration's qemu_versions)",
    )
    add_plugin_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the rules; 0 when all is well, 1 on any error."""
    with loading():
        return _check(args)


def _check(args: argparse.Namespace) -> int:
    from reactor.errors import Diagnostic, RuleError
    from reactor.service.generation import Options, load_generation

    opts = Options(
        config=args.config,
        rules=args.paths or None,
        plugin_dirs=args.plugin_dir,
        block_plugins=args.block_plugin,
        qemu_versions=args.qemu or [],
    )
    warnings: list[Diagnostic] = []  # files others can write: found before any plugin runs
    try:
        gen = load_generation(opts, report=warnings.append)
    except RuleError as err:
        print_diagnostics([*warnings, *err.diagnostics], strict=args.strict)
        return 1
    diags = [*warnings, *gen.diagnostics]
    if print_diagnostics(diags, strict=args.strict):
        return 1
    files = {r.location.file for r in gen.rules.rules}
    print(f"ok: {len(gen.rules)} rules in {len(files)} files")
    return 0
