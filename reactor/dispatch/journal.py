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

Every method is one transaction and thread-safe; ``stage`` and ``commit`` split
one transaction in two, so that the statements run in one thread and the commit,
which waits for the disk, in another. ``exclusive=True`` (the daemon) takes a
lock file beside the journal so that two daemons never resume the same work;
the ``dlq`` command opens it without.

The table layout and the row conversion live in ``reactor.dispatch.schema``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reactor.dispatch.invocation import PARK_BYTES, ActionSpecData, Invocation, new_id
from reactor.dispatch.schema import (
    COLS,
    MARKS,
    REQUEUED_SELECT,
    SCHEMA,
    SCHEMA_VERSION,
    done_runs,
    encodable,
    from_row,
    loose_row,
    opt_text,
    quarantine_row,
    to_rows,
)
from reactor.errors import ConfigError, ReactorError, UserError

__all__ = [
    "ActionSpecData",
    "Invocation",
    "Journal",
    "JournalBatch",
    "JournalError",
    "default_state_dir",
    "journal_path",
    "new_id",
]

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.sqlite3"
SYSTEM_STATE_DIR = Path("/var/lib/qmp-reactor")
UNFINISHED = ("pending", "running", "requeued")
FINISHED = ("done", "skipped", "cancelled")


class JournalError(ReactorError):
    """A journal read or write failed (disk full, read-only, I/O error); the cause is kept."""


# What one row can raise that writing it again cannot mend: a string SQLite cannot encode,
# a number it cannot hold, a value it cannot bind, a broken constraint. The disk's own
# failures (full, read-only, I/O) are OperationalError: those are retried, not these.
ROW_ERRORS = (
    ValueError, TypeError, OverflowError, sqlite3.IntegrityError, sqlite3.DataError,
    sqlite3.InterfaceError, sqlite3.ProgrammingError,
)  # fmt: skip


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


