"""The live path, end to end: a fake QEMU process -> unix sockets -> the assembled reactor.

The reactor side is what ``qmp-reactor run`` wires together: ``ConnectionManager``
(qemu.qmp underneath) feeding ``Reactor`` (the QEMU stage, the compiled rules,
the dispatcher, with or without its SQLite journal), with the default rule pack,
100 generated rules and one benchmark rule whose action, ``bench_noop``, only
notes when it started. The fake QEMU (``peer.py``) runs in its own process; on
a machine with two cores or more each side is pinned to a core of its own, so
every figure is what one core of the reactor does.

Latency is from the moment the peer writes an event (its ``data.t``, read from
CLOCK_MONOTONIC, shared by every process) to the moment the action starts. Its
floor, measured the same way, is ``bare_latency``: a plain client that reads
the same lines off the same kind of socket and parses them, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from workload import write_rules

HERE = Path(__file__).resolve().parent

BENCH_RULE = """rules:
  - name: bench-noop
    description: Every benchmark event reaches a no-op action.
    on: [SUSPEND]
    actions: [{type: bench_noop}]
"""


STATE_RULES = """rules:
  - name: bench-first
    description: The first SUSPEND of a VM a minute (a once_within window per VM).
    on: [SUSPEND]
    throttle: {mode: once_within, window: 1m, key: [$.vm]}
    actions: [{type: log}]
  - name: bench-settle
    description: The last SUSPEND of each second per VM (a held event replaced every event).
    on: [SUSPEND]
    throttle: {mode: once_after, window: 1s, key: [$.vm]}
    actions: [{type: log}]
"""


class _NoParams(BaseModel):
    pass


@dataclass
class Recorder:
    """What the no-op action saw: how many started, when the last did, and latencies."""

    expected: int = 0
    started: int = 0
    last: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    marks: dict[int, Callable[[], None]] = field(default_factory=dict)
    """Called when that many actions have started (memory samples)."""

    async def run(self, params: Any, ctx: Any) -> None:
        """The ``bench_noop`` action: note the start, nothing else."""
        now = time.monotonic_ns()
        self.started += 1
        self.last = time.perf_counter()
        sent = ctx.envelope["data"].get("t")
        if sent is not None:
            self.latencies_ns.append(now - sent)
        mark = self.marks.get(self.started)
        if mark is not None:
            mark()
        if self.started >= self.expected:
            self.done.set()


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run this process on one CPU for a while (no-op where affinity is not available)."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cpus() -> tuple[int | None, int | None]:
    """(reactor CPU, peer CPU): two different ones when there are two."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        return None, None
    return mine[0], mine[1]


