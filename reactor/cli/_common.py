"""What several commands share: default paths, plugin loading, diagnostics output.

Cheap to import (the parser is built from it): what loading plugins needs is
imported by the functions that load them.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reactor.cli._args import PathsOption
from reactor.errors import Diagnostic
from reactor.service.loader import bundled_rules, rule_paths

if TYPE_CHECKING:
    from reactor.plugins.api import ActionSettings, ActionType

__all__ = [
    "add_plugin_args",
    "add_rules_arg",
    "bundled_rules",
    "load_action_types",
    "print_diagnostics",
    "rule_paths",
]


def add_rules_arg(
    parser: argparse.ArgumentParser, default: str = "./rules, else the bundled pack"
) -> None:
    """``--rules PATH...``, repeatable; it never keeps the command's positionals."""
    parser.add_argument(
        "--rules",
        action=PathsOption,
        metavar="PATH",
        help=f"rule files or directories (repeatable; default: {default})",
    )


@contextmanager
def loading() -> Iterator[None]:
    """Imports, plugins and rules without the cyclic collector, then frozen out of its way.

    What a command loads lives as long as the command, so collecting meanwhile only
    costs (a fifth of ``check``'s CPU); after it the collector never rescans it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def add_plugin_args(parser: argparse.ArgumentParser) -> None:
    """``--plugin-dir`` and ``--block-plugin``, for commands that load plugins."""
    parser.add_argument(
        "--plugin-dir",
        action="append",
        metavar="DIR",
        help="directory of *.py plugins (default: ./plugins)",
    )
    parser.add_argument(
        "--block-plugin",
        action="append",
        default=[],
        metavar="NAME",
        help="do not load the plugin NAME",
    )


def load_action_types(
    args: argparse.Namespace, extra_dirs: Iterable[Path] = ()
) -> tuple[Mapping[str, ActionType], Any]:
    """The registered action types and the plugin host, loaded as the flags say."""
    from reactor.plugins.manager import load_plugins

    dirs = [Path(d) for d in (getattr(args, "plugin_dir", None) or ["plugins"])]
    dirs.extend(extra_dirs)
    plugins = load_plugins(plugin_dirs=tuple(dirs), blocked=tuple(args.block_plugin or ()))
    return plugins.action_types(), plugins


def default_settings() -> ActionSettings:
    """Action settings when no configuration file is given."""
    from reactor.plugins.api import ActionSettings

    return ActionSettings()


def print_diagnostics(diags: Sequence[Diagnostic], *, strict: bool = False) -> int:
    """Print diagnostics sorted by place; returns how many count as errors."""
    errors = 0
    for d in sorted(diags, key=lambda d: (d.location.file, d.location.line, d.location.col)):
        if strict and d.severity == "warning":
            d = Diagnostic(d.location, d.message, "error")
        if d.severity == "error":
            errors += 1
        print(d, file=sys.stderr)
    return errors