@dataclass(slots=True)
class JournalBatch:
    """Writes to apply in one transaction: new rows, state changes, dead letters."""

    inserts: list[Invocation] = field(default_factory=list)
    updates: dict[str, Invocation] = field(default_factory=dict)
    dead: dict[str, Invocation] = field(default_factory=dict)
    quarantined: list[Invocation] = field(default_factory=list)
    """Filled by the write: invocations whose own row could not be written, now dead letters."""

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
        self,
        path: Path,
        *,
        keep_finished: float = 60.0,
        max_bytes: int | None = None,
        exclusive: bool = False,
    ) -> None:
        """Open or create the journal at ``path`` (and its directory).

        ``keep_finished``: seconds a finished row stays before ``prune`` deletes it.
        ``max_bytes``: a size cap; past it writes fail as on a full disk.
        ``exclusive``: hold ``<path>.lock`` while open; another exclusive opener fails.
        Raises ``ConfigError`` when the file cannot be created, opened or locked.
        """
        self.path = Path(path)
        self.keep_finished = keep_finished
        self._lock = threading.Lock()
        self._lockfile: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if exclusive:
                self._lockfile = _lock_beside(self.path)
            if not self.path.exists():
                _create(self.path)
            elif self.path.stat().st_size == 0:
                empty = (
                    f"the journal {self.path} is empty: it was emptied, the work it held is gone"
                )
                raise ConfigError(_refusal(self.path, empty))
            self._db = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error, ConfigError) as err:
            self._unlock()
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"cannot open the journal {self.path}: {err}") from err
        self._db.row_factory = sqlite3.Row
        try:
            self._setup(max_bytes)
        except (sqlite3.Error, JournalError, UserError) as err:
            self._db.close()
            self._unlock()
            if isinstance(err, UserError):
                raise
            raise ConfigError(
                _refusal(self.path, f"cannot open the journal {self.path}: {err}")
            ) from err

    def _setup(self, max_bytes: int | None) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":  # e.g. a file system without shared memory: still durable, slower
            log.warning("journal %s: WAL not available, using journal_mode=%s", self.path, mode)
        db.execute("PRAGMA synchronous=FULL")
        self.set_max_bytes(max_bytes)
        with self._transaction():
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "schema_version" not in tables:  # a file with no tables holds no work
                _create_tables(db)
        version = db.execute("SELECT version FROM schema_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"the journal {self.path} has schema version {version}; this qmp-reactor "
                f"knows up to {SCHEMA_VERSION}: upgrade qmp-reactor"
            )
        # A damaged page found now, not half-way through the work (or a dlq retry).
        problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problem != "ok":
            lines = [line for line in problem.splitlines() if not line.startswith("***")]
            damaged = f"the journal {self.path} is damaged: {' '.join(lines)}"
            raise ConfigError(_refusal(self.path, damaged))

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
        db.execute("SAVEPOINT batch")
        try:
            self._insert(db, batch.inserts)
            self._update(db, batch.updates.values())
            self._bury(db, batch.dead.values())
        except ROW_ERRORS:
            # One row cannot be written: the others must not wait for it. Row by row,
            # each failing one goes to the dead letters (the rare path, so slow is fine).
            db.execute("ROLLBACK TO batch")
            self._write_each(db, batch)
        db.execute("RELEASE batch")

    def _write_each(self, db: sqlite3.Connection, batch: JournalBatch) -> None:
        for inv in batch.inserts:
            inv.row = None
            self._write_one(db, batch, inv, self._insert)
        for inv in batch.updates.values():
            self._write_one(db, batch, inv, self._update)
        for inv in batch.dead.values():
            self._write_one(db, batch, inv, self._bury)

    def _write_one(
        self,
        db: sqlite3.Connection,
        batch: JournalBatch,
        inv: Invocation,
        write: Callable[[sqlite3.Connection, list[Invocation]], None],
    ) -> None:
        db.execute("SAVEPOINT one")
        try:
            write(db, [inv])
        except ROW_ERRORS as err:
            db.execute("ROLLBACK TO one")
            self._quarantine(db, inv, err)
            batch.quarantined.append(inv)
        db.execute("RELEASE one")

    def _quarantine(self, db: sqlite3.Connection, inv: Invocation, err: Exception) -> None:
        """Make ``inv`` a dead letter from a row built to be writable; the reason is its error."""
        reason = f"quarantined: the journal cannot store it: {type(err).__name__}: {err}"
        inv.status, inv.died_at, inv.last_error = "dead", time.time(), encodable(reason)
        if inv.row is not None:
            db.execute("DELETE FROM invocations WHERE n=?", (inv.row,))
        inv.row = None
        try:
            db.execute(
                f"INSERT OR REPLACE INTO dead_letters ({COLS}, died_at) VALUES ({MARKS}, ?)",
                (*quarantine_row(inv), inv.died_at),
            )
        except ROW_ERRORS as again:
            log.error("journal %s: invocation %s could not be stored even as a dead letter, "
                      "dropped: %s; then: %s", self.path, encodable(str(inv.id)), reason,
                      again)  # fmt: skip
            return
        log.error("journal %s: invocation %s of rule %s for vm %s %s", self.path, inv.id,
                  encodable(repr(inv.rule)), encodable(repr(inv.vm)), reason)  # fmt: skip

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
            f"INSERT INTO invocations (n, {COLS}) VALUES (?, {MARKS})",
            ((inv.row, *row) for inv, row in zip(invs, to_rows(invs), strict=True)),
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
                plain.append((encodable(inv.status), inv.attempts, opt_text(inv.last_error),
                              inv.updated_at, inv.finished_at, inv.row))  # fmt: skip
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
            done_runs(done_at_once),
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
            f"INSERT OR REPLACE INTO dead_letters ({COLS}, died_at) VALUES ({MARKS}, ?)",
            ((*row, inv.died_at) for row, inv in zip(to_rows(invs), invs, strict=True)),
        )
        db.executemany("DELETE FROM invocations WHERE n=?", ((inv.row,) for inv in invs))

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        # Under self._lock. Text that is not UTF-8 (a damaged row) is read with escapes.
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as err:
            if "decode" not in str(err):
                raise
        self._db.text_factory = _escaped_text
        try:
            return self._db.execute(sql, args).fetchall()
        finally:
            self._db.text_factory = str

    def _select(
        self,
        sql: str,
        args: Sequence[Any] = (),
        loose: bool = False,
        park: int | None = None,
    ) -> list[Invocation]:
        """Rows of ``sql`` as invocations (``loose``: what does not parse kept as text;
        envelopes longer than ``park`` left out, ``parked``).

        Rows are parsed as the cursor yields them, so a parked envelope's text is
        never held for long; rows that do not parse are quarantined afterwards.
        """
        with self._lock:
            try:
                if loose:
                    return [loose_row(r) for r in self._rows(sql, args)]
                try:
                    invs, bad = _parsed(self._db.execute(sql, args), park)
                except sqlite3.OperationalError as err:
                    if "decode" not in str(err):
                        raise
                    invs, bad = _parsed(self._rows(sql, args), park)  # a damaged row's text
            except sqlite3.Error as err:
                raise JournalError(f"journal {self.path}: {err}") from err
        if bad:
            self._quarantine_rows(bad)
        return invs

    def _parse(self, rows: Iterable[sqlite3.Row], park: int | None = None) -> list[Invocation]:
        """The rows that parse as invocations; the others are quarantined as dead letters."""
        invs, bad = _parsed(rows, park)
        if bad:
            self._quarantine_rows(bad)
        return invs

    def _quarantine_rows(self, bad: list[tuple[str, int]]) -> None:
        with self._transaction() as db:
            for reason, n in bad:
                log.error("journal %s: row %d cannot be read, moved to the dead letters: %s",
                          self.path, n, reason)  # fmt: skip
                db.execute(
                    f"INSERT OR REPLACE INTO dead_letters ({COLS}, died_at) SELECT {COLS}, ?"
                    " FROM invocations WHERE n=?",
                    (time.time(), n),
                )
                db.execute(
                    "UPDATE dead_letters SET last_error=? WHERE id=(SELECT id FROM invocations"
                    " WHERE n=?)",
                    (encodable(reason), n),
                )
                db.execute("DELETE FROM invocations WHERE n=?", (n,))

    def pending(self) -> list[Invocation]:
        """Unfinished invocations (pending, running, requeued) in the order they were written.

        A row that cannot be read is moved to the dead letters with the reason (and logged).

        Envelopes longer than ``PARK_BYTES`` stay in the file (``parked``): ``envelope`` reads
        each back when its invocation runs.
        """
        marks = ", ".join("?" * len(UNFINISHED))
        return self._select(
            f"SELECT * FROM invocations WHERE status IN ({marks}) ORDER BY n",
            UNFINISHED,
            park=PARK_BYTES,
        )

    def envelope(self, row: int) -> dict[str, Any] | None:
        """The envelope of unfinished row ``row`` (None if the row is gone)."""
        with self._lock:
            try:
                found = self._db.execute(
                    "SELECT envelope FROM invocations WHERE n = ?", (row,)
                ).fetchone()
            except sqlite3.Error as err:
                raise JournalError(f"journal {self.path}: {err}") from err
        return None if found is None else dict(json.loads(found[0]))

    def claim_requeued(self) -> list[Invocation]:
        """Take the rows ``dlq retry`` sent back: they become ``pending`` and are returned."""
        with self._transaction() as db:
            rows = self._rows("SELECT * FROM invocations WHERE status = 'requeued' ORDER BY n")
            db.execute("UPDATE invocations SET status = 'pending' WHERE status = 'requeued'")
        claimed = self._parse(rows)
        for inv in claimed:
            inv.status = "pending"
        return claimed

    def get(self, inv_id: str) -> Invocation | None:
        """The row of one invocation, from either table (``status`` says which)."""
        for table in ("invocations", "dead_letters"):
            found = self._select(f"SELECT * FROM {table} WHERE id = ?", (inv_id,), loose=True)
            if found:
                return found[0]
        return None

    def dead_letters(self) -> list[Invocation]:
        """Every dead letter, oldest first (a damaged one with its unreadable parts as text)."""
        return self._select("SELECT * FROM dead_letters ORDER BY died_at, rowid", loose=True)

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
                    f"INSERT INTO invocations ({COLS}) SELECT {REQUEUED_SELECT} FROM dead_letters"
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
        """Close the database (a checkpoint folds the WAL back into the file) and unlock."""
        with self._lock:
            self._db.close()
            self._unlock()

    def _unlock(self) -> None:
        if self._lockfile is not None:
            os.close(self._lockfile)  # closing drops the flock
            self._lockfile = None


