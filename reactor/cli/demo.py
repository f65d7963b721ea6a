"""``qmp-reactor demo``: see the default rules fire on a real, throwaway QEMU."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand."""
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run the live demo on a throwaway QEMU",
        description="Start a throwaway QEMU, drive it, and show the default rules firing.",
    )
    p.add_argument(
        "--recording",
        action="store_true",
        help="replay the bundled recording instead of starting QEMU",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from reactor.demo.run import run_demo
    from reactor.service.logs import TextFormatter

    # What the actions did is part of the show: audit lines and notices go to stdout.
    shown = logging.StreamHandler(sys.stdout)
    shown.setFormatter(TextFormatter("         -> %(message)s"))
    for name in ("reactor.audit", "reactor.notify"):
        logging.getLogger(name).addHandler(shown)
        logging.getLogger(name).propagate = False
        logging.getLogger(name).setLevel(logging.INFO)
    logging.basicConfig(level=logging.ERROR, format="  log    %(name)s: %(message)s")
    return run_demo(force_recording=args.recording)
