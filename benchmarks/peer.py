"""A fake QEMU for the live benchmarks, run as its own process: ``python benchmarks/peer.py``.

It listens on one unix socket per VM, speaks real QMP (greeting,
``qmp_capabilities``, command replies, event lines as QEMU writes them) through
``tests/fakeqmp.py``, and, once every VM is connected and the benchmark writes
``go`` on its standard input, sends each VM's events:

- ``flood``: ``count`` events as fast as the socket takes them (pre-encoded
  lines, written a thousand at a time); with no ``count``, until every ``rate``
  VM has sent all of its events;
- ``rate``: ``rate`` events per second for ``seconds``, one write each, every
  event stamped in ``data.t`` with ``time.monotonic_ns()`` just before it is
  written (CLOCK_MONOTONIC is one clock for every process of the machine);
- ``idle``: nothing, it stays connected.

The plan is JSON on the command line: ``{"dir": ..., "vms": [{"name", "kind",
"event", "count", "rate", "seconds"}, ...]}``. The peer prints ``ready`` once it
listens, ``connected`` once every VM is through the QMP handshake and ``sent N``
when all its events are written; it exits when its standard input closes.
Running apart from the reactor, it does not share the measured process's core.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakeqmp import FakeQmp, Peer, timestamp

BATCH = 1000
DATA = {
    "BLOCK_IO_ERROR": {"device": "", "node-name": "disk0", "operation": "write", "action": "report",
                       "nospace": False, "reason": "Input/output error"},
    "SUSPEND": {},
}  # fmt: skip


def line(event: str, data: dict[str, Any]) -> bytes:
    """One event line, as QEMU writes it."""
    message = {"timestamp": timestamp(), "event": event, "data": data}
    return json.dumps(message).encode() + b"\n"


class Plan:
    """Who connected, and the moment to start sending."""

    def __init__(self, vms: list[dict[str, Any]]) -> None:
        self.vms = vms
        self.ready = 0
        self.all_connected = asyncio.Event()
        self.go = asyncio.Event()
        self.sent = 0
        self.finished = 0
        self.rated = asyncio.Event()
        self.rate_left = sum(1 for vm in vms if vm["kind"] == "rate")

    def behaviour(self, vm: dict[str, Any]) -> Any:
        """The coroutine serving ``vm``'s connection."""

        async def behave(peer: Peer) -> None:
            await peer.handshake()
            await peer.answer_intro()
            self.ready += 1
            if self.ready == len(self.vms):
                self.all_connected.set()
            await self.go.wait()
            if vm["kind"] == "flood" and not vm.get("count"):
                vm["count"] = await flood_until(peer, vm, self.rated)
            else:
                await SENDERS[vm["kind"]](peer, vm)
            if vm["kind"] == "rate":
                self.rate_left -= 1
                if not self.rate_left:
                    self.rated.set()
            self.sent += int(vm.get("count", 0))
            self.finished += 1
            await peer.serve_commands()

        return behave


async def flood(peer: Peer, vm: dict[str, Any]) -> None:
    """``count`` events, pre-encoded, as fast as the socket takes them."""
    event = vm["event"]
    count = int(vm["count"])
    one = line(event, DATA.get(event, {}))
    chunk = one * BATCH
    for _ in range(count // BATCH):
        await peer.send_raw(chunk)
    await peer.send_raw(one * (count % BATCH))


async def flood_until(peer: Peer, vm: dict[str, Any], stop: asyncio.Event) -> int:
    """Events as fast as the socket takes them until ``stop``; returns how many."""
    chunk = line(vm["event"], DATA.get(vm["event"], {})) * BATCH
    sent = 0
    while not stop.is_set():
        await peer.send_raw(chunk)
        sent += BATCH
    return sent


async def rate(peer: Peer, vm: dict[str, Any]) -> None:
    """``rate`` events a second for ``seconds``, each stamped as it is written."""
    event, per_second = vm["event"], float(vm["rate"])
    count = int(per_second * float(vm["seconds"]))
    vm["count"] = count
    base = dict(DATA.get(event, {}))
    start = time.monotonic()
    for i in range(count):
        delay = start + i / per_second - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        data = {**base, "t": time.monotonic_ns()}
        await peer.send_raw(line(event, data))


async def idle(peer: Peer, vm: dict[str, Any]) -> None:
    """Nothing: the VM stays connected and quiet."""


SENDERS = {"flood": flood, "rate": rate, "idle": idle}


async def main(plan_text: str) -> None:
    spec = json.loads(plan_text)
    directory = Path(spec["dir"])
    plan = Plan(spec["vms"])
    servers = [
        FakeQmp(directory / f"{vm['name']}.qmp", default=plan.behaviour(vm)) for vm in plan.vms
    ]
    for server in servers:
        await server.start()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("ready", flush=True)
    await plan.all_connected.wait()
    print("connected", flush=True)
    while (command := await stdin.readline()) not in (b"", b"go\n"):
        pass
    plan.go.set()
    if command:
        while plan.finished < len(plan.vms):
            await asyncio.sleep(0.01)
        print(f"sent {plan.sent}", flush=True)
        await stdin.read()  # until the benchmark hangs up
    for server in servers:
        await server.close()


if __name__ == "__main__":
    if len(sys.argv) > 2:
        os.sched_setaffinity(0, {int(sys.argv[2])})
    asyncio.run(main(sys.argv[1]))
