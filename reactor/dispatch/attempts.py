"""Running one invocation to its end: limits, rendering, timeout, retries.

Retries are tenacity strategies built from the invocation's ``RetryPolicy``:
``stop_after_attempt`` on what is left of the budget, exponential backoff plus
random jitter (continuing where a resumed invocation left off), and never less
than a ``TransientActionError``'s ``retry_after``. Only ``TransientActionError``
is retried; the per-attempt timeout becomes one. A ``PermanentActionError`` goes
to the dead letters at once, and so does any other exception, logged with its
traceback since it is a bug of ours or of a plugin.

A concurrency slot (per type, then global) is held for one attempt, never
during a backoff, so a VM whose webhook is down does not starve the others.
An ``ActionNotDue`` (an action keeping a backoff of its own, as ``restart_vm``
does) is not a failure: the invocation waits its ``retry_after`` without a slot
and runs again, and that attempt does not count against ``retry:``.

Every attempt is reported to ``on_outcome`` (``hookspecs.ActionOutcome``): ``ok``,
``retry`` (another attempt follows) or ``failed`` (the invocation gives up),
followed by ``dead`` once a journaled invocation is in the dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from pydantic import BaseModel
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from reactor.dispatch.deadlines import Deadlines
from reactor.dispatch.groupcommit import Outbox
from reactor.dispatch.invocation import PARK_BYTES
from reactor.dispatch.journal import Invocation, JournalError
from reactor.dispatch.schema import dumps_data
from reactor.errors import ActionNotDue, PermanentActionError, TransientActionError
from reactor.model import RetryPolicy
from reactor.plugins.api import ActionContext, ActionSettings, ActionType, VmControl
from reactor.plugins.hookspecs import ActionOutcome, OutcomeStatus

log = logging.getLogger(__name__)

Render = Callable[[Invocation, ActionType], Awaitable[BaseModel] | BaseModel]
Emit = Callable[[str, str, dict[str, Any], str | None], None]
"""``emit(vm, event, data, source)``: raise a synthetic event for the VM; ``source`` is that of
the envelope that fired the invocation, so the event belongs to that connection."""
Sleep = Callable[[float], Awaitable[None]]
ACTION_FAILED = "REACTOR_ACTION_FAILED"
NOT_DUE_FLOOR = 0.05
"""The shortest wait for an action not yet due: one that keeps saying "not yet" cannot spin."""
CANCELLED: OutcomeStatus = "cancelled"
"""The outcome of a run cancelled by ``mode: restart``."""


class _HonourRetryAfter(wait_base):
    """Wait what ``base`` says, or the peer's ``retry_after`` if that is longer."""

    def __init__(self, base: wait_base) -> None:
        self.base = base

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = self.base(retry_state)
        outcome = retry_state.outcome
        err = outcome.exception() if outcome is not None else None
        retry_after = getattr(err, "retry_after", None)
        return max(delay, float(retry_after)) if retry_after is not None else delay


def backoff(policy: RetryPolicy, done: int = 0) -> wait_base:
    """The wait before each retry: ``initial * multiplier**n`` up to ``max``, plus jitter.

    ``done`` attempts made before (a resumed invocation) continue the progression.
    """
    first = policy.initial * policy.multiplier**done
    exponential = wait_exponential(multiplier=first, exp_base=policy.multiplier, max=policy.max)
    return _HonourRetryAfter(exponential + wait_random(0, policy.jitter))


