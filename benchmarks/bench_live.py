"""Live-path rows: throughput on 1 and 100 connections, latency at 1,000 events/s, isolation.

See ``live.py`` for the rig. Each figure is the median of ``runs`` fresh rigs;
throughput is from telling the peer to start until the last action started,
with the journal (as ``run`` is deployed) and without it (in memory).
"""

from __future__ import annotations

import os
import tempfile
import time

from common import Row, median, spread, verdict
from live import LiveResult, bare_latency, latency, percentile, throughput

RATE_TARGET = 30_000
P99_TARGET_MS = 2.0
ISOLATION_TARGET_MS = 10.0


def _ms(ns: float) -> float:
    return ns / 1e6


def bench_throughput(total: int, runs: int) -> list[Row]:
    """Events per second through the whole path, on one and on 100 connections."""
    rows = []
    for connections in (1, 100):
        for journal in (True, False):
            results = [throughput(connections, total, journal) for _ in range(runs)]
            rates = [r.rate for r in results]
            cpu_us = median([r.cpu / r.events * 1e6 for r in results])
            rate = median(rates)
            where = "journal" if journal else "in memory"
            rows.append(
                Row(f"live: {connections} connection{'s' * (connections > 1)}, {where}",
                    f"{rate:,.0f} ev/s", f"{cpu_us:.1f} us CPU/event; runs {spread(rates)}",
                    f">= {RATE_TARGET:,} ev/s", verdict(rate >= RATE_TARGET))
            )  # fmt: skip
    return rows


def _p(result: LiveResult | list[int], q: float) -> float:
    values = result.latencies_ns if isinstance(result, LiveResult) else result
    return _ms(percentile(values, q))


def fsync_latency(count: int = 1000) -> list[int]:
    """The journal's floor: append 4 KiB to a file in a temp dir and fsync it, ``count`` times."""
    block = b"x" * 4096
    out = []
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp:
        fd = os.open(os.path.join(tmp, "f"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for _ in range(count):
                t = time.monotonic_ns()
                os.write(fd, block)
                os.fsync(fd)
                out.append(time.monotonic_ns() - t)
        finally:
            os.close(fd)
    return out


def bench_latency(seconds: float, runs: int) -> list[Row]:
    """p50 and p99 from write to action start at 1,000 events/s, next to the floors."""
    bare = [bare_latency(1000, seconds) for _ in range(runs)]
    disk = [fsync_latency() for _ in range(runs)]
    rows = [
        Row("latency: bare socket reader (floor)",
            f"p50 {median([_p(b, .5) for b in bare]):.2f} ms",
            f"p99 {median([_p(b, .99) for b in bare]):.2f} ms", "", ""),
        Row("latency: fsync of 4 KiB in the temp dir (journal's floor)",
            f"p50 {median([_p(d, .5) for d in disk]):.2f} ms",
            f"p99 {median([_p(d, .99) for d in disk]):.2f} ms", "", ""),
    ]  # fmt: skip
    for journal in (True, False):
        results = [latency(1000, seconds, journal) for _ in range(runs)]
        p50 = median([_p(r, 0.5) for r in results])
        p99s = [_p(r, 0.99) for r in results]
        p99 = median(p99s)
        where = "journal" if journal else "in memory"
        rows.append(
            Row(f"latency: 1,000 ev/s, {where}", f"p50 {p50:.2f} ms",
                f"p99 {p99:.2f} ms (runs {spread(p99s)})", f"p99 < {P99_TARGET_MS:g} ms",
                verdict(p99 < P99_TARGET_MS))
        )  # fmt: skip
    return rows


def bench_isolation(seconds: float, runs: int) -> list[Row]:
    """The quiet VM's p99 with another VM flooding BLOCK_IO_ERROR, against without."""
    alone, flooded = [], []
    for _ in range(runs):  # alternated, so both see the same machine
        alone.append(_p(latency(1000, seconds, True), 0.99))
        flooded.append(_p(latency(1000, seconds, True, flood=True), 0.99))
    extra = median(flooded) - median(alone)
    return [
        Row("isolation: quiet VM p99, another VM flooding", f"p99 {median(flooded):.2f} ms",
            f"+{extra:.2f} ms over alone ({median(alone):.2f} ms); runs {spread(flooded)}",
            f"+ <= {ISOLATION_TARGET_MS:g} ms", verdict(extra <= ISOLATION_TARGET_MS)),
    ]  # fmt: skip


def bench_state(total: int, seconds: float, runs: int) -> list[Row]:
    """Durable engine state's cost: windowed rules with and without it, runs alternated."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    p99s: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(runs):
        for durable in (False, True):
            rates[durable].append(throughput(1, total, True, state=durable).rate)
            p99s[durable].append(_p(latency(1000, seconds, True, state=durable), 0.99))
    rows = []
    for durable in (False, True):
        where = "engine state durable" if durable else "engine state in memory"
        rate, p99 = median(rates[durable]), median(p99s[durable])
        rows.append(
            Row(f"state: 1 connection, windowed rules, {where}", f"{rate:,.0f} ev/s",
                f"p99 {p99:.2f} ms at 1,000 ev/s; runs {spread(rates[durable])}", "", "")
        )  # fmt: skip
    cost = 1 - median(rates[True]) / median(rates[False])
    extra = median(p99s[True]) - median(p99s[False])
    rows.append(
        Row("state: cost of durable engine state", f"{cost:+.1%} ev/s",
            f"p99 {extra:+.2f} ms", "<= 10% ev/s", verdict(cost <= 0.10))
    )  # fmt: skip
    return rows
