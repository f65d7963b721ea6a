"""Memory stays flat over a million events on one connection.

qemu.qmp's event listeners keep every event in a ``history`` list and queue
what nobody drains; a sidecar that runs for months must not. The fake peer
writes pre-encoded events in big batches as fast as the socket takes them; the
resident set size is read after 200,000 and after 1,000,000 events.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import tempfile
from pathlib import Path

from reactor.model import Envelope
from reactor.sources.manager import ConnectionManager
from tests import fakeqmp
from tests.fakeqmp import FakeQmp

EVENTS = 1_000_000
FIRST_MARK = 200_000
ALLOWED_GROWTH = 4 * 1024 * 1024


def rss() -> int:
    """Resident set size of this process in bytes, after a full collection."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Meter:
    """Counts the flood's envelopes and samples memory at the two marks."""

    def __init__(self) -> None:
        self.count = 0
        self.last_seq = 0
        self.gaps = 0
        self.samples: dict[int, int] = {}
        self.done = asyncio.Event()

    def __call__(self, env: Envelope) -> None:
        if env["seq"] != self.last_seq + 1:
            self.gaps += 1
        self.last_seq = env["seq"]
        if env["event"] != "BLOCK_IO_ERROR":
            return
        self.count += 1
        if self.count in (FIRST_MARK, EVENTS):
            self.samples[self.count] = rss()
        if self.count == EVENTS:
            self.done.set()


def test_memory_is_flat_over_a_million_events() -> None:
    directory = Path(tempfile.mkdtemp(prefix="qr-soak-"))
    path = str(directory / "flood.qmp")
    meter = Meter()

    async def scenario() -> int:
        async with FakeQmp(path, fakeqmp.flood(EVENTS)):
            manager = ConnectionManager(meter)
            vm = manager.add(path)
            await asyncio.wait_for(meter.done.wait(), timeout=300)
            link = vm._link
            assert link is not None
            # the library's own listener saw nothing: events never reach it
            history = len(link.events.history) + link.events._queue.qsize()
            await manager.aclose()
            return history

    try:
        library_history = asyncio.run(scenario())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert meter.count == EVENTS and meter.gaps == 0
    assert library_history == 0
    growth = meter.samples[EVENTS] - meter.samples[FIRST_MARK]
    assert growth < ALLOWED_GROWTH, f"RSS grew by {growth / 2**20:.1f} MiB over 800k events"
