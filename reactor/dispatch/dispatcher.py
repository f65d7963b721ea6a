"""The dispatcher: turns firings into journaled invocations and runs them.

``submit`` is synchronous and cheap: it makes one ``Invocation`` per action of
the firing, queues the rows for the next group commit (``reactor.dispatch.groupcommit``) and
returns; reading events never waits for an action. Once the rows are on disk
the firing's run starts: its actions one after another, each to its end (done,
or dead-lettered; a failed action does not stop the next one).

A rule's ``mode`` says what a new firing does while the rule's last run for
the same VM is still going (Home Assistant's automation modes):

* ``queued`` (default): runs after it; one lane per (rule, VM) keeps event order.
* ``single``: is ignored; its rows are written as ``skipped``, outcome ``suppressed``.
* ``restart``: cancels the running one (its rows become ``cancelled``, not retried).
* ``parallel``: runs at once.

On ``start`` the unfinished rows of the journal are resumed with their ids and
attempt counts, in the order they were written (a resumed run of any mode but
``parallel`` queues in its lane). The dispatcher polls the journal for rows that
``qmp-reactor dlq retry`` sent back. Delivery is at least once: an action cut
off by a crash runs again, with the same idempotency key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from reactor.dispatch.attempts import CANCELLED, Emit, Render, Runner, Sleep
from reactor.dispatch.groupcommit import Outbox
from reactor.dispatch.journal import ActionSpecData, Invocation, Journal, new_id
from reactor.model import Firing, RetryPolicy, Rule
from reactor.plugins.api import ActionSettings, ActionType, VmControl
from reactor.plugins.hookspecs import ActionOutcome

__all__ = ["ActionOutcome", "Dispatcher"]

log = logging.getLogger(__name__)

_FINISHED = frozenset({"done", "skipped", "cancelled", "dead", "failed"})
DEFAULT_RETRY = RetryPolicy()


@dataclass(eq=False, slots=True)
class _Run:
    """The invocations of one firing, run in action order."""

    invocations: list[Invocation]
    lane: _Lane
    mode: str
    cancelled: bool = False
    closed: bool = False
    task: asyncio.Task[None] | None = None


@dataclass(eq=False, slots=True)
class _Lane:
    """One (rule, VM): its open runs in firing order, and the queued ones waiting."""

    key: tuple[str, str]
    runs: list[_Run] = field(default_factory=list)
    queue: deque[_Run] = field(default_factory=deque)
    worker: asyncio.Task[None] | None = None


class Dispatcher:
    """Runs firings' actions through the journal (see the module docstring)."""

    def __init__(
        self,
        *,
        action_types: Mapping[str, ActionType],
        settings: ActionSettings,
        render: Render,
        journal: Journal | None,
        vm_lookup: Callable[[str, str | None], VmControl | None] = lambda vm, source: None,
        emit: Emit | None = None,
        on_outcome: Callable[[ActionOutcome], None] | None = None,
        redact: Callable[[str], str] = lambda s: s,
        default_retry: RetryPolicy = DEFAULT_RETRY,
        default_timeout: float = 30.0,
        max_concurrency: int = 64,
        per_type_limits: Mapping[str, int] | None = None,
        sleep: Sleep = asyncio.sleep,
        poll_interval: float = 2.0,
        max_unwritten: int = 100_000,
    ) -> None:
        """Nothing runs until ``start``; ``submit`` may be called before it.

        ``render(invocation, action_type)`` turns the raw params into the validated
        model (templates, secrets); it may be async; a ``PermanentActionError`` it
        raises dead-letters the invocation. ``max_unwritten``: new rows held in
        memory while the journal cannot be written; past it ``submit`` refuses.
        """
        self.default_retry = default_retry
        self.default_timeout = default_timeout
        self.max_unwritten = max_unwritten
        self.accepting = True
        self.rejected = 0
        self._outbox = Outbox(journal, poll_interval=poll_interval, on_requeued=self._resume)
        self._runner = Runner(
            action_types=action_types, settings=settings, render=render, outbox=self._outbox,
            vm_lookup=vm_lookup, emit=emit, on_outcome=on_outcome, redact=redact,
            max_concurrency=max_concurrency, per_type_limits=per_type_limits or {}, sleep=sleep,
        )  # fmt: skip
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._spec_cache: dict[int, tuple[Rule, list[ActionSpecData]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = 0
        self._started = False
        self._stopping = False
        self.firing_ids: Callable[[Firing], list[str] | None] | None = None
        """Where a firing's invocation ids come from when not at random: a source whose
        events can arrive twice (a redelivered stream message) gives the same ids again,
        so the repeat carries the same idempotency keys. None or a None answer: random."""

    def reconfigure(
        self,
        *,
        action_types: Mapping[str, ActionType],
        settings: ActionSettings,
        render: Render,
        default_retry: RetryPolicy,
        default_timeout: float,
        max_concurrency: int,
        per_type_limits: Mapping[str, int],
    ) -> None:
        """Use these from now on (a reload): firings accepted later get the new defaults;
        an invocation looks its action type up when it starts, and every attempt
        that starts later uses the new settings, renderer and limits."""
        self.default_retry = default_retry
        self.default_timeout = default_timeout
        self._spec_cache.clear()
        runner = self._runner
        runner.action_types, runner.settings, runner.render = action_types, settings, render
        runner.limit(max_concurrency, per_type_limits)

    @property
    def healthy(self) -> bool:
        """False while the journal cannot be written (the work waits in memory)."""
        return self._outbox.healthy

    @property
    def backlog(self) -> int:
        """Invocations accepted and not finished: waiting, running or backing off."""
        return self._open

    @property
    def in_flight(self) -> int:
        """Attempts running right now."""
        return self._runner.in_flight

    @property
    def dead_letters(self) -> int:
        """Rows in the journal's dead letters (refreshed every poll)."""
        return self._outbox.dead_letters

    def backpressure(self) -> asyncio.Event | None:
        """None while there is room; else an Event set once an overloaded journal has some."""
        return self._outbox.backpressure()

    def submit(self, firing: Firing) -> list[Invocation]:
        """Accept a firing's actions; returns their invocations, at once, without running them.

        Refused (an empty list, logged) after ``shutdown`` began or while too much
        unwritten work waits for a failing journal.
        """
        rule = firing.rule
        if not rule.actions:
            return []
        if not self.accepting or self._outbox.unwritten >= self.max_unwritten:
            self._refuse(firing)
            return []
        invs = self._invocations(firing)
        lane = self._lane((rule.name, invs[0].vm))
        if rule.mode == "single" and lane.runs:
            self._suppress(invs)
            return invs
        if rule.mode == "restart":
            for old in lane.runs:
                self._cancel(old)
        run = _Run(invs, lane, rule.mode)
        lane.runs.append(run)
        self._open += len(invs)
        self._outbox.insert(invs, partial(self._committed, run))
        return invs

    def _invocations(self, firing: Firing) -> list[Invocation]:
        env, rule, now = firing.envelope, firing.rule, time.time()
        vm, event, seq = str(env.get("vm") or ""), str(env.get("event") or ""), env.get("seq")
        ids = self.firing_ids(firing) if self.firing_ids is not None else None
        if ids is None or len(ids) != len(rule.actions):
            ids = [new_id() for _ in rule.actions]
        return [
            Invocation(
                id=ids[index], firing_id=ids[0], rule=rule.name, action_index=index,
                spec=spec,
                mode=rule.mode, vm=vm, event=event, seq=seq, envelope=env,
                context=firing.context, created_at=now, updated_at=now,
            )
            for index, spec in enumerate(self._specs(rule))
        ]  # fmt: skip

    def _specs(self, rule: Rule) -> list[ActionSpecData]:
        """The rule's actions with the defaults applied, made once per rule object."""
        cached = self._spec_cache.get(id(rule))
        if cached is not None and cached[0] is rule:
            return cached[1]
        specs = [
            ActionSpecData(
                spec.type, spec.params, spec.retry or self.default_retry,
                spec.timeout if spec.timeout is not None else self.default_timeout,
            )
            for spec in rule.actions
        ]  # fmt: skip
        if len(self._spec_cache) >= 4096:  # rule reloads make new Rule objects
            self._spec_cache.clear()
        self._spec_cache[id(rule)] = (rule, specs)
        return specs

    def _lane(self, key: tuple[str, str]) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key)
        return lane

    def _refuse(self, firing: Firing) -> None:
        self.rejected += 1
        why = "shutting down" if not self.accepting else "the journal cannot be written"
        if self.rejected == 1 or self.rejected % 1000 == 0:
            log.error("firing of rule %r not accepted (%s); %d refused so far",
                      firing.rule.name, why, self.rejected)  # fmt: skip

    def _suppress(self, invs: list[Invocation]) -> None:
        log.warning("rule %r (mode single) is still running for vm %r: firing on %s ignored",
                    invs[0].rule, invs[0].vm, invs[0].event)  # fmt: skip
        now = time.time()
        for inv in invs:
            inv.status, inv.finished_at = "skipped", now
            self._runner.report(inv, "suppressed")
        self._outbox.insert(invs)

    def _cancel(self, run: _Run) -> None:
        run.cancelled = True
        if run.task is not None:
            run.task.cancel()

    def _committed(self, run: _Run) -> None:
        """The run's rows are on disk: start it (in its lane if queued)."""
        if self._stopping:
            return  # the rows stay pending for the next start
        if run.cancelled:
            self._close(run)
        elif run.mode != "queued":
            run.task = self._spawn(self._execute(run))
            run.task.add_done_callback(partial(self._ended, run))
        else:
            lane = run.lane
            lane.queue.append(run)
            if lane.worker is None:
                lane.worker = self._spawn(self._work(lane))

    async def _work(self, lane: _Lane) -> None:
        try:
            while lane.queue:
                await self._execute(lane.queue.popleft())
        finally:
            lane.worker = None

    async def _execute(self, run: _Run) -> None:
        try:
            for inv in run.invocations:
                if run.cancelled:
                    break
                if inv.status == "dead":  # quarantined by the journal: its row is a dead letter
                    self._runner.report(inv, "dead")
                else:
                    await self._runner.run(inv)
                self._open -= 1
        except asyncio.CancelledError:
            if not run.cancelled or self._stopping:
                raise  # shutdown: the rows stay as they are, to be resumed
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        self._close(run)

    def _ended(self, run: _Run, task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step never ran _execute's own clean-up.
        if task.cancelled() and run.cancelled and not self._stopping:
            self._close(run)

    def _close(self, run: _Run) -> None:
        """Forget a finished run; what it did not finish is marked cancelled."""
        if run.closed:
            return
        run.closed = True
        for inv in run.invocations:
            if inv.status not in _FINISHED:
                self._runner.finish(inv, "cancelled")
                self._runner.report(inv, CANCELLED)
                self._open -= 1
        lane = run.lane
        lane.runs.remove(run)
        if not lane.runs and lane.worker is None and self._lanes.get(lane.key) is lane:
            del self._lanes[lane.key]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _resume(self, invs: Iterable[Invocation]) -> None:
        """Run rows read back from the journal, grouped by firing, in the order written."""
        firings: dict[str, list[Invocation]] = {}
        for inv in invs:
            firings.setdefault(inv.firing_id, []).append(inv)
        for group in firings.values():
            group.sort(key=lambda inv: inv.action_index)
            first = group[0]
            mode = "parallel" if first.mode == "parallel" else "queued"
            run = _Run(group, self._lane((first.rule, first.vm)), mode)
            run.lane.runs.append(run)
            self._open += len(group)
            self._committed(run)

    async def start(self) -> None:
        """Resume the journal's unfinished invocations and start the writer."""
        if self._started:
            return
        self._started = True
        journal = self._outbox.journal
        if journal is not None:
            await asyncio.to_thread(journal.claim_requeued)
            resumed = await asyncio.to_thread(journal.pending)
            if resumed:
                log.info("resuming %d unfinished invocations from %s", len(resumed), journal.path)
            self._resume(resumed)
        self._outbox.start()

    async def flush(self) -> None:
        """Wait until every invocation accepted so far is written to the journal."""
        await self._outbox.flush()

    async def drain(self) -> None:
        """Wait until nothing is waiting, running or unwritten (tests, ``replay --execute``)."""
        if not self._started:
            raise RuntimeError("Dispatcher.drain() before start()")
        while True:
            await self._outbox.flush()
            if self._tasks:
                await asyncio.wait(list(self._tasks))
            elif not self._outbox.busy or not self._outbox.running:
                return  # nothing left, or no writer left to write it

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, give running work ``grace`` seconds, leave the rest in the journal.

        Invocations still running then are cancelled without being marked: the
        next ``start`` resumes them. The journal is not closed (it is the caller's).
        """
        self.accepting = False
        try:
            async with asyncio.timeout(grace):
                await self.drain()
        except TimeoutError:
            pass
        self._stopping = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._outbox.stop()
