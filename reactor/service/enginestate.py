"""Durable engine state: windows, held events and pending firsts kept across restarts.

``<state_dir>/engine-state.sqlite3`` holds the engine's parts
(``reactor.engine.state``) as JSON, each with the wall-clock time it was
written. ``StateKeeper`` writes the parts that changed every ``interval``
seconds, off the event loop (the engine is read on the loop, SQLite is written
in a worker thread), and once more when the sidecar stops; a kill -9 loses at
most the last interval. At start it reads them back: the time the sidecar was
down is measured on the wall clock saved with the state, so windows that ended
meanwhile are settled at once (a held event or a due firing goes out then,
logged as late; an ``absent`` whose deadline passed fires), while running,
the engine's monotonic clock rules. Plugins keep their own state in the same
file, each in a namespace of its own (``PluginStore``, given to them by the
``reactor_state`` hook).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reactor.engine import state
from reactor.engine.core import Engine

log = logging.getLogger(__name__)

FILE_NAME = "engine-state.sqlite3"
INTERVAL = 0.1
"""Seconds between two writes of what changed (what a kill -9 may lose at most)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS parts (name TEXT PRIMARY KEY, doc TEXT NOT NULL, wall REAL NOT NULL);
CREATE TABLE IF NOT EXISTS plugin_state (namespace TEXT NOT NULL, key TEXT NOT NULL,
    value TEXT NOT NULL, wall REAL NOT NULL, PRIMARY KEY (namespace, key));
CREATE TABLE IF NOT EXISTS fed (consumer TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (consumer, seq));
"""
Fed = tuple[str, int]
"""A stream message the engine has seen, written with the state it made: (consumer, sequence)."""


def state_path(state_dir: Path) -> Path:
    """Where a state directory keeps the engine's state."""
    return state_dir / FILE_NAME


