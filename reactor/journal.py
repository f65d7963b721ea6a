"""The durable outbox: every action invocation, written down before it runs.

One SQLite file, ``<state_dir>/journal.sqlite3``, in WAL mode with
``synchronous=FULL``: a transaction that returned is on disk. Two tables:

* ``invocations``: work accepted and not yet dead-lettered. ``status`` is
  ``pending`` (written, not started), ``running`` (an attempt began),
  ``requeued`` (an operator sent it back from the dead letters), or a finished
  state kept for ``keep_finished`` seconds: ``done``, ``skipped``, ``cancelled``.
* ``dead_letters``: invocations that ran out of retries or failed for good,
  until ``qmp-reactor dlq retry`` moves them back or ``dlq drop`` deletes them.

A row carries everything needed to run it without the rule files: the action
spec (type, raw ``with`` params, never rendered secrets, retry, timeout), the
envelope and window context as JSON. The invocation id doubles as the
idempotency key, the same on every attempt and after a restart.

Every method is one transaction and thread-safe, so the dispatcher may write
from a worker thread while the event loop reads.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reactor.errors import ConfigError, ReactorError, UserError
from reactor.model import RetryPolicy

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
JOURNAL_NAME = "journal.sqlite3"
SYSTEM_STATE_DIR = Path("/var/lib/qmp-reactor")
UNFINISHED = ("pending", "running", "requeued")
FINISHED = ("done", "skipped", "cancelled")

_COLUMNS = (
    "id", "firing_id", "rule", "action_index", "action_type", "params", "retry", "timeout",
    "mode", "vm", "event", "seq", "envelope", "context", "status", "attempts", "created_at",
    "updated_at", "finished_at", "last_error",
)  # fmt: skip
_COLS = ", ".join(_COLUMNS)
_MARKS = ", ".join("?" * len(_COLUMNS))
# A dead letter sent back: same row, a fresh attempt budget, not finished.
_REQUEUED = ", ".join(
    {"status": "'requeued'", "attempts": "0", "updated_at": "?", "finished_at": "NULL"}.get(c, c)
    for c in _COLUMNS
)

_ID = "id TEXT {} NOT NULL,  -- uuid4 hex; also the idempotency key"
_TABLE = """
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

_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    # ``n`` (the rowid) orders the rows and addresses them cheaply; the journal assigns it.
    f"CREATE TABLE invocations (n INTEGER PRIMARY KEY, {_ID.format('')} {_TABLE})",
    f"CREATE TABLE dead_letters ({_ID.format('PRIMARY KEY')} {_TABLE}, died_at REAL NOT NULL)",
    # Partial indexes cost nothing for rows outside them: the hot path never touches the first.
    "CREATE INDEX invocations_requeued ON invocations(status) WHERE status = 'requeued'",
    "CREATE INDEX invocations_finished ON invocations(finished_at) WHERE finished_at IS NOT NULL",
)


class JournalError(ReactorError):
    """A journal read or write failed (disk full, read-only, I/O error); the cause is kept."""


@dataclass(frozen=True, slots=True)
class ActionSpecData:
    """An action as it will run: type, raw ``with`` params, effective retry and timeout."""

    type: str
    params: Mapping[str, Any]
    retry: RetryPolicy
    timeout: float


@dataclass(slots=True)
class Invocation:
    """One action of one firing; ``id`` is also the idempotency key."""

    id: str
    firing_id: str
    rule: str
    action_index: int
    spec: ActionSpecData
    mode: str
    vm: str
    event: str
    seq: int | None
    envelope: dict[str, Any]
    context: dict[str, Any]
    created_at: float
    attempts: int = 0
    status: str = "pending"
    last_error: str | None = None
    updated_at: float = 0.0
    finished_at: float | None = None
    died_at: float | None = field(default=None, compare=False)
    row: int | None = field(default=None, compare=False)
    """The row number in ``invocations``, once written."""

    @property
    def idempotency_key(self) -> str:
        """The key receivers use to spot a duplicate delivery: the invocation id."""
        return self.id


