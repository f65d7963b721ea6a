"""The live part of ``qmp-reactor tail``: follow the VMs until a signal (asyncio lives here)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable

from reactor.errors import ConfigError
from reactor.model import Envelope
from reactor.params.secrets import SecretResolver
from reactor.service.config import NatsConfig
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


def follow_stream(
    args: argparse.Namespace, cfg: NatsConfig, printer: Callable[[Envelope], str]
) -> None:
    """Print the fleet stream's envelopes with ``printer`` until a signal, EPIPE, or caught up."""
    asyncio.run(_follow_stream(args, cfg, printer))


async def _follow_stream(
    args: argparse.Namespace, cfg: NatsConfig, printer: Callable[[Envelope], str]
) -> None:
    from reactor.fleet.link import shown, why
    from reactor.fleet.tailing import tail_stream

    stop = asyncio.Event()
    resolver = SecretResolver()

    def failed(err: Exception) -> ConfigError:
        text = resolver.redactor.redact(f"tail: nats {shown(cfg.url or '')}: {why(err)}")
        return ConfigError(text)

    def emit(env: Envelope) -> bool:
        try:
            sys.stdout.write(printer(env) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            stop.set()
            return False
        return True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tail = tail_stream(cfg, resolver, emit, stop, durable=args.durable, from_start=args.from_start,
                       until_caught_up=args.until_caught_up)  # fmt: skip
    try:
        await _until_stopped(stop, [asyncio.create_task(tail)])
    except (OSError, TimeoutError) as err:
        raise failed(err) from None
    except Exception as err:
        if type(err).__module__.startswith("nats."):  # the server refused: auth, no stream
            raise failed(err) from None
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
