"""``qmp-reactor dlq``: look at, retry or drop the invocations that gave up.

``list`` prints the dead letters (a table, or ``--json``); ``retry ID...`` sends
them back to the journal as ``requeued``, with a fresh attempt budget and the
same id (so the same idempotency key), and a running daemon picks them up
within a few seconds (or at its next start); ``drop ID...`` deletes them. An id
may be shortened to a unique prefix; an unknown one is an error and changes
nothing. The journal may be in use by the daemon meanwhile.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reactor.errors import UserError
from reactor.params.display import escape

if TYPE_CHECKING:
    from reactor.dispatch.journal import Invocation, Journal


def register(subparsers: Any) -> None:
    """Add the ``dlq`` subcommand with ``list``, ``retry`` and ``drop``."""
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir", type=Path, default=argparse.SUPPRESS,
        help="the daemon's state directory, with journal.sqlite3"
        " (default: /var/lib/qmp-reactor if writable, else ./.qmp-reactor)",
    )  # fmt: skip
    parser = subparsers.add_parser(
        "dlq", parents=[state], help="list, retry or drop dead-lettered action invocations"
    )
    actions = parser.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[state], help="print the dead letters")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=run_list)
    for name, func, text in (
        ("retry", run_retry, "send dead letters back to be run again"),
        ("drop", run_drop, "delete dead letters for good"),
    ):
        sub = actions.add_parser(name, parents=[state], help=text)
        sub.add_argument("ids", nargs="+", metavar="ID", help="dead-letter id (or unique prefix)")
        sub.set_defaults(func=func)


def _state_dir(args: argparse.Namespace) -> Path:
    from reactor.dispatch.journal import default_state_dir

    given = getattr(args, "state_dir", None)
    return Path(given) if given is not None else default_state_dir()


def _open(args: argparse.Namespace) -> Journal | None:
    """The journal of the state directory, or None if there is none (nothing is created).

    An emptied or damaged journal is a ``ConfigError`` that says how to start over.
    """
    from reactor.dispatch.journal import Journal, journal_path

    path = journal_path(_state_dir(args))
    return Journal(path) if path.exists() else None


@contextmanager
def _reading(journal: Journal | None) -> Iterator[None]:
    """Close ``journal`` at the end; a failed read or write is one line, not a traceback."""
    from reactor.dispatch.journal import JournalError

    try:
        yield
    except JournalError as err:
        raise UserError(str(err)) from err
    finally:
        if journal:
            journal.close()


def run_list(args: argparse.Namespace) -> int:
    """Print the dead letters; 0 (also when there are none)."""
    from reactor.dispatch.journal import journal_path

    journal = _open(args)
    with _reading(journal):
        dead = journal.dead_letters() if journal else []
    if args.json:
        json.dump([as_json(inv) for inv in dead], sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif dead:
        sys.stdout.write(as_table(dead))
    else:
        print(f"no dead letters in {journal_path(_state_dir(args))}")
    return 0


def _change(args: argparse.Namespace, verb: str) -> int:
    journal = _open(args)
    if journal is None:
        raise UserError(f"no journal in {_state_dir(args)} (is --state-dir right?)")
    with _reading(journal):
        done = journal.requeue(args.ids) if verb == "requeued" else journal.drop(args.ids)
    for inv_id in done:
        print(f"{verb} {inv_id}")
    return 0


def run_retry(args: argparse.Namespace) -> int:
    """Requeue the given dead letters; an unknown id is a ``UserError`` and nothing changes."""
    return _change(args, "requeued")


def run_drop(args: argparse.Namespace) -> int:
    """Delete the given dead letters; an unknown id is a ``UserError`` and nothing changes."""
    return _change(args, "dropped")


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_json(inv: Invocation) -> dict[str, Any]:
    """One dead letter as plain JSON (raw params: templates unrendered, no secrets)."""
    return {
        "id": inv.id,
        "rule": inv.rule,
        "action_index": inv.action_index,
        "action": inv.spec.type,
        "params": dict(inv.spec.params),
        "vm": inv.vm,
        "event": inv.event,
        "seq": inv.seq,
        "attempts": inv.attempts,
        "created_at": _when(inv.created_at),
        "died_at": _when(inv.died_at),
        "last_error": inv.last_error,
    }


def as_table(dead: list[Invocation]) -> str:
    """The dead letters as an aligned text table, one line each, control characters escaped."""
    header = ("ID", "DIED", "RULE", "ACTION", "VM", "EVENT", "ATTEMPTS", "ERROR")
    rows = [header] + [
        tuple(escape(cell) for cell in (
            inv.id, _when(inv.died_at), inv.rule, f"{inv.action_index}:{inv.spec.type}", inv.vm,
            inv.event, str(inv.attempts), _short(inv.last_error or "")))
        for inv in dead
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]) for r in rows
    ]
    return "".join(line.rstrip() + "\n" for line in lines)


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(escape(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
