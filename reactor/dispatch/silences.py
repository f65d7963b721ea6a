"""Silences: "no actions for web-1 for two hours", without editing rules.

A silence matches firings by globs on the VM, the rule and the event, between
its start and its end (wall-clock seconds). Silences live in
``<state_dir>/silences.sqlite3``, written by ``qmp-reactor silence`` and read by
the running sidecar: ``SilenceFilter`` looks at the file's identity before each
firing (one ``stat``) and reloads it when another process changed it, so a new
or expired silence applies at once, without a reload. A silenced firing never
becomes an invocation: it is logged and counted, not journaled. Silences end by
themselves; expired ones stay listed (``silence list --all``) until
``silence expire`` or a cleanup removes them after a week.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from reactor.model import Firing

log = logging.getLogger(__name__)

FILE_NAME = "silences.sqlite3"
KEEP_EXPIRED = 7 * 86400.0
"""Seconds an expired silence stays listed before ``add`` cleans it up."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS silences (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    rule TEXT NOT NULL,
    event TEXT NOT NULL,
    starts REAL NOT NULL,
    ends REAL NOT NULL,
    comment TEXT NOT NULL,
    created_by TEXT NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class Silence:
    """One silence: globs on VM, rule and event, and when it holds (``[starts, ends)``)."""

    id: str
    vm: str
    rule: str = "*"
    event: str = "*"
    starts: float = 0.0
    ends: float = float("inf")
    comment: str = ""
    created_by: str = ""

    def active(self, now: float) -> bool:
        """Whether the silence holds at ``now``."""
        return self.starts <= now < self.ends

    def matches(self, vm: str, rule: str, event: str, now: float) -> bool:
        """Whether it silences a firing of ``rule`` for ``vm`` on ``event`` at ``now``."""
        return (
            self.active(now)
            and fnmatch.fnmatchcase(vm, self.vm)
            and fnmatch.fnmatchcase(rule, self.rule)
            and fnmatch.fnmatchcase(event, self.event)
        )


def silence_path(state_dir: Path) -> Path:
    """Where a state directory keeps its silences."""
    return state_dir / FILE_NAME


class SilenceStore:
    """The silences file: add, list, expire. Each call opens and closes the database."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        # A rollback journal (not WAL): every commit changes the file itself, which
        # is what a running sidecar watches.
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute(_SCHEMA)
        os.chmod(self.path, 0o600)
        return db

    def add(self, silence: Silence) -> Silence:
        """Store ``silence`` (with a new id if it has none); drops long-expired ones."""
        if not silence.id:
            silence = Silence(
                secrets.token_hex(4),
                silence.vm,
                silence.rule,
                silence.event,
                silence.starts,
                silence.ends,
                silence.comment,
                silence.created_by,
            )
        with contextlib.closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM silences WHERE ends < ?", (time.time() - KEEP_EXPIRED,))
            db.execute(
                "INSERT INTO silences VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    silence.id,
                    silence.vm,
                    silence.rule,
                    silence.event,
                    silence.starts,
                    _finite(silence.ends),
                    silence.comment,
                    silence.created_by,
                ),
            )
            db.execute("COMMIT")
        return silence

    def all(self) -> list[Silence]:
        """Every stored silence, active or not, oldest first; [] without a file."""
        if not self.path.exists():
            return []
        with contextlib.closing(self._connect()) as db:
            rows = db.execute(
                "SELECT id, vm, rule, event, starts, ends, comment, created_by "
                "FROM silences ORDER BY starts, id"
            ).fetchall()
        return [Silence(*row) for row in rows]

    def expire(self, ident: str, now: float | None = None) -> Silence | None:
        """End the silence whose id is (or starts with) ``ident`` now; None if none or several."""
        found = [s for s in self.all() if s.id.startswith(ident)]
        if len(found) != 1:
            return None
        moment = time.time() if now is None else now
        with contextlib.closing(self._connect()) as db:
            db.execute(
                "UPDATE silences SET ends = MIN(ends, ?) WHERE id = ?", (moment, found[0].id)
            )
        return found[0]


class SilenceFilter:
    """Drops silenced firings before they reach ``sink``; re-reads the file when it changes.

    ``now(firing)`` gives the wall-clock time a firing is judged at: ``time.time()``
    live, the firing's own (virtual) time in a replay.
    """

    def __init__(
        self,
        silences: Iterable[Silence] = (),
        *,
        path: Path | None = None,
        now: Callable[[Firing], float] | None = None,
        on_silenced: Callable[[Firing, Silence], None] | None = None,
    ) -> None:
        self.path = path
        self._fixed = tuple(silences)
        self._loaded: tuple[Silence, ...] = ()
        self._identity: tuple[int, int, int] | None = None
        self._now = now or (lambda firing: time.time())
        self._on_silenced = on_silenced
        self.silenced = 0
        """Firings dropped so far."""

    def silences(self) -> tuple[Silence, ...]:
        """The silences in force: the fixed ones, then the file's (re-read when changed)."""
        if self.path is not None:
            self._refresh(self.path)
        return self._fixed + self._loaded

    def _refresh(self, path: Path) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._loaded, self._identity = (), None
            return
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        if identity == self._identity:
            return
        try:
            self._loaded = tuple(SilenceStore(path).all())
        except sqlite3.Error as err:
            log.warning("silences in %s cannot be read, keeping the last ones: %s", path, err)
            return
        self._identity = identity

    def match(self, firing: Firing) -> Silence | None:
        """The silence that holds for ``firing``, if any."""
        found = self.silences()
        if not found:
            return None
        env = firing.envelope
        vm, event, now = str(env.get("vm", "")), str(env.get("event", "")), self._now(firing)
        for silence in found:
            if silence.matches(vm, firing.rule.name, event, now):
                return silence
        return None

    def wrap(self, sink: Callable[[Firing], object]) -> Callable[[Firing], None]:
        """``sink`` for the firings no silence holds; the others are logged and counted."""

        def filtered(firing: Firing) -> None:
            silence = self.match(firing)
            if silence is None:
                sink(firing)
                return
            self.silenced += 1
            if self._on_silenced is not None:
                self._on_silenced(firing, silence)

        return filtered


def log_silenced(firing: Firing, silence: Silence) -> None:
    """The log line for a silenced firing (its actions are not run nor journaled)."""
    env = firing.envelope
    log.info(
        "silenced: rule %s for %s on %s by silence %s (%s)",
        firing.rule.name,
        env.get("vm"),
        env.get("event"),
        silence.id,
        silence.comment or "no comment",
    )


def _finite(value: float) -> float:
    return value if value != float("inf") else 1e18
