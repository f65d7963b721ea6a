"""Group commit in front of the journal: many invocations, one transaction.

``submit`` runs in the event loop and must not wait for a disk; a commit per
invocation could not keep up with thousands of events a second anyway. So new
rows, state changes and dead letters collect here in memory, and one writer task
applies them in a single transaction (in a worker thread, so the loop keeps
reading events). Only after the commit returned does the writer hand the new
invocations back to be started: nothing runs before its row is on disk.

Batches form by themselves: while one transaction is being written the next
collects, so an idle system writes a lone row at once and a busy one writes
thousands per commit (at most ``max_rows`` new rows each).

A failed write (disk full, read-only state directory) keeps the batch in
memory, sets ``healthy`` to false, logs once per failure streak and retries
with backoff; the work it held is delayed, not lost. A row that cannot be
written at all (the journal says which) is not retried: the journal makes it a
dead letter in the same transaction, and it never runs.

Overload is another matter: a healthy journal that cannot keep up with the
events. Past ``high_water`` unwritten rows, ``backpressure()`` makes its callers
(the readers of the QMP sockets) wait until the writer is back under
``low_water``, so the events wait in the sockets rather than the firings being
refused. A failing journal opens the gate again: then it is the dispatcher's
``max_unwritten`` that decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from reactor.dispatch.journal import Invocation, Journal, JournalBatch, JournalError

log = logging.getLogger(__name__)

OnCommitted = Callable[[], None]


@dataclass(slots=True)
class _Pending:
    groups: deque[tuple[list[Invocation], OnCommitted | None]] = field(default_factory=deque)
    rows: int = 0
    batch: JournalBatch = field(default_factory=JournalBatch)

    def __len__(self) -> int:
        return self.rows + len(self.batch)

    def take(self, max_rows: int) -> _Pending:
        """Split off the first whole groups (about ``max_rows`` new rows) and every change."""
        taken = _Pending(batch=self.batch)
        self.batch = JournalBatch()
        while self.groups and taken.rows < max_rows:
            group = self.groups.popleft()
            taken.groups.append(group)
            taken.rows += len(group[0])
        self.rows -= taken.rows
        taken.batch.inserts = [inv for invs, _ in taken.groups for inv in invs]
        return taken

    def put_back(self, newer: _Pending) -> None:
        """Make this unwritten batch the head again, followed by ``newer``'s writes."""
        self.batch.inserts = []
        self.batch.absorb(newer.batch)
        self.groups.extend(newer.groups)
        self.rows += newer.rows


