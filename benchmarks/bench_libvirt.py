"""Event delivery through libvirt against a direct QMP socket, on one and the same domain.

A private libvirtd (``tests/support/libvirtd.py``) runs the tiny guest as a TCG
domain that also has a second QMP monitor of its own (through
``<qemu:commandline>``, which taints it: only this benchmark wants that). One
process holds a ``LibvirtSource`` on the libvirt URI and a ``VmConnection`` on
the direct socket, on one event loop; ``stop``/``cont`` pairs sent on the direct
socket make QEMU emit each STOP and RESUME once, to both. Each path's latency is
the wall clock when the envelope is handed on minus QEMU's own timestamp of the
event, so both are measured on the same events at the same time.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from common import Row, median, spread

from reactor.model import Envelope
from reactor.sources.libvirt import LibvirtSource
from reactor.sources.vm import VmConnection
from tests.support.libvirtd import GuestFiles, Libvirtd, domain_xml

PACE = 0.02
"""Seconds between commands: well apart, so each event is measured on its own."""


def _latency_ms(env: Envelope) -> float:
    stamp = env["timestamp"]
    emitted = stamp["seconds"] + stamp["microseconds"] / 1e6
    return (float(env["received_at"]) - emitted) * 1000


async def _measure(uri: str, qmp: Path, name: str, pairs: int) -> tuple[list[float], list[float]]:
    via_libvirt: list[float] = []
    direct: list[float] = []

    def seen(into: list[float]) -> Callable[[Envelope], None]:
        def on_envelope(env: Envelope) -> None:
            if env["event"] in ("STOP", "RESUME") and env["vm"] == name:
                into.append(_latency_ms(env))

        return on_envelope

    source = LibvirtSource(uri, seen(via_libvirt))
    conn = VmConnection(str(qmp), name, seen(direct))
    tasks = [asyncio.create_task(source.run()), asyncio.create_task(conn.dial_forever(str(qmp)))]
    try:
        async with asyncio.timeout(120):
            while source.get(name) is None or not conn.connected:
                await asyncio.sleep(0.05)
        for _ in range(pairs):
            for command in ("stop", "cont"):
                await conn.execute(command)
                await asyncio.sleep(PACE)
        async with asyncio.timeout(30):
            while len(via_libvirt) < 2 * pairs or len(direct) < 2 * pairs:
                await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return via_libvirt, direct


async def _runs(
    uri: str, qmp: Path, name: str, pairs: int, runs: int
) -> list[tuple[list[float], list[float]]]:
    return [await _measure(uri, qmp, name, pairs) for _ in range(runs)]


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_libvirt(pairs: int, runs: int) -> list[Row]:
    """p50/p99 of STOP/RESUME delivery through libvirt and through a direct QMP socket."""
    name = "bench-libvirt"
    with tempfile.TemporaryDirectory(prefix="bench-libvirtd-") as tmp, Libvirtd(Path(tmp)) as lv:
        files = GuestFiles()
        try:
            xml = files.dir / "domain.xml"
            xml.write_text(domain_xml(name, files, direct_qmp=True))
            lv.virsh("create", str(xml))
            # libvirt's events go to one event loop per process: every run on the same one
            results = asyncio.run(_runs(lv.uri, files.qmp(name), name, pairs, runs))
        finally:
            lv.virsh("destroy", name, check=False)
            files.close()
    rows = []
    for label, index in (("direct QMP socket", 1), ("libvirt (QMP event API)", 0)):
        p50s = [_p(r[index], 0.5) for r in results]
        p99s = [_p(r[index], 0.99) for r in results]
        rows.append(
            Row(f"libvirt: STOP/RESUME delivery, {label}", f"p50 {median(p50s):.2f} ms",
                f"p99 {median(p99s):.2f} ms (runs {spread(p99s)})", "", "")
        )  # fmt: skip
    extra = [statistics.median(r[0]) - statistics.median(r[1]) for r in results]
    rows.append(
        Row("libvirt: added by libvirt over the direct socket", f"+{median(extra):.2f} ms",
            f"p50 difference per run, runs {spread(extra)}", "", "")
    )  # fmt: skip
    return rows
