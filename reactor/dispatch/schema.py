"""The journal's tables and the conversion between rows and ``Invocation``s.

The layout is versioned (``SCHEMA_VERSION``, stored in ``schema_version``); a
change to the tables below needs a new version and an upgrade step in
``reactor.dispatch.journal``.

Every text a row holds is valid UTF-8, whatever a peer sent: a string SQLite
cannot encode (a lone UTF-16 surrogate, which JSON's ``"\\ud800"`` makes) is
stored with its unencodable characters as backslash escapes (``encodable``); the
JSON columns escape them as JSON does. The envelope keeps the exact strings,
so a row read back has the VM and event names the live invocation had.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

import orjson

from reactor.dispatch.invocation import ActionSpecData, Invocation
from reactor.model import RetryPolicy

SCHEMA_VERSION = 1

COLUMNS = (
    "id", "firing_id", "rule", "action_index", "action_type", "params", "retry", "timeout",
    "mode", "vm", "event", "seq", "envelope", "context", "status", "attempts", "created_at",
    "updated_at", "finished_at", "last_error",
)  # fmt: skip
COLS = ", ".join(COLUMNS)
MARKS = ", ".join("?" * len(COLUMNS))
# A dead letter sent back: same row, a fresh attempt budget, not finished.
REQUEUED_SELECT = ", ".join(
    {"status": "'requeued'", "attempts": "0", "updated_at": "?", "finished_at": "NULL"}.get(c, c)
    for c in COLUMNS
)

_ID = "id TEXT {} NOT NULL,  -- uuid4 hex; also the idempotency key"
_COMMON = """
    firing_id TEXT NOT NULL,     -- the invocations of one firing run in action_index order
    rule TEXT NOT NULL,
    action_index INTEGER NOT NULL,
    action_type TEXT NOT NULL,
    params TEXT NOT NULL,        -- JSON: the raw `with` mapping, templates unrendered
    retry TEXT NOT NULL,         -- JSON: the effective RetryPolicy
    timeout REAL NOT NULL,       -- seconds per attempt
    mode TEXT NOT NULL,          -- the rule's mode when it fired
    vm TEXT NOT NULL,
    event TEXT NOT NULL,
    seq INTEGER,
    envelope TEXT NOT NULL,      -- JSON
    context TEXT NOT NULL,       -- JSON
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,   -- attempts started
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    last_error TEXT              -- redacted by the dispatcher's redactor
"""

SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    # ``n`` (the rowid) orders the rows and addresses them cheaply; the journal assigns it.
    f"CREATE TABLE invocations (n INTEGER PRIMARY KEY, {_ID.format('')} {_COMMON})",
    f"CREATE TABLE dead_letters ({_ID.format('PRIMARY KEY')} {_COMMON}, died_at REAL NOT NULL)",
    # Partial indexes cost nothing for rows outside them: the hot path never touches the first.
    "CREATE INDEX invocations_requeued ON invocations(status) WHERE status = 'requeued'",
    "CREATE INDEX invocations_finished ON invocations(finished_at) WHERE finished_at IS NOT NULL",
)


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)  # json.dumps() builds one per call


def dumps(value: Any) -> str:
    """Compact JSON; anything unknown as its ``str``, a cycle as a marked ``repr``."""
    try:
        return _ENCODER.encode(value)
    except (ValueError, RecursionError):  # a cycle: keep a trace rather than lose the row
        return _ENCODER.encode({"unserialisable": repr(value)[:2000]})


# Types orjson would write its own way (dates, dataclasses, subclasses) go to ``dumps``.
_PASSTHROUGH = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _refuse(value: Any) -> Any:
    raise TypeError


def dumps_data(value: Any) -> str:
    """``dumps`` for envelopes and contexts, 5x faster: orjson for plain JSON values.

    Anything else (a type JSON lacks, a non-string key, an integer beyond 64
    bits, a cycle) goes to ``dumps``. The one difference: a NaN or infinite
    float, which no JSON parser reads back, is stored as null.
    """
    try:
        return orjson.dumps(value, default=_refuse, option=_PASSTHROUGH).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        return dumps(value)


def encodable(value: str) -> str:
    """``value`` as UTF-8 can carry it (SQLite, Prometheus): what it cannot, as ``\\udXXX``."""
    if value.isascii():  # the common case, and a fast check
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode()
    return value


def opt_text(value: str | None) -> str | None:
    """``encodable`` for a column that may be NULL."""
    return None if value is None else encodable(value)


def to_rows(invs: Iterable[Invocation]) -> Iterator[tuple[Any, ...]]:
    """Row tuples; shared envelopes and specs (one firing, one rule) are serialised once."""
    # Keyed by id(): every object stays alive (referenced by ``invs``) for the whole call.
    specs: dict[int, tuple[str, str]] = {}
    envelopes: dict[tuple[int, int], tuple[str, str]] = {}
    for inv in invs:
        spec = inv.spec
        spec_json = specs.get(id(spec))
        if spec_json is None:
            spec_json = specs[id(spec)] = (dumps(dict(spec.params)), dumps(asdict(spec.retry)))
        key = (id(inv.envelope), id(inv.context))
        env_json = envelopes.get(key)
        if env_json is None:
            env_json = envelopes[key] = (dumps_data(inv.envelope), dumps_data(inv.context))
        e = encodable
        yield (
            e(inv.id), e(inv.firing_id), e(inv.rule), inv.action_index, e(spec.type), spec_json[0],
            spec_json[1], spec.timeout, e(inv.mode), e(inv.vm), e(inv.event), inv.seq, env_json[0],
            env_json[1], e(inv.status), inv.attempts, inv.created_at, inv.updated_at,
            inv.finished_at, opt_text(inv.last_error),
        )  # fmt: skip


def done_runs(invs: list[Invocation]) -> Iterator[tuple[float, float, int, int]]:
    """(updated_at, finished_at, first row, last row) for each run of consecutive rows."""
    invs.sort(key=lambda inv: inv.row or 0)
    start = 0
    for i, inv in enumerate(invs):
        last = i + 1 == len(invs) or invs[i + 1].row != (inv.row or 0) + 1
        if last:
            finished = max(x.finished_at or 0.0 for x in invs[start : i + 1])
            yield finished, finished, invs[start].row or 0, inv.row or 0
            start = i + 1


def from_row(row: sqlite3.Row, park: int | None = None) -> Invocation:
    """The invocation a row of either table holds; an envelope longer than ``park`` stays out."""
    keys = row.keys()
    parked = park is not None and len(row["envelope"]) > park
    envelope = {} if parked else json.loads(row["envelope"])
    spec = ActionSpecData(
        type=row["action_type"],
        params=json.loads(row["params"]),
        retry=RetryPolicy(**json.loads(row["retry"])),
        timeout=row["timeout"],
    )
    return Invocation(
        id=row["id"], firing_id=row["firing_id"], rule=row["rule"],
        action_index=row["action_index"], spec=spec, mode=row["mode"],
        vm=_exact(row["vm"], envelope, "vm"), event=_exact(row["event"], envelope, "event"),
        seq=row["seq"], envelope=envelope, parked=parked,
        context=json.loads(row["context"]), created_at=row["created_at"],
        attempts=row["attempts"], status=row["status"], last_error=row["last_error"],
        updated_at=row["updated_at"], finished_at=row["finished_at"],
        died_at=row["died_at"] if "died_at" in keys else None,
        row=row["n"] if "n" in keys else None,
    )  # fmt: skip


def _exact(stored: str, envelope: Any, key: str) -> str:
    """The envelope's own string when ``stored`` is its escaped form (else ``stored``)."""
    if stored.isascii() and "\\" in stored and isinstance(envelope, dict):
        exact = envelope.get(key)
        if isinstance(exact, str) and encodable(exact) == stored:
            return exact
    return stored