class Runner:
    """Runs invocations (see the module docstring) and reports every outcome."""

    def __init__(
        self,
        *,
        action_types: Mapping[str, ActionType],
        settings: ActionSettings,
        render: Render,
        outbox: Outbox,
        vm_lookup: Callable[[str, str | None], VmControl | None],
        emit: Emit | None,
        on_outcome: Callable[[ActionOutcome], None] | None,
        redact: Callable[[str], str],
        max_concurrency: int,
        per_type_limits: Mapping[str, int],
        sleep: Sleep,
    ) -> None:
        self.action_types = action_types
        self.settings = settings
        self.render = render
        self.outbox = outbox
        self.vm_lookup = vm_lookup
        self.emit = emit
        self.on_outcome = on_outcome
        self.redact = redact
        self.sleep = sleep
        self.in_flight = 0
        self._deadlines = Deadlines()
        self._limits: tuple[int, dict[str, int]] = (0, {})
        self._global = asyncio.Semaphore(max_concurrency)
        self._per_type: dict[str, asyncio.Semaphore] = {}
        self.limit(max_concurrency, per_type_limits)

    def limit(self, max_concurrency: int, per_type_limits: Mapping[str, int]) -> None:
        """Concurrency limits for attempts that start from now on.

        Unchanged limits keep their semaphores; changed ones get new ones, and
        attempts already running release the old ones they hold.
        """
        limits = (max_concurrency, dict(per_type_limits))
        if limits == self._limits:
            return
        if max_concurrency != self._limits[0]:
            self._global = asyncio.Semaphore(max_concurrency)
        self._per_type = {
            name: self._per_type[name]
            if self._limits[1].get(name) == n and name in self._per_type
            else asyncio.Semaphore(n)
            for name, n in per_type_limits.items()
        }
        self._limits = limits

    async def run(self, inv: Invocation) -> None:
        """Run every attempt ``inv`` has left; it ends done or dead (or ``failed``)."""
        atype = self.action_types.get(inv.spec.type)
        left = inv.spec.retry.attempts - inv.attempts
        if atype is None:
            self.give_up(inv, f"unknown action type {inv.spec.type!r}", 0.0)
            return
        if left <= 0:
            self.give_up(inv, f"no attempts left ({inv.last_error or 'interrupted'})", 0.0)
            return
        started = time.monotonic()
        try:
            await self._attempts(inv, atype, left, started)
        except (TransientActionError, PermanentActionError) as err:
            self.give_up(inv, str(err), time.monotonic() - started)
        except Exception as err:
            log.exception("action %s of rule %r raised a bug (invocation %s)",
                          inv.spec.type, inv.rule, inv.id)  # fmt: skip
            self.give_up(inv, f"{type(err).__name__}: {err}", time.monotonic() - started)
        else:
            self.finish(inv, "done")
            self.report(inv, "ok", time.monotonic() - started)

    async def _attempts(
        self, inv: Invocation, atype: ActionType, left: int, started: float
    ) -> None:
        """Up to ``left`` attempts with backoff; the last error is raised."""
        done_before = inv.attempts
        try:
            # Most invocations succeed at once: spare them tenacity's bookkeeping.
            await self._attempt_when_due(inv, atype)
            return
        except TransientActionError as err:
            first: list[TransientActionError] = [err]

        async def attempt() -> None:
            if first:
                raise first.pop()  # replay the first failure, so tenacity's counts are right
            await self._attempt_when_due(inv, atype)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(left),
            wait=backoff(inv.spec.retry, done_before),
            retry=retry_if_exception_type(TransientActionError),
            sleep=self.sleep,
            before_sleep=partial(self._will_retry, inv, started),
            reraise=True,
        )
        await retrying(attempt)

    async def _attempt_when_due(self, inv: Invocation, atype: ActionType) -> None:
        """One attempt, run again (uncounted) after each wait an ``ActionNotDue`` asks for."""
        while True:
            try:
                await self._attempt(inv, atype)
                return
            except ActionNotDue as err:
                wait = max(float(err.retry_after or 0.0), NOT_DUE_FLOOR)
                self._not_due(inv, err, wait)
            # Real time, not ``self.sleep``: the action said when it may act.
            await asyncio.sleep(wait)

    def _not_due(self, inv: Invocation, err: ActionNotDue, wait: float) -> None:
        """The attempt did not count: the journal keeps the invocation pending, as it was."""
        self._park(inv, err)
        inv.attempts -= 1
        inv.last_error = self.redact(str(err))
        inv.status = "pending"
        self.outbox.update(inv)
        log.debug("action %s of rule %r not due, runs again in %.2f s: %s",
                  inv.spec.type, inv.rule, wait, inv.last_error)  # fmt: skip

    async def _attempt(self, inv: Invocation, atype: ActionType) -> None:
        # Per type first: waiting for a busy type must not hold a global slot.
        per_type = self._per_type.get(atype.name)
        if per_type is not None:
            await per_type.acquire()
        try:
            async with self._global:
                await self._unpark(inv)  # inside the slot: few big envelopes loaded at once
                inv.attempts += 1
                inv.status = "running"
                self.outbox.update(inv)
                self.in_flight += 1
                try:
                    await self._run_once(inv, atype)
                finally:
                    self.in_flight -= 1
        finally:
            if per_type is not None:
                per_type.release()

    async def _run_once(self, inv: Invocation, atype: ActionType) -> None:
        deadline = self._deadlines.start(inv.spec.timeout)
        try:
            params = self.render(inv, atype)
            if inspect.isawaitable(params):
                params = await params
            await atype.run(params, self._context(inv))
        except BaseException as err:
            cause: BaseException = err
            if deadline.end(cancelled=isinstance(err, asyncio.CancelledError)):
                # Our cancellation: as ``asyncio.timeout`` turns it into TimeoutError.
                cause = TimeoutError()
                cause.__cause__ = err
            if isinstance(cause, TimeoutError) and deadline.expired:
                raise TransientActionError(f"timed out after {inv.spec.timeout:g} s") from cause
            raise
        deadline.end(cancelled=False)

    def _context(self, inv: Invocation) -> ActionContext:
        emit, source = self.emit, inv.envelope.get("source")
        return ActionContext(
            invocation_id=inv.id,
            idempotency_key=inv.idempotency_key,
            rule=inv.rule,
            action_index=inv.action_index,
            envelope=inv.envelope,
            context=inv.context,
            attempt=inv.attempts,
            settings=self.settings,
            vm=self.vm_lookup(inv.vm, source) if inv.vm else None,
            emit=None if emit is None else (lambda name, data: emit(inv.vm, name, data, source)),
            redact=self.redact,
        )

    async def _unpark(self, inv: Invocation) -> None:
        journal = self.outbox.journal
        if inv.parked and journal is not None and inv.row is not None:
            try:
                envelope = await asyncio.to_thread(journal.envelope, inv.row)
            except JournalError as err:
                raise TransientActionError(f"cannot read the envelope back: {err}") from err
            inv.envelope, inv.parked = envelope or {}, False

    def _park(self, inv: Invocation, err: BaseException | None) -> None:
        """Between attempts, leave a big envelope in the journal (it is written there).

        The failed attempt's frames, kept by its error through the wait, would hold
        its context and the envelope with it: their locals are cleared.
        """
        if self.outbox.journal is None or inv.row is None or inv.parked:
            return
        if len(dumps_data(inv.envelope)) > PARK_BYTES:
            inv.envelope, inv.parked = {}, True
            seen: set[int] = set()
            while err is not None and id(err) not in seen:
                seen.add(id(err))
                traceback.clear_frames(err.__traceback__)
                err = err.__cause__ or err.__context__

    def _will_retry(self, inv: Invocation, started: float, state: RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome is not None else None
        self._park(inv, err)
        inv.last_error = self.redact(str(err))
        inv.status = "pending"
        self.outbox.update(inv)
        delay = state.upcoming_sleep
        log.info("action %s of rule %r failed (attempt %d), retrying in %.2f s: %s",
                 inv.spec.type, inv.rule, inv.attempts, delay, inv.last_error)  # fmt: skip
        self.report(inv, "retry", time.monotonic() - started)

    def finish(self, inv: Invocation, status: str) -> None:
        """Mark ``inv`` finished (``done``, ``skipped``, ``cancelled``) in the journal."""
        inv.status = status
        inv.finished_at = time.time()
        if self.outbox.journal is not None and inv.row is not None:
            # Its row has the envelope, and only the status is left to write: the
            # finished invocation may wait for the next group commit without it.
            inv.envelope, inv.parked = {}, True
        self.outbox.update(inv)

    def give_up(self, inv: Invocation, error: str, duration: float) -> None:
        """Dead-letter ``inv`` (or drop it, ``failed``, without a journal) and say so."""
        inv.last_error = self.redact(error)
        journal = self.outbox.journal
        if inv.parked and journal is not None and inv.row is not None:
            # The dead letter is written whole: read the envelope back first.
            with contextlib.suppress(JournalError):  # then writing it fails too, and says so
                inv.envelope, inv.parked = journal.envelope(inv.row) or {}, False
        journaled = journal is not None
        if journaled:
            inv.status, inv.died_at = "dead", time.time()
            self.outbox.bury(inv)
        else:
            self.finish(inv, "failed")
        log.warning("action %s of rule %r for vm %r gave up after %d attempts: %s",
                    inv.spec.type, inv.rule, inv.vm, inv.attempts, inv.last_error)  # fmt: skip
        self.report(inv, "failed", duration)
        if journaled:
            self.report(inv, "dead", duration)
        if self.emit is not None and inv.event != ACTION_FAILED:
            data = {"rule": inv.rule, "action": inv.spec.type, "error": inv.last_error,
                    "attempts": inv.attempts}  # fmt: skip
            self._safely(self.emit, inv.vm, ACTION_FAILED, data, inv.envelope.get("source"))

    def report(self, inv: Invocation, status: OutcomeStatus, duration: float = 0.0) -> None:
        """Tell the observer what became of ``inv``; an observer's bug is logged, not raised.

        ``duration``: seconds since the invocation's first attempt in this process began.
        """
        if self.on_outcome is None:
            return
        error = inv.last_error if status in ("retry", "dead", "failed") else None
        outcome = ActionOutcome(inv.id, inv.rule, inv.spec.type, inv.vm, inv.event, status,
                                inv.attempts, error, duration)  # fmt: skip
        self._safely(self.on_outcome, outcome)

    @staticmethod
    def _safely(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("observer %r failed", fn)
