"""One QMP session on qemu.qmp, with events taken off the wire at once.

``QmpLink`` is qemu.qmp's ``QMPClient`` with its event path replaced: the
library hands every event to ``EventListener`` objects whose ``history`` lists
and queues grow without bound unless drained, which a sidecar running for
months cannot afford. Here an event never becomes a library ``Message``: the
reader parses the line, stamps the time it was read, and calls ``sink`` right
away (or holds it, bounded by count and by bytes, until the session is
announced). Command replies still take the library's normal route, so
``execute`` works unchanged.

The read buffer is bounded by ``max_message``: a longer line ends the session
(``ValueError`` from the stream reader) instead of being buffered.

What a link needs it is given (its sink and pace by ``release``); nothing here
is module-level state, so links in one process share nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from qemu.qmp import QMPClient, Runstate
from qemu.qmp.error import ProtocolError
from qemu.qmp.message import Message

RawEvent = dict[str, Any]
EventSink = Callable[[RawEvent, float], None]

MAX_MESSAGE = 1 << 20
"""Default longest QMP line accepted (bytes); QEMU's own events are far shorter."""

BURST = 32
"""Events of one VM handled before the loop turns to the others (a flood must not starve them)."""

BURST_BYTES = 256 * 1024
"""Bytes of events of one VM parsed before the loop turns to the others (big events count more)."""

Pace = Callable[[], asyncio.Event | None]
"""Asked before each event of an announced session: None to deliver it, else an
``asyncio.Event`` to wait for first (the consumer is overloaded). Replies and the
events of a session being opened are never held. The daemon's is
``Reactor.backpressure``, given to the ``ConnectionManager`` as its ``pace``.
"""

HOLD_MAX = 10_000
"""Events kept while a session is being announced; older ones are dropped past this."""

HOLD_BYTES = 8 * 1024 * 1024
"""Bytes of events (as read) kept while a session is being announced; older ones are
dropped past this, so a peer that withholds its replies while it streams cannot grow us."""

HOLD_RATE = 8 * 1024 * 1024
"""Bytes per second a session not yet announced is read at once it has sent ``HOLD_BYTES``:
QEMU never sends that much before answering, and parsing what a peer that does streams
would take the CPU the other VMs' events need."""

WIRE_LOGGER = "reactor.qmp.wire"


class _WireLog(logging.Logger):
    """The library's log of one link: quiet unless the operator set ``reactor.qmp.wire``'s level.

    qemu.qmp logs every failed attempt and every ended session at ERROR; our own
    logger says the same once per state change, so the library's copy passes only
    when the ``reactor.qmp.wire`` logger was given a level of its own (to trace
    the wire); its records then go to that logger's handlers and up. Nothing is
    set on any logger at import.
    """

    def __init__(self) -> None:
        super().__init__(WIRE_LOGGER)
        self.wire = logging.getLogger(WIRE_LOGGER)
        self.parent = self.wire

    def isEnabledFor(self, level: int) -> bool:
        """Whether the operator set the wire logger's own level at or below ``level``."""
        own = self.wire.level
        return own != logging.NOTSET and level >= own and self.wire.isEnabledFor(level)