def _escaped_text(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def _refusal(path: Path, what: str) -> str:
    """The one line that refuses a journal: ``what`` and the way to start over on purpose."""
    return f"{what}; to start over on purpose, move it away (mv {path} {path}.broken)"


def _create_tables(db: sqlite3.Connection) -> None:
    for statement in SCHEMA:
        db.execute(statement)
    db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))


def _create(path: Path) -> None:
    """A new journal, made beside ``path`` and renamed into place.

    So a journal file is never seen half made: an empty one was emptied. The
    directory is synced, so the name outlives a power cut as the rows do.
    """
    temp = path.with_name(f"{path.name}.new-{os.getpid()}")
    db = sqlite3.connect(temp, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("BEGIN IMMEDIATE")
        _create_tables(db)
        db.execute("COMMIT")
    finally:
        db.close()  # folds the WAL back in and removes it
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _lock_beside(path: Path) -> int:
    """Take ``<path>.lock`` (flock, released by the kernel if the process dies)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"the journal {path} is in use by another qmp-reactor (its lock {path}.lock is held)"
        ) from None
    except OSError:
        os.close(fd)
        raise
    return fd


def _parsed(
    rows: Iterable[sqlite3.Row], park: int | None
) -> tuple[list[Invocation], list[tuple[str, int]]]:
    """The rows that parse as invocations, and (reason, row) for those that do not."""
    invs, bad = [], []
    for row in rows:
        try:
            invs.append(from_row(row, park))
        except Exception as err:  # whatever a damaged row makes the parser raise
            bad.append((f"quarantined: unreadable row: {type(err).__name__}: {err}", row["n"]))
    return invs, bad
