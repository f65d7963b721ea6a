"""``tail --from-nats``: the fleet's envelopes from the stream, as ``tail`` prints one host's.

An ephemeral pull consumer by default (from the next message, or the first with
``from_start``; the server forgets it soon after the tail ends), or a durable
one (``--durable NAME``) that resumes where the last tail with that name
stopped: a message is acked after it was printed. ``until_caught_up`` ends the
tail once the consumer has nothing pending: with ``from_start`` that exports
the stream as JSON lines that ``replay`` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from reactor.fleet.central import decode
from reactor.fleet.link import connect_options
from reactor.fleet.subjects import stream_subjects
from reactor.model import Envelope
from reactor.params.secrets import SecretResolver
from reactor.service.config import NatsConfig

BATCH = 256
FETCH_WAIT = 1.0
EPHEMERAL_GONE_AFTER = 60.0
"""Seconds an ephemeral consumer outlives its tail on the server."""
RECONNECTS = 20
"""Tries, half a second apart, before a tail gives up on an unreachable server."""


async def _quiet(err: Exception) -> None:
    """The client's own reports: the tail says why it stops, once."""


async def tail_stream(
    cfg: NatsConfig,
    resolver: SecretResolver,
    emit: Callable[[Envelope], bool],
    stop: asyncio.Event,
    *,
    durable: str | None = None,
    from_start: bool = False,
    until_caught_up: bool = False,
) -> None:
    """Call ``emit`` with each envelope of the stream until ``stop``, ``emit`` returns False,
    or (``until_caught_up``) nothing is pending; connection errors raise."""
    nc = await nats.connect(
        name="qmp-reactor tail", connect_timeout=5, max_reconnect_attempts=RECONNECTS,
        reconnect_time_wait=0.5, error_cb=_quiet, **connect_options(cfg, resolver),
    )  # fmt: skip
    try:
        js = nc.jetstream()
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW,
            inactive_threshold=None if durable else EPHEMERAL_GONE_AFTER,
        )
        sub = await js.pull_subscribe(
            stream_subjects(cfg.subject_prefix)[0], durable=durable, stream=cfg.stream,
            config=config,
        )  # fmt: skip
        if until_caught_up and (await sub.consumer_info()).num_pending == 0:
            return
        while not stop.is_set():
            try:
                msgs = await sub.fetch(BATCH, timeout=FETCH_WAIT)
            except NatsTimeout:
                continue
            for msg in msgs:
                env = decode(msg, cfg.stream)
                if env is not None and not emit(env):
                    return
                await msg.ack()
                if until_caught_up and msg.metadata.num_pending == 0:
                    return
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)
