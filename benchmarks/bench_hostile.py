"""Hostile-peer rows: the sidecar's peak memory and a quiet VM's p99 while a local user attacks.

The rig of ``live.py`` (the reactor pinned to its own core, the quiet VM's
1,000 events/s from the fake QEMU process) also listens for QEMUs on a unix
socket (``--listen``), and ``hostile.py`` attacks that listener from a process
of its own: ``hold`` withholds its first reply while streaming 930 KB events,
``idle`` keeps 10,000 connections open that never greet. A thread samples the
reactor's resident memory and open descriptors every 10 ms; the rows give the
peak, and the quiet VM's p99 beside its p99 with no attack, run alternately.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from common import Row, median, spread, verdict
from live import HERE, Rig, cpus, latency, percentile, pinned, rate_vm

ISOLATION_TARGET_MS = 10.0
MEMORY_MAX_MB = 1024  # the example unit's MemoryMax=1G
IDLE = 10_000


@dataclass
class Attacked:
    """One run under attack: the quiet VM's p99, and the reactor's peaks."""

    p99_ms: float
    rss_mb: float
    before_mb: float
    fds: int
    tried: int
    sent_mb: float


def rss_mb() -> float:
    """This process's resident memory now, in MB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


class Sampler(threading.Thread):
    """Peak resident memory (MB) and open descriptors of this process, every 10 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.rss_mb = 0.0
        self.fds = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.01):
            self.rss_mb = max(self.rss_mb, rss_mb())
            self.fds = max(self.fds, len(os.listdir("/proc/self/fd")))


async def _attacked(mode: str, seconds: float) -> Attacked:
    mine, theirs = cpus()
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp, pinned(mine):
        rig = Rig(Path(tmp), [rate_vm(1000, seconds)], journal=True)
        sampler = Sampler()
        listen = str(Path(tmp) / "listen.sock")
        try:
            await rig.start(theirs)
            listener = asyncio.create_task(rig.conns.listen(listen))
            while not os.path.exists(listen):
                await asyncio.sleep(0.01)
            cpu = [str(theirs)] if theirs is not None else []
            args = [str(HERE / "hostile.py"), mode, listen, str(IDLE), *cpu]
            hostile = await asyncio.create_subprocess_exec(
                sys.executable, *args, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE)  # fmt: skip
            assert hostile.stdout is not None and hostile.stdin is not None
            before = rss_mb()
            await asyncio.wait_for(hostile.stdout.readline(), 60)  # started
            sampler.start()
            result = await rig.run(int(1000 * seconds))
            hostile.stdin.close()
            _, tried, sent = (await hostile.stdout.readline()).split()
            await hostile.wait()
            listener.cancel()
            await asyncio.wait([listener])
        finally:
            sampler.stopping.set()
            await rig.close()
    p99 = percentile(result.latencies_ns, 0.99) / 1e6
    return Attacked(p99, sampler.rss_mb, before, sampler.fds, int(tried), int(sent) / 1e6)


def attacked(mode: str, seconds: float) -> Attacked:
    """One run of the quiet VM with ``mode``'s attack on the listener."""
    return asyncio.run(_attacked(mode, seconds))


def bench_hostile(seconds: float, runs: int) -> list[Row]:
    """Peak memory and the quiet VM's p99 under the hold bomb and under 10,000 idle peers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker inherits it
    try:
        alone: list[float] = []
        under: dict[str, list[Attacked]] = {"hold": [], "idle": []}
        for _ in range(runs):  # alternated, so all see the same machine
            alone.append(percentile(latency(1000, seconds, True).latencies_ns, 0.99) / 1e6)
            for mode, results in under.items():
                results.append(attacked(mode, seconds))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    base = median(alone)
    rows = []
    names = {"hold": "a peer withholding its reply, streaming 930 KB events",
             "idle": f"{IDLE:,} idle connections to --listen"}  # fmt: skip
    for mode, results in under.items():
        rss = [r.rss_mb for r in results]
        p99s = [r.p99_ms for r in results]
        extra = median(p99s) - base
        rows += [
            Row(f"hostile: peak RSS, {names[mode]}", f"{median(rss):.0f} MB",
                f"{median([r.before_mb for r in results]):.0f} MB before; runs {spread(rss)}; "
                f"at most {max(r.fds for r in results)} descriptors; "
                f"{median([r.tried for r in results]):,.0f} connections tried"
                + (f", {median([r.sent_mb for r in results]):,.0f} MB sent" if mode == "hold"
                   else ""),
                f"< {MEMORY_MAX_MB} MB (MemoryMax)", verdict(median(rss) < MEMORY_MAX_MB)),
            Row(f"hostile: quiet VM p99, {names[mode]}", f"p99 {median(p99s):.2f} ms",
                f"+{extra:.2f} ms over alone ({base:.2f} ms); runs {spread(p99s)}",
                f"+ <= {ISOLATION_TARGET_MS:g} ms", verdict(extra <= ISOLATION_TARGET_MS)),
        ]  # fmt: skip
    return rows