def rss() -> int:
    """Resident set size of this process in bytes, after a full collection."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeerProcess:
    """``peer.py`` as a subprocess, driven over its standard input and output."""

    def __init__(self, directory: Path, vms: list[dict[str, Any]], cpu: int | None) -> None:
        self.plan = json.dumps({"dir": str(directory), "vms": vms})
        self.cpu = cpu
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it and wait until it listens."""
        cpu = [str(self.cpu)] if self.cpu is not None else []
        args = [str(HERE / "peer.py"), self.plan, *cpu]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        await self.expect("ready")

    async def expect(self, word: str, timeout: float = 300) -> str:
        """The peer's next line, which must start with ``word``."""
        assert self.proc is not None and self.proc.stdout is not None
        text = (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode().strip()
        if not text.startswith(word):
            raise RuntimeError(f"peer said {text!r}, expected {word!r}")
        return text

    def go(self) -> None:
        """Start sending."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    async def close(self) -> None:
        """Hang up and wait for it to exit."""
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class LiveResult:
    """One live run: actions started, wall seconds from ``go`` to the last one, CPU seconds."""

    events: int
    seconds: float
    cpu: float
    latencies_ns: list[int]
    samples: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Events per second, wall clock."""
        return self.events / self.seconds


class Rig:
    """A reactor with its connections to a peer process, for one scenario."""

    def __init__(
        self, tmp: Path, vms: list[dict[str, Any]], journal: bool, state: bool | None = None
    ) -> None:
        self.tmp = tmp
        self.vms = vms
        self.journal = journal
        self.state = state
        """None: no windowed rules; else ``STATE_RULES`` too, their state durable or not."""
        self.recorder = Recorder()
        self.connected: set[str] = set()
        self.all_connected = asyncio.Event()
        self.closing = False
        self.switch_interval = sys.getswitchinterval()
        self.reactor: Any = None
        self.conns: Any = None
        self.peer: PeerProcess | None = None

    def _on_state(self, vm: str, up: bool) -> None:
        if up:
            self.connected.add(vm)
            if len(self.connected) == len(self.vms):
                self.all_connected.set()

    def _feed(self, env: dict[str, Any]) -> None:
        if not self.closing:  # as the daemon: closing our connections is no news about the VMs
            self.reactor.feed(env)

    async def start(self, peer_cpu: int | None) -> None:
        """Rules, peer, reactor, connections: everything up, as the daemon is once ready."""
        from reactor.clock import AsyncioClock
        from reactor.plugins.api import ActionType
        from reactor.plugins.manager import load_plugins
        from reactor.rules.compiler import require_rules
        from reactor.service.config import Config
        from reactor.service.reactor import Reactor, tune_for_serving
        from reactor.sources.manager import ConnectionManager

        rules_dir = write_rules(self.tmp / "rules", 100)
        (rules_dir / "bench.yaml").write_text(BENCH_RULE)
        if self.state is not None:
            (rules_dir / "state.yaml").write_text(STATE_RULES)
        types = load_plugins(plugin_dirs=(), load_entry_points=False).action_types()
        types["bench_noop"] = ActionType("bench_noop", _NoParams, self.recorder.run)
        rules, _ = require_rules([rules_dir], action_types=types)
        self.peer = PeerProcess(self.tmp, self.vms, peer_cpu)
        await self.peer.start()
        self.conns = ConnectionManager(self._feed, on_state=self._on_state)
        self.reactor = Reactor(
            config=Config(),
            rules=rules,
            action_types=types,
            clock=AsyncioClock(),
            state_dir=self.tmp / "state" if self.journal else None,
            vm_lookup=self.conns.lookup,
            keep_state=bool(self.state),
        )
        await self.reactor.start()
        self.conns.pace = self.reactor.backpressure  # as the daemon: overload slows readers
        for vm in self.vms:
            self.conns.add(str(self.tmp / f"{vm['name']}.qmp"), vm["name"])
        await self.peer.expect("connected")
        await asyncio.wait_for(self.all_connected.wait(), 300)
        tune_for_serving()

    async def run(self, expected: int, timeout: float = 900) -> LiveResult:
        """Let the peer send; return once ``expected`` actions have started."""
        assert self.peer is not None
        self.recorder.expected = expected
        t0, c0 = time.perf_counter(), time.process_time()
        self.peer.go()
        if expected > 0:
            await asyncio.wait_for(self.recorder.done.wait(), timeout)
        t1, c1 = self.recorder.last, time.process_time()
        await self.peer.expect("sent")
        return LiveResult(expected, t1 - t0, c1 - c0, list(self.recorder.latencies_ns))

    async def close(self) -> None:
        """Connections, reactor and peer down; the interpreter's settings back to normal."""
        self.closing = True
        if self.conns is not None:
            await self.conns.aclose()
        if self.reactor is not None:
            await self.reactor.stop(5.0)
        if self.peer is not None:
            await self.peer.close()
        gc.unfreeze()
        sys.setswitchinterval(self.switch_interval)


async def scenario(
    vms: list[dict[str, Any]],
    expected: int,
    journal: bool,
    prepare: Callable[[Rig], None] | None = None,
    state: bool | None = None,
) -> LiveResult:
    """One scenario on a fresh rig, the reactor pinned to its own core."""
    mine, theirs = cpus()
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp, pinned(mine):
        rig = Rig(Path(tmp), vms, journal, state)
        try:
            await rig.start(theirs)
            if prepare is not None:
                prepare(rig)
            return await rig.run(expected)
        finally:
            await rig.close()


def flood_plan(connections: int, per_connection: int) -> list[dict[str, Any]]:
    """``connections`` VMs each flooding ``per_connection`` SUSPEND events."""
    return [
        {"name": f"vm{i}", "kind": "flood", "event": "SUSPEND", "count": per_connection}
        for i in range(connections)
    ]


def throughput(
    connections: int, total: int, journal: bool, state: bool | None = None
) -> LiveResult:
    """Events per second through the whole path, ``total`` events over ``connections``
    (``state``: with windowed rules, their state durable or not)."""
    per = total // connections
    plan = flood_plan(connections, per)
    return asyncio.run(scenario(plan, per * connections, journal, state=state))


def rate_vm(rate: float, seconds: float) -> dict[str, Any]:
    """The quiet VM: SUSPEND events at ``rate`` a second, each stamped when written."""
    return {"name": "quiet", "kind": "rate", "event": "SUSPEND", "rate": rate, "seconds": seconds}


def latency(
    rate: float, seconds: float, journal: bool, flood: bool = False, state: bool | None = None
) -> LiveResult:
    """Latencies of the quiet VM's events; with ``flood``, another VM floods BLOCK_IO_ERROR."""
    vms = [rate_vm(rate, seconds)]
    if flood:
        vms.append({"name": "flooder", "kind": "flood", "event": "BLOCK_IO_ERROR"})
    return asyncio.run(scenario(vms, int(rate * seconds), journal, state=state))


async def _bare_latency(rate: float, seconds: float) -> list[int]:
    mine, theirs = cpus()
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp, pinned(mine):
        peer = PeerProcess(Path(tmp), [rate_vm(rate, seconds)], theirs)
        await peer.start()
        reader, writer = await asyncio.open_unix_connection(str(Path(tmp) / "quiet.qmp"))
        try:
            await reader.readline()  # the greeting
            for command in ("qmp_capabilities", "query-version", "query-status"):
                writer.write(json.dumps({"execute": command}).encode())
                await reader.readline()
            await peer.expect("connected")
            peer.go()
            latencies = []
            for _ in range(int(rate * seconds)):
                line = await reader.readline()
                sent = json.loads(line)["data"]["t"]
                latencies.append(time.monotonic_ns() - sent)
            await peer.expect("sent")
        finally:
            writer.close()
            await writer.wait_closed()
            await peer.close()
    return latencies


def bare_latency(rate: float, seconds: float) -> list[int]:
    """The floor: peer to a plain reader of the socket, which only parses each line."""
    return asyncio.run(_bare_latency(rate, seconds))


def percentile(values: list[int], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])