class _RandomPool:
    """Random bytes fetched 4 KiB at a time: os.urandom is a system call per use."""

    def __init__(self) -> None:
        self.pool = b""
        self.at = 0
        os.register_at_fork(after_in_child=self.reset)  # a child must not repeat our ids

    def reset(self) -> None:
        self.pool, self.at = b"", 0

    def take(self) -> bytes:
        if self.at >= len(self.pool):
            self.pool, self.at = os.urandom(4096), 0
        self.at += 16
        return self.pool[self.at - 16 : self.at]


_POOL = _RandomPool()
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)  # version 4, RFC 4122 variant


def new_id() -> str:
    """A fresh invocation id: a random uuid4 as 32 hex digits."""
    value = int.from_bytes(_POOL.take(), "big") & _UUID4_CLEAR | _UUID4_SET
    return f"{value:032x}"


def default_state_dir() -> Path:
    """``/var/lib/qmp-reactor`` if it is (or can be made) writable, else ``./.qmp-reactor``."""
    path = SYSTEM_STATE_DIR
    probe = path if path.exists() else path.parent
    if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK):
        return path
    return Path(".qmp-reactor")


def journal_path(state_dir: Path) -> Path:
    """Where the journal of a state directory lives."""
    return Path(state_dir) / JOURNAL_NAME


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)  # json.dumps() builds one per call


def _dumps(value: Any) -> str:
    try:
        return _ENCODER.encode(value)
    except (ValueError, RecursionError):  # a cycle: keep a trace rather than lose the row
        return _ENCODER.encode({"unserialisable": repr(value)[:2000]})


def _rows(invs: Iterable[Invocation]) -> Iterator[tuple[Any, ...]]:
    """Row tuples; shared envelopes and specs (one firing, one rule) are serialised once."""
    # Keyed by id(): every object stays alive (referenced by ``invs``) for the whole call.
    specs: dict[int, tuple[str, str]] = {}
    envelopes: dict[tuple[int, int], tuple[str, str]] = {}
    for inv in invs:
        spec = inv.spec
        spec_json = specs.get(id(spec))
        if spec_json is None:
            spec_json = specs[id(spec)] = (_dumps(dict(spec.params)), _dumps(asdict(spec.retry)))
        key = (id(inv.envelope), id(inv.context))
        env_json = envelopes.get(key)
        if env_json is None:
            env_json = envelopes[key] = (_dumps(inv.envelope), _dumps(inv.context))
        yield (
            inv.id, inv.firing_id, inv.rule, inv.action_index, spec.type, spec_json[0],
            spec_json[1], spec.timeout, inv.mode, inv.vm, inv.event, inv.seq, env_json[0],
            env_json[1], inv.status, inv.attempts, inv.created_at, inv.updated_at,
            inv.finished_at, inv.last_error,
        )  # fmt: skip


def _runs(invs: list[Invocation]) -> Iterator[tuple[float, float, int, int]]:
    """(updated_at, finished_at, first row, last row) for each run of consecutive rows."""
    invs.sort(key=lambda inv: inv.row or 0)
    start = 0
    for i, inv in enumerate(invs):
        last = i + 1 == len(invs) or invs[i + 1].row != (inv.row or 0) + 1
        if last:
            finished = max(x.finished_at or 0.0 for x in invs[start : i + 1])
            yield finished, finished, invs[start].row or 0, inv.row or 0
            start = i + 1