def quarantine_row(inv: Invocation) -> tuple[Any, ...]:
    """A dead-letter row (without ``died_at``) SQLite takes whatever ``inv`` holds.

    Every text escaped, a number SQLite cannot hold dropped, JSON built leniently:
    for an invocation whose own row could not be written.
    """
    spec = inv.spec
    try:
        retry = dumps(asdict(spec.retry))
    except Exception:  # not a RetryPolicy at all: the default one reads back
        retry = dumps(asdict(RetryPolicy()))
    return (
        _text(inv.id), _text(inv.firing_id), _text(inv.rule), _int(inv.action_index, 0),
        _text(spec.type), _object(spec.params), retry, _float(spec.timeout), _text(inv.mode),
        _text(inv.vm), _text(inv.event), _int(inv.seq, None), _object(inv.envelope),
        _object(inv.context), "dead", _int(inv.attempts, 0), _float(inv.created_at),
        _float(inv.updated_at), None, _text(inv.last_error),
    )  # fmt: skip


def _text(value: Any) -> str:
    return encodable(value if isinstance(value, str) else repr(value))


def _int(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and -(2**63) <= value < 2**63 else default


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0


def _object(value: Any) -> str:
    """A JSON object: ``value`` if it is a mapping JSON can hold, else its ``repr``."""
    try:
        return dumps(dict(value))
    except Exception:
        return dumps({"unserialisable": _text(value)[:2000]})


def loose_row(row: sqlite3.Row) -> Invocation:
    """``from_row`` for a row that may be damaged (a quarantined one): never raises.

    A JSON column that does not parse becomes ``{"unreadable": its text}``; any
    other value of the wrong type its column's empty value.
    """
    try:
        return from_row(row)
    except Exception:  # damaged: rebuild it column by column
        pass
    keys = row.keys()
    try:
        retry = RetryPolicy(**json.loads(row["retry"]))
    except Exception:
        retry = RetryPolicy()
    spec = ActionSpecData(_str(row["action_type"]), _loads(row["params"]), retry,
                          _float(row["timeout"]))  # fmt: skip
    return Invocation(
        id=_str(row["id"]), firing_id=_str(row["firing_id"]), rule=_str(row["rule"]),
        action_index=_int(row["action_index"], 0) or 0, spec=spec, mode=_str(row["mode"]),
        vm=_str(row["vm"]), event=_str(row["event"]), seq=_int(row["seq"], None),
        envelope=_loads(row["envelope"]), context=_loads(row["context"]),
        created_at=_float(row["created_at"]), attempts=_int(row["attempts"], 0) or 0,
        status=_str(row["status"]), last_error=_str(row["last_error"]),
        updated_at=_float(row["updated_at"]), finished_at=None,
        died_at=_float(row["died_at"]) if "died_at" in keys else None,
        row=row["n"] if "n" in keys else None,
    )  # fmt: skip


def _str(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else repr(value)


def _loads(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except Exception:
        return {"unreadable": _str(text)[:2000]}
    return value if isinstance(value, dict) else {"unreadable": _str(text)[:2000]}
