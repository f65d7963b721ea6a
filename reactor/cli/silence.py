"""``qmp-reactor silence``: add, list and expire silences (no actions for matching firings).

``add --vm GLOB [--rule GLOB] [--event GLOB] --for 2h --comment TEXT`` prints
the new silence's id; ``list`` prints the silences in force (``--all`` also the
ended ones; ``--json``); ``expire ID`` ends one now (a unique id prefix is
enough). A running sidecar with the same ``--state-dir`` applies a change at
once, without a reload.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reactor.errors import UserError
from reactor.params.display import escape


def register(subparsers: Any) -> None:
    """Add the ``silence`` subcommand with ``add``, ``list`` and ``expire``."""
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir", type=Path, default=argparse.SUPPRESS, metavar="DIR",
        help="the sidecar's state directory, with silences.sqlite3"
        " (default: /var/lib/qmp-reactor if writable, else ./.qmp-reactor)",
    )  # fmt: skip
    parser = subparsers.add_parser(
        "silence", parents=[state], help="add, list or expire silences (maintenance windows)"
    )
    actions = parser.add_subparsers(dest="silence_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", parents=[state], help="silence matching firings for a while")
    add.add_argument("--vm", required=True, metavar="GLOB", help="VM name or glob")
    add.add_argument("--rule", default="*", metavar="GLOB", help="rule name or glob (default *)")
    add.add_argument("--event", default="*", metavar="GLOB", help="event name or glob (default *)")
    add.add_argument("--for", dest="duration", required=True, metavar="DURATION", help="e.g. 2h")
    add.add_argument("--comment", required=True, metavar="TEXT", help="why, for the next person")
    add.set_defaults(func=run_add)
    listing = actions.add_parser("list", parents=[state], help="print the silences in force")
    listing.add_argument("--all", action="store_true", help="also the silences that ended")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=run_list)
    expire = actions.add_parser("expire", parents=[state], help="end a silence now")
    expire.add_argument("id", metavar="ID", help="silence id (or a unique prefix)")
    expire.set_defaults(func=run_expire)


def _store(args: argparse.Namespace) -> Any:
    from reactor.dispatch.journal import default_state_dir
    from reactor.dispatch.silences import SilenceStore, silence_path

    given = getattr(args, "state_dir", None)
    return SilenceStore(silence_path(Path(given) if given is not None else default_state_dir()))


def run_add(args: argparse.Namespace) -> int:
    """Add a silence; prints its id."""
    from reactor.dispatch.silences import Silence
    from reactor.durations import parse_duration

    try:
        seconds = parse_duration(args.duration)
    except ValueError as err:
        raise UserError(f"--for: {err}") from None
    if seconds <= 0:
        raise UserError("--for: a silence lasts longer than zero")
    now = time.time()
    silence = _store(args).add(
        Silence("", args.vm, args.rule, args.event, now, now + seconds, args.comment, _who())
    )
    print(silence.id)
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print the silences (in force, or all); 0."""
    now = time.time()
    found = [s for s in _store(args).all() if args.all or s.ends > now]
    if args.json:
        docs = [
            {
                "id": s.id, "vm": s.vm, "rule": s.rule, "event": s.event,
                "starts": _iso(s.starts), "ends": _iso(s.ends), "active": s.active(now),
                "comment": s.comment, "created_by": s.created_by,
            }
            for s in found
        ]  # fmt: skip
        print(json.dumps(docs, indent=2))
        return 0
    if not found:
        print("no silences" if args.all else "no silences in force")
        return 0
    print(f"{'ID':<8}  {'VM':<16}  {'RULE':<20}  {'EVENT':<16}  {'ENDS':<20}  COMMENT")
    for s in found:
        ends = _iso(s.ends) + ("" if s.ends > now else " (ended)")
        fields = [s.id, s.vm, s.rule, s.event]
        print(
            "  ".join(f"{escape(v):<{w}}" for v, w in zip(fields, (8, 16, 20, 16), strict=True))
            + f"  {ends:<20}  {escape(s.comment)}"
        )
    return 0


def run_expire(args: argparse.Namespace) -> int:
    """End a silence now; 1 if the id matches none or several."""
    ended = _store(args).expire(args.id)
    if ended is None:
        raise UserError(f"no single silence with id {args.id!r}; see 'qmp-reactor silence list'")
    print(f"silence {ended.id} ended", file=sys.stderr)
    return 0


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"


def _iso(moment: float) -> str:
    if moment >= 1e17:
        return "never"
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