def _invocation(row: sqlite3.Row) -> Invocation:
    keys = row.keys()
    spec = ActionSpecData(
        type=row["action_type"],
        params=json.loads(row["params"]),
        retry=RetryPolicy(**json.loads(row["retry"])),
        timeout=row["timeout"],
    )
    return Invocation(
        id=row["id"], firing_id=row["firing_id"], rule=row["rule"],
        action_index=row["action_index"], spec=spec, mode=row["mode"], vm=row["vm"],
        event=row["event"], seq=row["seq"], envelope=json.loads(row["envelope"]),
        context=json.loads(row["context"]), created_at=row["created_at"],
        attempts=row["attempts"], status=row["status"], last_error=row["last_error"],
        updated_at=row["updated_at"], finished_at=row["finished_at"],
        died_at=row["died_at"] if "died_at" in keys else None,
        row=row["n"] if "n" in keys else None,
    )  # fmt: skip


@dataclass(slots=True)
class JournalBatch:
    """Writes to apply in one transaction: new rows, state changes, dead letters."""

    inserts: list[Invocation] = field(default_factory=list)
    updates: dict[str, Invocation] = field(default_factory=dict)
    dead: dict[str, Invocation] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.inserts) + len(self.updates) + len(self.dead)

    def absorb(self, newer: JournalBatch) -> None:
        """Append ``newer``'s writes after ours (a later state of a row wins)."""
        self.inserts.extend(newer.inserts)
        self.updates.update(newer.updates)
        self.dead.update(newer.dead)


