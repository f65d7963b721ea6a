"""The central instance: the rule engine over every host's events in the stream.

A durable pull consumer (``--durable NAME``, explicit acks) fetches a batch,
feeds each event to the engine (with ``$.host`` from its sidecar and
``$.nats.id``, its message id), waits until the firings' invocations are in the
journal, then acks the batch. A kill -9 before the ack redelivers the batch; the
firings it makes again get the same invocation ids (``commands.firing_ids``),
so receivers and hosts see the same idempotency keys: exactly once in effect.
Several instances may share one durable consumer: each message goes to one of
them, and another takes over when one stops.

With the engine's state kept (``engine_state:``, ``reactor.service.enginestate``),
the windows a batch changed are written, with the batch's stream sequences,
before the ack; a redelivered message whose sequence is there already counted
and is acked without being fed again, so a kill -9 neither loses nor doubles
an event in a window.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig

from reactor.fleet.link import Link, why
from reactor.fleet.publisher import ensure_stream
from reactor.fleet.subjects import stream_subjects, untoken
from reactor.model import Envelope
from reactor.service.config import NatsConfig
from reactor.service.daemon import Daemon

log = logging.getLogger("reactor.fleet")

BATCH = 256
FETCH_WAIT = 1.0


def decode(msg: Msg, stream: str) -> Envelope | None:
    """The envelope a message carries, or None for one that is not an event."""
    try:
        env = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(env, dict) or not isinstance(env.get("event"), str):
        return None
    if not isinstance(env.get("vm"), str) or not isinstance(env.get("data", {}), dict):
        return None
    env.setdefault("data", {})
    if not isinstance(env.get("host"), str):
        parts = msg.subject.split(".")
        env["host"] = untoken(parts[-3]) if len(parts) >= 4 else ""
    meta = msg.metadata
    msg_id = (msg.headers or {}).get("Nats-Msg-Id") or f"{stream}:{meta.sequence.stream}"
    env["nats"] = {"id": msg_id, "seq": meta.sequence.stream, "delivered": meta.num_delivered}
    return env


class Consumer:
    """Fetches, feeds and acks (see the module docstring)."""

    def __init__(self, cfg: NatsConfig) -> None:
        self.cfg = cfg
        self.consumed = 0
        self.acked = 0
        self.redelivered = 0
        self.skipped = 0
        self.fed: set[int] = set()
        """Sequences whose state is written but whose ack is not known to have landed."""
        self._acked: list[int] = []

    async def run(self, link: Link, daemon: Daemon) -> None:
        """Consume until cancelled."""
        await link.up.wait()
        sub = await self._subscribe(link)
        keeper = daemon.reactor.state if daemon.reactor is not None else None
        if keeper is not None:
            floor = (await sub.consumer_info()).ack_floor.stream_seq
            self.fed = await asyncio.to_thread(keeper.file.fed, self.cfg.durable, floor)
        while True:
            try:
                msgs = await sub.fetch(BATCH, timeout=FETCH_WAIT)
            except NatsTimeout:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("nats: fetch from %s: %s", self.cfg.durable, why(err))
                await asyncio.sleep(0.5)
                continue
            await self._take(msgs, daemon)

    async def _subscribe(self, link: Link) -> Any:
        assert link.js is not None
        delay = 0.1
        while True:
            try:
                await ensure_stream(link, self.cfg)
                config = ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT, ack_wait=self.cfg.ack_wait,
                    max_ack_pending=BATCH * 16,
                )  # fmt: skip
                return await link.js.pull_subscribe(
                    stream_subjects(self.cfg.subject_prefix)[0], durable=self.cfg.durable,
                    stream=self.cfg.stream, config=config,
                )  # fmt: skip
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("nats: cannot consume %s as %s (%s); retrying", self.cfg.stream,
                            self.cfg.durable, why(err))  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _take(self, msgs: list[Msg], daemon: Daemon) -> None:
        assert daemon.reactor is not None
        keeper = daemon.reactor.state
        if keeper is None:
            self._feed(msgs, daemon)
            await daemon.reactor.dispatcher.flush()  # the firings are journaled: now ack
        else:
            async with keeper.lock:  # no state written between the feed and the save
                fed = self._feed(msgs, daemon)
                await daemon.reactor.dispatcher.flush()
                durable, acked = self.cfg.durable, self._acked
                self._acked = []
                await keeper.save([(durable, n) for n in fed], [(durable, n) for n in acked])
            self.fed.update(fed)
        await asyncio.gather(*(self._ack(msg, keeper is not None) for msg in msgs))

    def _feed(self, msgs: list[Msg], daemon: Daemon) -> list[int]:
        """Feed the batch's events the engine has not seen; their sequences."""
        fed = []
        for msg in msgs:
            env = decode(msg, self.cfg.stream)
            if env is None:
                self.skipped += 1
                continue
            self.consumed += 1
            if env["nats"]["delivered"] > 1:
                self.redelivered += 1
            if env["nats"]["seq"] in self.fed:
                continue  # its firings are journaled and its windows written: only the ack
            daemon.feed(env)
            fed.append(env["nats"]["seq"])
        return fed

    async def _ack(self, msg: Msg, confirmed: bool) -> None:
        try:
            if confirmed:  # the sequence leaves the state file once the server has the ack
                await msg.ack_sync(timeout=10)
                seq = msg.metadata.sequence.stream
                self.fed.discard(seq)
                self._acked.append(seq)
            else:
                await msg.ack()
            self.acked += 1
        except Exception as err:  # redelivered later; the same ids make it harmless
            log.warning("nats: ack: %s", why(err))

    def figures(self) -> dict[str, float]:
        """Gauges for metrics and /healthz."""
        return {
            "nats_consumed": float(self.consumed),
            "nats_acked": float(self.acked),
            "nats_redelivered": float(self.redelivered),
            "nats_not_events": float(self.skipped),
        }
