"""What several commands share: default paths, plugin loading, diagnostics output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reactor.durations import parse_duration
from reactor.errors import Diagnostic
from reactor.service.loader import bundled_rules, rule_paths

__all__ = [
    "add_plugin_args",
    "bundled_rules",
    "duration_arg",
    "load_action_types",
    "print_diagnostics",
    "rule_paths",
]
from reactor.plugins.api import ActionSettings, ActionType


def duration_arg(text: str) -> float:
    """An argparse ``type`` for durations (``30s``, ``5m``, ``0``)."""
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
