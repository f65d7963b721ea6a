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
the engine's monotonic clock rules. The restart guard's history lives in the
same file (``RestartHistoryStore``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reactor.actions.restart_vm import Restart
from reactor.engine import state
from reactor.engine.core import Engine

log = logging.getLogger(__name__)

FILE_NAME = "engine-state.sqlite3"
INTERVAL = 0.1
"""Seconds between two writes of what changed (what a kill -9 may lose at most)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS parts (name TEXT PRIMARY KEY, doc TEXT NOT NULL, wall REAL NOT NULL);
CREATE TABLE IF NOT EXISTS restart_history (
    vm TEXT PRIMARY KEY, restarts TEXT NOT NULL, wall REAL NOT NULL
);
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

    def restart_history(self, since: float) -> dict[str, list[dict[str, Any]]]:
        """Each VM's restarts (``Restart`` fields, wall-clock times), of VMs restarted after
        ``since``; older VMs' histories are deleted."""
        with self._lock:
            self._db.execute("DELETE FROM restart_history WHERE wall <= ?", (since,))
            rows = self._db.execute("SELECT vm, restarts FROM restart_history").fetchall()
        found: dict[str, list[dict[str, Any]]] = {}
        for vm, text in rows:
            try:
                found[vm] = list(json.loads(text))
            except ValueError:
                log.warning("%s: restart history of %s is not JSON: ignored", self.path, vm)
        return found

    def save_restart_history(self, vm: str, restarts: list[dict[str, Any]], wall: float) -> None:
        """Replace ``vm``'s restarts (written at once: a restart must not be forgotten)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO restart_history (vm, restarts, wall) VALUES (?, ?, ?)",
                (vm, json.dumps(restarts), wall),
            )

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


class RestartHistoryStore:
    """The restart guard's ``RestartHistory`` in the state file, on the wall clock.

    A guard given this store counts on ``time.time`` (``RestartGuard.attach``), so
    the times it keeps mean the same after the sidecar restarts.
    """

    KEEP = 86400.0
    """Seconds a VM's history is kept after its last restart (longer than any window)."""

    def __init__(self, file: StateFile) -> None:
        self._file = file
        self._cache = {
            vm: tuple(Restart(**r) for r in rows)
            for vm, rows in file.restart_history(time.time() - self.KEEP).items()
        }

    def load(self, vm: str) -> tuple[Restart, ...]:
        """The restarts kept for ``vm``."""
        return self._cache.get(vm, ())

    def save(self, vm: str, restarts: tuple[Restart, ...]) -> None:
        """Replace the restarts kept for ``vm``, in memory and in the file."""
        self._cache[vm] = restarts
        rows = [dataclasses.asdict(r) for r in restarts]
        self._file.save_restart_history(vm, rows, time.time())


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