class Journal:
    """The SQLite outbox of action invocations (see the module docstring)."""

    def __init__(
        self, path: Path, *, keep_finished: float = 60.0, max_bytes: int | None = None
    ) -> None:
        """Open or create the journal at ``path`` (and its directory).

        ``keep_finished``: seconds a finished row stays before ``prune`` deletes it.
        ``max_bytes``: a size cap; past it writes fail as on a full disk.
        Raises ``ConfigError`` when the file cannot be created or opened.
        """
        self.path = Path(path)
        self.keep_finished = keep_finished
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(f"cannot open the journal {self.path}: {err}") from err
        self._db.row_factory = sqlite3.Row
        try:
            self._setup(max_bytes)
        except (sqlite3.Error, JournalError, UserError) as err:
            self._db.close()
            if isinstance(err, UserError):
                raise
            raise ConfigError(f"cannot open the journal {self.path}: {err}") from err

    def _setup(self, max_bytes: int | None) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":  # e.g. a file system without shared memory: still durable, slower
            log.warning("journal %s: WAL not available, using journal_mode=%s", self.path, mode)
        db.execute("PRAGMA synchronous=FULL")
        self.set_max_bytes(max_bytes)
        with self._transaction():
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "schema_version" not in tables:
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        version = db.execute("SELECT version FROM schema_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"the journal {self.path} has schema version {version}; this qmp-reactor "
                f"knows up to {SCHEMA_VERSION}: upgrade qmp-reactor"
            )

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Cap the journal's size (``None``: no cap beyond the disk's)."""
        with self._lock:
            page = self._db.execute("PRAGMA page_size").fetchone()[0]
            pages = 0xFFFFFFFE if max_bytes is None else max(1, max_bytes // page)
            self._db.execute(f"PRAGMA max_page_count={int(pages)}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock at once, so a concurrent CLI waits instead of
        # failing half-way through a read-then-write.
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise JournalError(f"journal {self.path}: {err}") from err

    def apply(self, batch: JournalBatch) -> None:
        """Write a whole batch in one transaction; on ``JournalError`` nothing was written."""
        with self._transaction() as db:
            self._write(db, batch)

    def stage(self, batch: JournalBatch) -> None:
        """Write a batch in a transaction left open; ``commit`` must follow (in any thread).

        The two halves let the caller keep the CPU work in one thread and wait for
        the disk (the commit's fsync) in another. On ``JournalError`` nothing was written.
        """
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._write(self._db, batch)
        except BaseException as err:
            self._rollback()
            self._lock.release()
            if isinstance(err, sqlite3.Error):
                raise JournalError(f"journal {self.path}: {err}") from err
            raise

    def commit(self) -> None:
        """Commit what ``stage`` wrote (durably, ``synchronous=FULL``); rolls back on failure."""
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as err:
            self._rollback()
            raise JournalError(f"journal {self.path}: {err}") from err
        finally:
            self._lock.release()

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _write(self, db: sqlite3.Connection, batch: JournalBatch) -> None:
        self._insert(db, batch.inserts)
        self._update(db, batch.updates.values())
        self._bury(db, batch.dead.values())

    def add_many(self, invs: Sequence[Invocation]) -> None:
        """Write new invocations (one transaction)."""
        self.apply(JournalBatch(inserts=list(invs)))

    def mark(self, invs: Iterable[Invocation]) -> None:
        """Store the status, attempts, last error and timestamps of existing rows."""
        self.apply(JournalBatch(updates={inv.id: inv for inv in invs}))

    def finish(self, invs: Iterable[Invocation], status: str = "done") -> None:
        """Mark invocations finished (``done``, ``skipped`` or ``cancelled``) now."""
        now = time.time()
        invs = list(invs)
        for inv in invs:
            inv.status, inv.updated_at, inv.finished_at = status, now, now
        self.mark(invs)

    def dead(self, invs: Iterable[Invocation]) -> None:
        """Move invocations to the dead letters, with their final attempts and error."""
        self.apply(JournalBatch(dead={inv.id: inv for inv in invs}))

    @staticmethod
    def _insert(db: sqlite3.Connection, invs: Sequence[Invocation]) -> None:
        if not invs:
            return
        # Numbering under the write lock: a concurrent ``dlq retry`` cannot take these numbers.
        last = db.execute("SELECT COALESCE(MAX(n), 0) FROM invocations").fetchone()[0]
        for n, inv in enumerate(invs, last + 1):
            inv.row = n
        db.executemany(
            f"INSERT INTO invocations (n, {_COLS}) VALUES (?, {_MARKS})",
            ((inv.row, *row) for inv, row in zip(invs, _rows(invs), strict=True)),
        )

    @staticmethod
    def _update(db: sqlite3.Connection, invs: Iterable[Invocation]) -> None:
        # A row not yet written gets its current state when it is (later in this batch).
        plain, done_at_once = [], []
        for inv in invs:
            if inv.row is None:
                continue
            if inv.status == "done" and inv.attempts == 1 and inv.finished_at is not None:
                done_at_once.append(inv)
            else:
                plain.append((inv.status, inv.attempts, inv.last_error, inv.updated_at,
                              inv.finished_at, inv.row))  # fmt: skip
        db.executemany(
            "UPDATE invocations SET status=?, attempts=?, last_error=?, updated_at=?,"
            " finished_at=? WHERE n=?",
            plain,
        )
        # The common case, done at the first attempt, in runs of consecutive rows: one
        # statement per run instead of one per row; the run's last time stands for all.
        db.executemany(
            "UPDATE invocations SET status='done', attempts=1, last_error=NULL, updated_at=?,"
            " finished_at=? WHERE n BETWEEN ? AND ?",
            _runs(done_at_once),
        )

    @staticmethod
    def _bury(db: sqlite3.Connection, invs: Iterable[Invocation]) -> None:
        invs = list(invs)
        if not invs:
            return
        now = time.time()
        for inv in invs:
            inv.status, inv.died_at = "dead", inv.died_at or now
        db.executemany(
            f"INSERT OR REPLACE INTO dead_letters ({_COLS}, died_at) VALUES ({_MARKS}, ?)",
            ((*row, inv.died_at) for row, inv in zip(_rows(invs), invs, strict=True)),
        )
        db.executemany("DELETE FROM invocations WHERE n=?", ((inv.row,) for inv in invs))

    def _select(self, sql: str, args: Sequence[Any] = ()) -> list[Invocation]:
        with self._lock:
            try:
                return [_invocation(r) for r in self._db.execute(sql, args)]
            except sqlite3.Error as err:
                raise JournalError(f"journal {self.path}: {err}") from err

    def pending(self) -> list[Invocation]:
        """Unfinished invocations (pending, running, requeued) in the order they were written."""
        marks = ", ".join("?" * len(UNFINISHED))
        return self._select(
            f"SELECT * FROM invocations WHERE status IN ({marks}) ORDER BY n", UNFINISHED
        )

    def claim_requeued(self) -> list[Invocation]:
        """Take the rows ``dlq retry`` sent back: they become ``pending`` and are returned."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM invocations WHERE status = 'requeued' ORDER BY n"
            ).fetchall()
            db.execute("UPDATE invocations SET status = 'pending' WHERE status = 'requeued'")
        claimed = [_invocation(r) for r in rows]
        for inv in claimed:
            inv.status = "pending"
        return claimed

    def get(self, inv_id: str) -> Invocation | None:
        """The row of one invocation, from either table (``status`` says which)."""
        for table in ("invocations", "dead_letters"):
            found = self._select(f"SELECT * FROM {table} WHERE id = ?", (inv_id,))
            if found:
                return found[0]
        return None

    def dead_letters(self) -> list[Invocation]:
        """Every dead letter, oldest first."""
        return self._select("SELECT * FROM dead_letters ORDER BY died_at, rowid")

    def count(self, dead: bool = False) -> int:
        """How many unfinished invocations there are (``dead=True``: dead letters)."""
        sql = (
            "SELECT COUNT(*) FROM dead_letters"
            if dead
            else "SELECT COUNT(*) FROM invocations WHERE finished_at IS NULL"
        )
        with self._lock:
            try:
                return int(self._db.execute(sql).fetchone()[0])
            except sqlite3.Error as err:
                raise JournalError(f"journal {self.path}: {err}") from err

    def _resolve(self, db: sqlite3.Connection, ids: Iterable[str]) -> list[str]:
        """Full dead-letter ids for ids or unique prefixes; ``UserError`` names any unknown."""
        known = [r[0] for r in db.execute("SELECT id FROM dead_letters")]
        resolved, problems = [], []
        for given in ids:
            hits = [k for k in known if k.startswith(given.lower())] if given else []
            if len(hits) == 1:
                resolved.append(hits[0])
            else:
                problems.append(f"{given!r} is {'ambiguous' if hits else 'not a dead letter'}")
        if problems:
            raise UserError(f"in {self.path}: " + "; ".join(problems))
        return list(dict.fromkeys(resolved))

    def requeue(self, ids: Iterable[str]) -> list[str]:
        """Send dead letters back as ``requeued`` with a fresh attempt budget (same ids)."""
        with self._transaction() as db:
            full = self._resolve(db, ids)
            now = time.time()
            for inv_id in full:
                db.execute(
                    f"INSERT INTO invocations ({_COLS}) SELECT {_REQUEUED} FROM dead_letters"
                    " WHERE id = ?",
                    (now, inv_id),
                )
                db.execute("DELETE FROM dead_letters WHERE id = ?", (inv_id,))
        return full

    def drop(self, ids: Iterable[str]) -> list[str]:
        """Delete dead letters for good; returns the full ids dropped."""
        with self._transaction() as db:
            full = self._resolve(db, ids)
            db.executemany("DELETE FROM dead_letters WHERE id = ?", ((i,) for i in full))
        return full

    def prune(self, now: float | None = None) -> int:
        """Delete rows finished more than ``keep_finished`` seconds ago; returns how many."""
        cutoff = (time.time() if now is None else now) - self.keep_finished
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM invocations WHERE finished_at IS NOT NULL AND finished_at < ?",
                (cutoff,),
            ).rowcount

    def close(self) -> None:
        """Close the database (a checkpoint folds the WAL back into the file)."""
        with self._lock:
            self._db.close()
