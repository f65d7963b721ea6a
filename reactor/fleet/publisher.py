"""Publishing every envelope to JetStream through the durable outbox.

``envelope`` (on the hot path) only encodes and queues; a writer task appends
what queued to the outbox file in one transaction, and a sender task publishes
the outbox's oldest rows, a window at a time, each with its ``Nats-Msg-Id``.
A row leaves the outbox once JetStream acknowledged it; a duplicate
acknowledgement (the stream already had that id: a re-send after a lost ack or
a restart) counts as success. While NATS is away the rows wait, up to the
outbox's byte bound; the sender retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import orjson
from nats.js.errors import BadRequestError

from reactor.fleet.link import Link, why
from reactor.fleet.outbox import Message, Outbox, outbox_path
from reactor.fleet.subjects import event_subject, stream_subjects
from reactor.model import Envelope
from reactor.service.config import NatsConfig

log = logging.getLogger("reactor.fleet")

WINDOW = 512
"""Rows published at once (each waits for its own acknowledgement)."""
PUBLISH_TIMEOUT = 5.0
DUPLICATE_WINDOW = 120.0


async def ensure_stream(link: Link, cfg: NatsConfig) -> None:
    """Create the stream if it is missing; an existing one is used as it is."""
    assert link.js is not None
    subjects = stream_subjects(cfg.subject_prefix)
    try:
        await link.js.add_stream(
            name=cfg.stream, subjects=subjects, duplicate_window=DUPLICATE_WINDOW
        )
    except BadRequestError:
        info = await link.js.stream_info(cfg.stream)
        if list(info.config.subjects or []) != subjects:
            log.warning("nats: stream %s exists with subjects %s (expected %s); using it",
                        cfg.stream, info.config.subjects, subjects)  # fmt: skip


def encode(env: Envelope, host: str) -> bytes:
    """The envelope as published: JSON, with ``host`` set to this host's fleet name."""
    return orjson.dumps({**env, "host": host}, default=str, option=orjson.OPT_NON_STR_KEYS)


class Publisher:
    """Queues envelopes into the outbox and publishes them (see the module docstring)."""

    def __init__(self, cfg: NatsConfig, host: str, state_dir: Path) -> None:
        self.cfg = cfg
        self.host = host
        self.outbox = Outbox(outbox_path(state_dir), cfg.outbox_max_bytes)
        self.published = 0
        self.duplicates = 0
        self._queued: list[tuple[str, str, bytes]] = []
        self._queued_bytes = 0
        self._queue_dropped = 0
        self._wrote = asyncio.Event()
        self._queue_woken = asyncio.Event()
        self._link: Link | None = None

    def envelope(self, env: Envelope) -> None:
        """Queue one envelope for the outbox."""
        payload = encode(env, self.host)
        if self._queued_bytes + len(payload) > self.cfg.outbox_max_bytes:
            self._queue_dropped += 1  # the file is stuck: do not grow memory without bound
            return
        subject = event_subject(
            self.cfg.subject_prefix, self.host, str(env.get("vm", "")), str(env.get("event", ""))
        )
        self._queued.append((subject, f"{self.host}:{env.get('source', '')}", payload))
        self._queued_bytes += len(payload)
        self._queue_woken.set()

    @property
    def dropped(self) -> int:
        """Envelopes not queued: the outbox was full."""
        return self.outbox.dropped + self._queue_dropped

    def figures(self) -> dict[str, float]:
        """Gauges for metrics and /healthz."""
        return {
            "nats_outbox_events": float(self.outbox.count + len(self._queued)),
            "nats_outbox_bytes": float(self.outbox.bytes + self._queued_bytes),
            "nats_outbox_max_bytes": float(self.cfg.outbox_max_bytes),
            "nats_published": float(self.published),
            "nats_duplicates": float(self.duplicates),
            "nats_dropped": float(self.dropped),
        }

    async def write(self) -> None:
        """The writer task: queued envelopes into the outbox file, a batch per transaction."""
        while True:
            await self._queue_woken.wait()
            self._queue_woken.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write what is queued now to the outbox file."""
        rows, self._queued = self._queued, []
        self._queued_bytes = 0
        if rows:
            await asyncio.to_thread(self.outbox.add, rows)
            self._wrote.set()

    async def send(self, link: Link) -> None:
        """The sender task: the outbox's oldest rows to JetStream until cancelled."""
        self._link = link
        await link.up.wait()
        delay = 0.1
        while True:
            try:
                await ensure_stream(link, self.cfg)
                break
            except Exception as err:
                log.warning("nats: cannot create stream %s (%s); retrying", self.cfg.stream,
                            why(err))  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        delay = 0.1
        while True:
            self._wrote.clear()
            rows = await asyncio.to_thread(self.outbox.head, WINDOW)
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wrote.wait(), 1.0)
                continue
            sent = await self._publish(link, rows)
            await asyncio.to_thread(self.outbox.remove, sent)
            if len(sent) < len(rows):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                delay = 0.1

    async def _publish(self, link: Link, rows: list[Message]) -> list[Message]:
        """Publish ``rows`` at once; those JetStream acknowledged (duplicates too)."""
        assert link.js is not None
        js = link.js
        results = await asyncio.gather(
            *(
                js.publish(m.subject, m.payload, timeout=PUBLISH_TIMEOUT,
                           headers={"Nats-Msg-Id": m.msg_id})
                for m in rows
            ),
            return_exceptions=True,
        )  # fmt: skip
        sent, failed = [], None
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, BaseException):
                failed = failed or result
                continue
            sent.append(row)
            if getattr(result, "duplicate", None):
                self.duplicates += 1
            else:
                self.published += 1
        if failed is not None:
            log.warning("nats: %d of %d events not published yet (%s); %d waiting",
                        len(rows) - len(sent), len(rows), why(failed),
                        self.outbox.count - len(sent))  # fmt: skip
        return sent

    def problems(self) -> list[str]:
        """Unhealthy: the outbox is full (events are being dropped)."""
        full = self.outbox.bytes + self._queued_bytes >= self.cfg.outbox_max_bytes * 0.99
        return ["the NATS outbox is full; new events are not published"] if full else []

    async def close(self, timeout: float = 2.0) -> None:
        """Write what is queued, and close the file."""
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            log.warning("nats: %d queued events not written to the outbox", len(self._queued))
        self.outbox.close()


def fleet_host(configured: str | None) -> str:
    """This host's fleet name: the configured one, else the machine's hostname."""
    import socket

    return configured or socket.gethostname()