def _loads(raw: bytes) -> Any:
    """A JSON line, parsed by orjson (4x faster) or, for what only it accepts, by ``json``.

    ``json`` also takes NaN, Infinity, lone surrogates and a byte order mark;
    orjson turns integers beyond 64 bits into floats, which QEMU never sends.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


class WireError(ProtocolError):
    """The peer sent a line that is not a JSON object, or one too long to buffer."""


def describe(err: BaseException, limit: int = 200) -> str:
    """A short, single-line reason for an ended session or a failed attempt."""
    if isinstance(err, EOFError):
        return "end of file (the peer closed the connection)"
    if isinstance(err, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(err, TimeoutError):
        return "timed out"
    cause = getattr(err, "exc", None)
    if isinstance(cause, BaseException) and cause is not err:
        return describe(cause, limit)
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(err).__name__}: {text}"


class QmpLink(QMPClient):
    """A QMP client whose events go straight to ``sink`` (or a bounded hold)."""

    def __init__(self, max_message: int = MAX_MESSAGE, hold_bytes: int = HOLD_BYTES) -> None:
        super().__init__(None, max_message)
        self.logger = _WireLog()
        self.sink: EventSink | None = None
        self.pace: Pace | None = None
        self.held: deque[tuple[RawEvent, float, int]] = deque()
        self.held_bytes = 0
        self.hold_bytes = hold_bytes
        self.unannounced_bytes = 0
        self.dropped = 0

    def release(self, sink: EventSink, pace: Pace | None = None) -> None:
        """Deliver the held events to ``sink``, then send every new event there.

        From now on each event first asks ``pace`` whether to wait (see ``Pace``).
        """
        held, self.held, self.held_bytes = self.held, deque(), 0
        while held:
            obj, received, _ = held.popleft()  # each one freed as soon as it is delivered
            sink(obj, received)
        self.pace = pace
        self.sink = sink

    @property
    def running(self) -> bool:
        """True while the session is established and not yet going down."""
        return bool(self.runstate == Runstate.RUNNING)

    async def closed(self) -> str:
        """Wait until the session ends; tear it down and return why it ended."""
        while self.runstate == Runstate.RUNNING:
            await self.runstate_changed()
        return await self.shut()

    async def shut(self, timeout: float = 2.0) -> str:
        """Disconnect (bounded by ``timeout``) and return the reason the session ended.

        The library's disconnect runs shielded: cancelled halfway (the sidecar
        stopping as the peer hangs up) it would leave an error nobody retrieves.
        """
        closing = asyncio.ensure_future(self.disconnect())
        closing.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(closing)
        except TimeoutError:
            return "timed out closing the connection"
        except Exception as err:
            return describe(err)
        return "closed"

    def _hold(self, obj: RawEvent, received: float, size: int) -> None:
        held = self.held
        held.append((obj, received, size))
        self.held_bytes += size
        while len(held) > HOLD_MAX or (self.held_bytes > self.hold_bytes and len(held) > 1):
            self.held_bytes -= held.popleft()[2]
            self.dropped += 1

    async def _do_recv(self) -> Message:
        burst = burst_bytes = 0
        while True:
            if burst >= BURST or burst_bytes >= BURST_BYTES:
                # A line already buffered is read without a pause: let the other VMs in.
                burst = burst_bytes = 0
                await asyncio.sleep(0)
            try:
                raw = await self._readline()
            except ValueError as err:  # the stream reader's limit: it dropped the buffer
                raise WireError(f"message longer than {self.readbuflen} bytes") from err
            received = time.time()
            try:
                obj = _loads(raw)
            except ValueError as err:
                if not raw.strip():
                    continue
                raise WireError(f"not JSON ({len(raw)} bytes): {raw[:80]!r}") from err
            if type(obj) is not dict:
                raise WireError(f"not a JSON object: {type(obj).__name__}")
            if "event" not in obj:
                return Message(obj, eager=False)
            burst += 1
            burst_bytes += len(raw)
            sink = self.sink
            if sink is None:
                self._hold(obj, received, len(raw))
                self.unannounced_bytes += len(raw)
                if self.unannounced_bytes > self.hold_bytes:
                    await asyncio.sleep(len(raw) / HOLD_RATE)  # and the socket waits meanwhile
                continue
            pace = self.pace
            if pace is not None and (gate := pace()) is not None:
                await gate.wait()  # overloaded: this event waits, and what follows it in the socket
            sink(obj, received)

    def _cb_inbound(self, msg: Message) -> Message:
        # The library formats every message with str() for a debug line even
        # when debug logging is off; only replies pass here, but still skip it.
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", msg)
        return msg

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", msg)
        return msg


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # reported by ``shut`` when it waited; else of no interest


async def discard(link: QmpLink) -> None:
    """Tear a link down whatever state it is in, swallowing its final error."""
    with contextlib.suppress(Exception):
        await link.shut()
