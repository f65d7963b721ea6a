"""The live part of ``qmp-reactor tail``: follow the VMs until a signal (asyncio lives here)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable

from reactor.model import Envelope
from reactor.sources.manager import ConnectionManager


async def follow(args: argparse.Namespace, printer: Callable[[Envelope], str]) -> None:
    """Print each event of the VMs ``args`` names with ``printer``, until a signal or EPIPE."""
    stop = asyncio.Event()

    def emit(env: Envelope) -> None:
        try:
            sys.stdout.write(printer(env) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            stop.set()  # the reader went away (tail | head): nothing left to do

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with ConnectionManager(emit, reconcile=args.reconcile) as manager:
            for address in args.addresses:
                manager.add(address)
            await _until_stopped(stop, _watchers(manager, args))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _watchers(manager: ConnectionManager, args: argparse.Namespace) -> list[asyncio.Task[None]]:
    tasks = []
    if args.qmp_glob:
        tasks.append(asyncio.create_task(manager.watch_globs(args.qmp_glob)))
    if args.listen:
        tasks.append(asyncio.create_task(manager.listen(args.listen)))
    return tasks


async def _until_stopped(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    """Wait for ``stop``; a watcher that fails (a listen address in use) ends it too."""
    stopper = asyncio.create_task(stop.wait())
    everything = [stopper, *tasks]
    try:
        await asyncio.wait(everything, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in everything:
            task.cancel()
        await asyncio.wait(everything)
    for task in tasks:
        err = None if task.cancelled() else task.exception()
        if err is not None:
            raise err