class StateFile:
    """The SQLite file; one connection, used by one thread at a time (a lock says so)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        with contextlib.suppress(OSError):
            path.chmod(0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def parts(self) -> dict[str, tuple[Any, float]]:
        """Every part written: name → (document, wall-clock time written)."""
        with self._lock:
            rows = self._db.execute("SELECT name, doc, wall FROM parts").fetchall()
        found = {}
        for name, doc, wall in rows:
            try:
                found[name] = (json.loads(doc), wall)
            except ValueError:
                log.warning("%s: part %s is not JSON: ignored", self.path, name)
        return found

    def write(
        self,
        changed: Mapping[str, str],
        gone: list[str],
        wall: float,
        fed: Sequence[Fed] = (),
        acked: Sequence[Fed] = (),
    ) -> None:
        """Replace the ``changed`` parts (JSON text), delete the ``gone`` ones, in one commit,
        with the stream messages ``fed`` to the engine added and the ``acked`` ones removed."""
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                db.executemany(
                    "INSERT OR REPLACE INTO parts (name, doc, wall) VALUES (?, ?, ?)",
                    [(name, doc, wall) for name, doc in changed.items()],
                )
                db.executemany("DELETE FROM parts WHERE name = ?", [(name,) for name in gone])
                db.executemany("INSERT OR IGNORE INTO fed VALUES (?, ?)", fed)
                db.executemany("DELETE FROM fed WHERE consumer = ? AND seq = ?", acked)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def fed(self, consumer: str, floor: int) -> set[int]:
        """The sequences of ``consumer``'s messages fed but perhaps not acked (those above
        ``floor``, the stream's own acknowledgement floor; the others are forgotten)."""
        with self._lock:
            self._db.execute("DELETE FROM fed WHERE consumer = ? AND seq <= ?", (consumer, floor))
            rows = self._db.execute("SELECT seq FROM fed WHERE consumer = ?", (consumer,))
            return {int(seq) for (seq,) in rows.fetchall()}

    def plugin_rows(self, namespace: str) -> list[tuple[str, str, float]]:
        """Every key of ``namespace``: (key, JSON text, wall-clock time written), by key."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value, wall FROM plugin_state WHERE namespace = ? ORDER BY key",
                (namespace,),
            ).fetchall()
        return [(str(key), str(value), float(wall)) for key, value, wall in rows]

    def plugin_row(self, namespace: str, key: str) -> tuple[str, float] | None:
        """``key`` of ``namespace``: (JSON text, wall-clock time written), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT value, wall FROM plugin_state WHERE namespace = ? AND key = ?",
                (namespace, key),
            ).fetchone()
        return None if row is None else (str(row[0]), float(row[1]))

    def put_plugin_row(self, namespace: str, key: str, value: str, wall: float) -> None:
        """Replace ``key`` of ``namespace`` with the JSON text ``value`` (committed at once)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO plugin_state (namespace, key, value, wall) "
                "VALUES (?, ?, ?, ?)",
                (namespace, key, value, wall),
            )

    def delete_plugin_row(self, namespace: str, key: str) -> None:
        """Forget ``key`` of ``namespace`` (nothing if it is not there)."""
        with self._lock:
            self._db.execute(
                "DELETE FROM plugin_state WHERE namespace = ? AND key = ?", (namespace, key)
            )

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


class PluginStore:
    """One plugin's namespace of the state file: JSON values under string keys.

    What ``reactor_state`` gets (``reactor.plugins.api.PluginState``). Each
    ``put`` and ``delete`` is committed before it returns; a value that is not
    JSON (or a key that is not a string) raises ``TypeError``/``ValueError``
    and nothing is written. A value in the file that is not JSON reads as absent.
    """

    def __init__(self, file: StateFile, namespace: str) -> None:
        self._file = file
        self.namespace = namespace

    def get(self, key: str) -> Any | None:
        """The value kept under ``key``, or None."""
        row = self._file.plugin_row(self.namespace, key)
        return None if row is None else self._load(key, row[0])

    def put(self, key: str, value: Any) -> None:
        """Keep ``value`` under ``key`` (written and committed now, with the wall-clock time)."""
        if not isinstance(key, str):
            raise TypeError(f"a state key is a string, not {type(key).__name__}")
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        self._file.put_plugin_row(self.namespace, key, text, time.time())

    def delete(self, key: str) -> None:
        """Forget ``key``."""
        self._file.delete_plugin_row(self.namespace, key)

    def items(self) -> list[tuple[str, Any]]:
        """Every (key, value) of this namespace, by key."""
        return [(key, value) for key, value, _ in self.entries()]

    def written(self, key: str) -> float | None:
        """When ``key`` was last written (wall clock, ``time.time``), or None."""
        row = self._file.plugin_row(self.namespace, key)
        return None if row is None else row[1]

    def entries(self) -> list[tuple[str, Any, float]]:
        """Every (key, value, wall-clock time written) of this namespace, by key."""
        found = []
        for key, text, wall in self._file.plugin_rows(self.namespace):
            value = self._load(key, text)
            if value is not None:
                found.append((key, value, wall))
        return found

    def _load(self, key: str, text: str) -> Any | None:
        try:
            return json.loads(text)
        except ValueError:
            log.warning("%s: state %s of plugin %s is not JSON: ignored", self._file.path,
                        key, self.namespace)  # fmt: skip
            return None


class StateKeeper:
    """Keeps one engine's state in a ``StateFile``: restored at start, written as it changes.

    Times are written relative to one base moment per keeper (its clock reading
    and the wall clock then), so a part that did not change reads the same and
    is not written again. A part whose holder's ``changes`` did not move since the
    last write is not even read: a write costs what changed, not what is held.
    """

    def __init__(self, engine: Engine, file: StateFile, interval: float = INTERVAL) -> None:
        self.engine = engine
        self.file = file
        self.interval = interval
        self._base, self._wall = engine.clock.now(), time.time()
        self._written: dict[str, str] = {}
        """Each part in the file: name → its JSON text as written ("": not known)."""
        self._marks: dict[str, tuple[state.Holder, int]] = {}
        """Each part's holder and its ``changes`` when it was last read."""
        self._holders: list[tuple[str, state.Holder]] = []
        self._rules: object = None
        self._task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        """Held while the state must not be written: a stream batch fed, not yet saved."""

    def restore(self) -> list[str]:
        """Open the parts the file holds on the engine; returns the names taken.

        Call before the first event. Parts of rules that changed or went away are
        dropped from the file at the next write.
        """
        found = self.file.parts()
        clock_now, wall_now = self.engine.clock.now(), time.time()
        taken: list[str] = []
        for name, (doc, wall) in found.items():
            # The part's times are relative to a moment that long ago.
            base = clock_now - max(0.0, wall_now - wall)
            self._written[name] = ""  # in the file: written again, or deleted, next time
            try:
                for what in state.overdue(self.engine, name, doc, base, clock_now):
                    log.warning("late: rule %s: %s, ended while the sidecar was down", name, what)
                taken += state.restore(self.engine, {name: doc}, base)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
                # A part of another shape (a damaged file, another version): its state is
                # lost, the sidecar is not.
                log.warning("%s: part %s unreadable (%s: %s): ignored", self.file.path, name,
                            type(err).__name__, err)  # fmt: skip
        if found:
            log.info(
                "engine state: %d parts restored, %d of changed or removed rules dropped",
                len(taken), len(found) - len(taken),
            )  # fmt: skip
        return taken

    def start(self) -> None:
        """Write what changes every ``interval`` seconds, from a task of the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-state")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            async with self.lock:
                try:
                    await self.save()
                except sqlite3.Error as err:
                    log.error("engine state not written: %s", err)

    async def save(self, fed: Sequence[Fed] = (), acked: Sequence[Fed] = ()) -> None:
        """Write what changed now, with the stream messages ``fed`` and ``acked``
        (``reactor.fleet.central`` holds ``lock`` from feeding a batch to this)."""
        changes = self._changes()
        if changes is None and not fed and not acked:
            return
        changed, gone, wall = changes or ({}, [], self._wall)
        try:
            await asyncio.to_thread(self.file.write, changed, gone, wall, fed, acked)
        except sqlite3.Error:
            # What the file holds is not known: every part is written again, or deleted.
            self._written = dict.fromkeys([*self._written, *gone], "")
            self._marks.clear()
            raise

    def _changes(self) -> tuple[dict[str, str], list[str], float] | None:
        """The parts that changed since the last write and those gone (None: no change)."""
        written, marks = self._written, self._marks
        changed: dict[str, str] = {}
        gone: list[str] = []
        now: dict[str, tuple[state.Holder, int]] = {}
        for name, holder in self._current():
            mark = now[name] = (holder, holder.changes)
            before = marks.get(name)
            if before is not None and before[0] is holder and before[1] == mark[1]:
                continue
            doc = state.part(holder, self._base)
            if doc is None:
                if written.pop(name, None) is not None:
                    gone.append(name)
                continue
            text = json.dumps(doc, separators=(",", ":"), default=str)
            if written.get(name) != text:
                changed[name] = written[name] = text
        gone += [name for name in written if name not in now]
        for name in gone:
            written.pop(name, None)
        self._marks = now
        if not changed and not gone:
            return None
        return changed, gone, self._wall

    def _current(self) -> list[tuple[str, state.Holder]]:
        """The engine's parts and their holders (named again only after a reload)."""
        if self.engine.rules is not self._rules:
            self._rules = self.engine.rules
            self._holders = list(state.holders(self.engine))
        return self._holders

    async def stop(self) -> None:
        """Stop the task and write the state as it is now (the sidecar stops)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        changes = self._changes()
        if changes is not None:
            self.file.write(*changes)
