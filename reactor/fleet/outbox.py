"""The publisher's durable outbox: events waiting for NATS, in their own SQLite file.

``nats-outbox.sqlite3`` in the state directory (0600), apart from the action
journal. Rows keep arrival order; a row's message id is
``<host>:<source>:<epoch>.<n>``: ``n`` is its row number (never reused, SQLite's
AUTOINCREMENT) and ``epoch`` a random tag made with the file, so a re-sent row
has the id it had, and a new file never repeats an old id. The backlog is
bounded by ``max_bytes`` of payload: past it ``add`` refuses rows and counts
them ``dropped`` (the oldest events, already waiting, are kept).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FILENAME = "nats-outbox.sqlite3"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (epoch TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS messages (n INTEGER PRIMARY KEY AUTOINCREMENT,"
    " subject TEXT NOT NULL, stem TEXT NOT NULL, payload BLOB NOT NULL)",
)


@dataclass(frozen=True, slots=True)
class Message:
    """One row: its number, subject, message id and payload."""

    n: int
    subject: str
    msg_id: str
    payload: bytes


class Outbox:
    """The outbox file; its methods block (call them from a worker thread)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.dropped = 0
        self._lock = threading.Lock()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        for sql in SCHEMA:
            self._db.execute(sql)
        row = self._db.execute("SELECT epoch FROM meta").fetchone()
        if row is None:
            self.epoch = secrets.token_hex(4)
            self._db.execute("INSERT INTO meta VALUES (?)", (self.epoch,))
        else:
            self.epoch = str(row[0])
        count, size = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages"
        ).fetchone()
        self.count, self.bytes = int(count), int(size)

    def add(self, rows: Sequence[tuple[str, str, bytes]]) -> int:
        """Append ``(subject, stem, payload)`` rows that fit; how many were added."""
        with self._lock:
            room = self.max_bytes - self.bytes
            fit = []
            for row in rows:
                if len(row[2]) > room:
                    self.dropped += 1
                    continue
                room -= len(row[2])
                fit.append(row)
            if fit:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO messages (subject, stem, payload) VALUES (?, ?, ?)", fit
                )
                self._db.execute("COMMIT")
                self.count += len(fit)
                self.bytes += sum(len(r[2]) for r in fit)
            return len(fit)

    def head(self, limit: int) -> list[Message]:
        """The oldest ``limit`` rows."""
        with self._lock:
            rows = self._db.execute(
                "SELECT n, subject, stem, payload FROM messages ORDER BY n LIMIT ?", (limit,)
            ).fetchall()
        return [
            Message(n, subject, f"{stem}:{self.epoch}.{n}", bytes(p))
            for n, subject, stem, p in rows
        ]

    def remove(self, done: Sequence[Message]) -> None:
        """Forget rows that were published."""
        if not done:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM messages WHERE n = ?", [(m.n,) for m in done])
            self._db.execute("COMMIT")
            self.count -= len(done)
            self.bytes -= sum(len(m.payload) for m in done)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


def outbox_path(state_dir: Path) -> Path:
    """Where the outbox of ``state_dir`` lives."""
    return state_dir / FILENAME
