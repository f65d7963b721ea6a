"""The threads libvirt runs on, so that the asyncio loop never waits for libvirt.

libvirt's client library is thread-safe once its default event implementation
is registered (``virEventRegisterDefaultImpl``, before any connection is
opened). ``start_events`` registers it and starts ``libvirt-events``: one
daemon thread per process that runs ``virEventRunDefaultImpl`` for as long as
the process lives (libvirt wakes it when another thread adds a connection's
handles or timers, so it needs no timer of ours). libvirt calls every callback
(events, a connection's close) on that thread; a callback only hands its data
to the asyncio loop with ``post``.

``Calls`` are the few daemon threads an owner (a ``LibvirtSource`` and its
domains) makes its blocking libvirt calls on: a destroy takes about a second,
and a call to a hung libvirtd or QEMU lasts as long as the hang. Unlike a
``ThreadPoolExecutor``'s threads, which the interpreter joins at exit, a daemon
thread stuck in libvirt cannot keep the sidecar from exiting on SIGTERM.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

WORKERS = 4
"""Threads of one ``Calls``: calls past this many wait for one to end."""

ERROR_PAUSE = 1.0
"""Seconds the event thread waits after ``virEventRunDefaultImpl`` failed."""

_Job = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]

# libvirt takes one event implementation per process, for good: this mirrors
# that process-wide fact (which is why it is module state and not an object's).
_events_lock = threading.Lock()
_events_started = False


def start_events(api: Any) -> None:
    """Register libvirt's default event implementation and start the thread that runs it,
    once per process (``api`` is the ``libvirt`` module); later calls do nothing."""
    global _events_started
    with _events_lock:
        if _events_started:
            return
        api.virEventRegisterDefaultImpl()
        thread = threading.Thread(
            target=_run_events, args=(api,), name="libvirt-events", daemon=True
        )
        thread.start()
        _events_started = True


def _run_events(api: Any) -> None:
    while True:
        try:
            api.virEventRunDefaultImpl()
        except Exception:
            log.exception("libvirt's event loop failed an iteration")
            time.sleep(ERROR_PAUSE)


def post(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """Have ``loop``'s thread run ``fn(*args)`` soon, in the order posted; called from
    libvirt's event thread. Nothing happens once the loop is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class Calls:
    """Up to ``WORKERS`` daemon threads, started on the first call, that make blocking
    libvirt calls in the order they were asked for; ``close`` lets them end.

    ``run`` and ``close`` are called on the owner's event loop only.
    """

    def __init__(self, name: str, workers: int = WORKERS) -> None:
        self.name = name
        self.workers = workers
        self._jobs: queue.SimpleQueue[_Job | None] | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on one of the threads: its result, or its exception.

        Cancelled before a thread took it, the call is not made; once made, it
        runs to its end (libvirt calls cannot be interrupted).
        """
        return await asyncio.wrap_future(self.submit(fn, *args))

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)`` for a thread without waiting for it."""
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            for n in range(self.workers):
                name = f"{self.name}-{n}"
                threading.Thread(target=_work, args=(self._jobs,), name=name, daemon=True).start()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        return future

    def close(self) -> None:
        """Let the threads end once the calls already queued are made (the next call
        starts new ones)."""
        jobs, self._jobs = self._jobs, None
        if jobs is not None:
            for _ in range(self.workers):
                jobs.put(None)


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        future, fn, args = job
        if not future.set_running_or_notify_cancel():
            continue
        try:
            result = fn(*args)
        except BaseException as err:  # handed to the caller, whatever it is
            future.set_exception(err)
        else:
            future.set_result(result)
        del job, future, fn, args  # drop the last call's objects while waiting
