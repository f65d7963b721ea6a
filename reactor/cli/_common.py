"""What several commands share: the plugin and rule flags, diagnostics output.

Cheap to import (the parser is built from it): what loading plugins needs is
imported by the functions that load them.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from reactor.cli._args import PathsOption
from reactor.durations import parse_duration
from reactor.errors import Diagnostic
from reactor.params.display import escape


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


def qemu_version_arg(text: str) -> str:
    """``--qemu VERSION``: a QEMU version such as 7.2 or 7.2.0 (argparse says what is wrong)."""
    from reactor.rules.catalog import parse_release

    if parse_release(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a QEMU version (e.g. 7.2 or 7.2.0)")
    return text.strip()


def print_diagnostics(diags: Sequence[Diagnostic], *, strict: bool = False) -> int:
    """Print diagnostics sorted by place; returns how many count as errors."""
    errors = 0
    for d in sorted(diags, key=lambda d: (d.location.file, d.location.line, d.location.col)):
        if strict and d.severity == "warning":
            d = Diagnostic(d.location, d.message, "error")
        if d.severity == "error":
            errors += 1
        print(escape(str(d)), file=sys.stderr)  # a key or value quoted from the file
    return errors
