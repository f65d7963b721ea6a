"""Shared-timer deadlines behave as ``asyncio.timeout`` does, on a real event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from reactor.dispatch.deadlines import Deadlines

Outcome = tuple[str, str]


async def _with_deadline(
    deadlines: Deadlines, timeout: float, body: Callable[[], Awaitable[None]]
) -> Outcome:
    deadline = deadlines.start(timeout)
    try:
        await body()
    except BaseException as err:
        if deadline.end(cancelled=isinstance(err, asyncio.CancelledError)):
            return ("timeout", "")
        return ("raised", type(err).__name__)
    deadline.end(cancelled=False)
    return ("ok", "expired" if deadline.expired else "")


async def _with_asyncio(timeout: float, body: Callable[[], Awaitable[None]]) -> Outcome:
    cm = asyncio.timeout(timeout)
    try:
        async with cm:
            await body()
    except TimeoutError:
        if cm.expired():
            return ("timeout", "")
        return ("raised", "TimeoutError")
    except BaseException as err:
        return ("raised", type(err).__name__)
    return ("ok", "expired" if cm.expired() else "")


def sleeper(seconds: float) -> Callable[[], Awaitable[None]]:
    async def body() -> None:
        await asyncio.sleep(seconds)

    return body


def swallower(seconds: float) -> Callable[[], Awaitable[None]]:
    async def body() -> None:
        # an action that ignores the cancellation and ends normally
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(seconds)

    return body


def raiser(exc: type[BaseException]) -> Callable[[], Awaitable[None]]:
    async def body() -> None:
        await asyncio.sleep(0)
        raise exc()

    return body


CASES = {
    "fast": (0.5, sleeper(0)),
    "slow": (0.02, sleeper(5)),
    "swallows": (0.02, swallower(5)),
    "own error": (0.5, raiser(ValueError)),
    "own timeout": (0.5, raiser(TimeoutError)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_outcome_as_asyncio_timeout(case: str) -> None:
    timeout, body = CASES[case]

    async def main() -> tuple[Outcome, Outcome]:
        mine = await asyncio.create_task(_with_deadline(Deadlines(), timeout, body))
        theirs = await asyncio.create_task(_with_asyncio(timeout, body))
        return mine, theirs

    mine, theirs = asyncio.run(main())
    assert mine == theirs


def test_an_outside_cancel_is_not_a_timeout() -> None:
    async def main() -> Outcome:
        task = asyncio.create_task(_with_deadline(Deadlines(), 5.0, sleeper(5)))
        await asyncio.sleep(0.01)
        task.cancel()
        return await task

    assert asyncio.run(main()) == ("raised", "CancelledError")


def test_many_attempts_of_several_lengths_each_time_out_on_its_own() -> None:
    async def main() -> list[Outcome]:
        deadlines = Deadlines()
        jobs = []
        for i in range(60):
            timeout = (0.02, 0.05, 1.0)[i % 3]
            seconds = 0.2 if i % 2 else 0.0
            jobs.append(asyncio.create_task(_with_deadline(deadlines, timeout, sleeper(seconds))))
        return list(await asyncio.gather(*jobs))

    results = asyncio.run(main())
    for i, outcome in enumerate(results):
        slow, short = i % 2 == 1, i % 3 != 2
        assert outcome == (("timeout", "") if slow and short else ("ok", "")), i


def test_finished_attempts_do_not_pile_up_and_no_timer_is_left() -> None:
    async def main() -> tuple[int, bool]:
        deadlines = Deadlines()
        for _ in range(10_000):
            assert await _with_deadline(deadlines, 30.0, sleeper(0)) == ("ok", "")
        queue = deadlines._queues[30.0]
        left = len(queue.entries)
        loop = asyncio.get_running_loop()
        timer = queue.timer
        armed = timer is not None and not timer.cancelled() and timer.when() > loop.time()
        return left, armed

    left, armed = asyncio.run(main())
    assert left <= 1  # the last one, dropped when the next attempt starts
    assert armed  # one timer for the whole length, at the oldest deadline