class Outbox:
    """Collects journal writes and applies them in group commits (see the module docstring).

    With ``journal=None`` nothing is written; new invocations are started on the
    writer's next turn, so the in-memory mode runs the same code paths.
    """

    def __init__(
        self,
        journal: Journal | None,
        *,
        max_rows: int = 5000,
        poll_interval: float = 2.0,
        on_requeued: Callable[[list[Invocation]], None] | None = None,
        retry_delays: tuple[float, float] = (0.1, 5.0),
        high_water: int = 2_000,
    ) -> None:
        self.journal = journal
        self.max_rows = max_rows
        self.poll_interval = poll_interval
        self.on_requeued = on_requeued
        self.retry_delays = retry_delays
        self.healthy = True
        self.high_water = high_water
        self.low_water = high_water // 2
        self._room = asyncio.Event()
        self._room.set()
        self.last_error: str | None = None
        self.dead_letters = 0
        self._pending = _Pending()
        self._wake = asyncio.Event()
        self._written = asyncio.Event()
        self._writing = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def unwritten(self) -> int:
        """New rows accepted and not yet committed."""
        return self._pending.rows

    @property
    def running(self) -> bool:
        """Whether the writer task is running (started and not ended)."""
        return self._task is not None and not self._task.done()

    @property
    def busy(self) -> bool:
        """Whether writes are queued or being written."""
        return bool(len(self._pending)) or self._writing

    def insert(self, invs: list[Invocation], then: OnCommitted | None = None) -> None:
        """Queue new rows; ``then`` is called in the loop once they are committed."""
        self._pending.groups.append((invs, then))
        self._pending.rows += len(invs)
        self._wake.set()
        if self._pending.rows > self.high_water and self.healthy:
            self._room.clear()

    def backpressure(self) -> asyncio.Event | None:
        """None while there is room; else an Event set once an overloaded journal has some."""
        return None if self._room.is_set() else self._room

    def update(self, inv: Invocation) -> None:
        """Queue the current state (status, attempts, error, times) of a written row."""
        inv.updated_at = time.time()
        if self.journal is not None:
            self._pending.batch.updates[inv.id] = inv
            self._wake.set()

    def bury(self, inv: Invocation) -> None:
        """Queue the move of a written row to the dead letters."""
        inv.updated_at = time.time()
        if self.journal is not None:
            self._pending.batch.dead[inv.id] = inv
            self.dead_letters += 1
            self._wake.set()

    def start(self) -> None:
        """Start the writer task on the running loop."""
        if self.journal is not None:
            self.dead_letters = self.journal.count(dead=True)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="journal-writer")

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (or the writer stopped)."""
        while (len(self._pending) or self._writing) and self._task and not self._task.done():
            self._written.clear()
            await self._written.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (for at most ``timeout`` s if the journal fails), then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self.journal is not None and len(self._pending):
            log.error(
                "journal %s: %d new invocations and %d state changes not saved at shutdown (%s)",
                self.journal.path, self._pending.rows, len(self._pending.batch),
                self.last_error or "the writer never started",
            )  # fmt: skip

    async def _run(self) -> None:
        next_poll = time.monotonic()
        delay = self.retry_delays[0]
        while not (self._closing and not len(self._pending)):
            if time.monotonic() >= next_poll and not self._closing:
                await self._poll()
                next_poll = time.monotonic() + self.poll_interval
            if not len(self._pending):
                if self._closing:
                    continue  # stop() may have come while we polled: do not sleep on it
                self._wake.clear()
                try:
                    async with asyncio.timeout(max(0.0, next_poll - time.monotonic())):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            if await self._flush():
                delay = self.retry_delays[0]
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_delays[1])
        self._written.set()

    async def _flush(self) -> bool:
        taken = self._pending.take(self.max_rows)
        if self._pending.rows <= self.low_water:
            self._room.set()
        self._writing = True
        try:
            if self.journal is not None:
                # The statements cost CPU, best spent here; the commit waits for the disk.
                self.journal.stage(taken.batch)
                await asyncio.to_thread(self.journal.commit)
        except Exception as err:
            if not isinstance(err, JournalError):  # a bug of ours: say so, but keep the work
                log.exception("journal write raised a bug")
            taken.put_back(self._pending)
            self._pending = taken
            self._failed(err)
            return False
        finally:
            self._writing = False
        self._recovered()
        self.dead_letters += len(taken.batch.quarantined)
        for _, then in taken.groups:
            if then is not None:
                then()
        self._written.set()
        return True

    async def _poll(self) -> None:
        # Requeued dead letters come from another process (the dlq command); also prune.
        if self.journal is None:
            return
        try:
            claimed = await asyncio.to_thread(self.journal.claim_requeued)
            await asyncio.to_thread(self.journal.prune)
            self.dead_letters = await asyncio.to_thread(self.journal.count, True)
        except JournalError as err:
            self._failed(err)
            return
        if not len(self._pending):  # else the next flush tells whether writes work again
            self._recovered()
        if claimed and self.on_requeued is not None:
            self.on_requeued(claimed)

    def _failed(self, err: Exception) -> None:
        if self.healthy:
            log.error("journal write failed, keeping %d rows in memory and retrying: %s",
                      len(self._pending), err)  # fmt: skip
        self.healthy = False
        self._room.set()  # failing, not overloaded: max_unwritten decides, readers go on
        self.last_error = str(err)

    def _recovered(self) -> None:
        if not self.healthy:
            log.warning("journal writable again: %s", self.journal.path if self.journal else "-")
        self.healthy = True
        self.last_error = None
