"""The fleet over a real ``nats-server -js`` on loopback.

- publish throughput through the durable outbox: envelopes queued in one go,
  timed until JetStream acknowledged the last (each row written to the outbox
  file, published with its message id, removed);
- end-to-end latency: a host sidecar (``run --nats``) with a fake QMP peer, a
  central (``run --from-nats``) with a rule ``STOP -> qmp cont``; from the peer
  sending STOP to the ``cont`` command arriving back at the peer (host -> stream
  -> central rule -> journal -> command request -> host's dispatcher -> QMP).

Run: ``python benchmarks/bench_fleet.py`` (needs the test extra's nats-server).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Row, median, print_table, spread

from reactor.fleet.link import Link
from reactor.fleet.publisher import Publisher
from reactor.params.secrets import SecretResolver
from reactor.service.config import NatsConfig
from tests.support.natsserver import NatsServer
from tests.support.ops import Sidecar, write_rules
from tests.test_faults import PeerThread

EVENTS = 20_000


async def publish_rate(url: str, state: Path, run: int) -> float:
    cfg = NatsConfig(url=url, stream=f"BENCH{run}", subject_prefix=f"bench{run}")
    pub = Publisher(cfg, "h1", state)
    link = Link(cfg, SecretResolver(), "bench")
    await link.open()
    writer = asyncio.create_task(pub.write())
    sender = asyncio.create_task(pub.send(link))
    env = {"event": "BLOCK_IO_ERROR", "data": {"device": "disk0", "reason": "x"}, "vm": "vm1",
           "source": "/run/vm1.qmp", "timestamp": {"seconds": 1, "microseconds": 0}}  # fmt: skip
    start = time.perf_counter()
    for seq in range(EVENTS):
        pub.envelope({**env, "seq": seq})
    while pub.published < EVENTS:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - start
    for task in (writer, sender):
        task.cancel()
    await asyncio.gather(writer, sender, return_exceptions=True)
    await pub.close()
    await link.close()
    return EVENTS / elapsed


def e2e_latencies(workdir: Path, url: str, count: int) -> list[float]:
    qmp = workdir / "vm1.qmp"
    quiet = write_rules(workdir / "host.yaml", {"name": "q", "on": "POWERDOWN",
                                                "actions": [{"type": "log"}]})  # fmt: skip
    rule = {"name": "cont", "on": "STOP", "actions": [{"type": "qmp", "with": {"command": "cont"}}]}
    central_rules = write_rules(workdir / "central.yaml", rule)
    (workdir / "h").mkdir()
    (workdir / "c").mkdir()
    h = Sidecar(workdir / "h", {"rules": [str(quiet)], "qmp": [str(qmp)], "host": "h1",
                                "vms": [{"address": str(qmp), "name": "vm1"}],
                                "nats": {"url": url}}, args=())  # fmt: skip
    c = Sidecar(workdir / "c", {"rules": [str(central_rules)],
                                "nats": {"url": url, "central": True}}, args=())  # fmt: skip
    peer = PeerThread(qmp)
    out = []
    with peer as fake, h.start(), c.start():
        c.wait_log("central, consuming")
        h.wait_log("nats .*: connected")
        while not fake.accepted:
            time.sleep(0.01)
        time.sleep(1.0)
        for _ in range(count):
            seen = fake.peers[-1].commands.count("cont")
            start = time.perf_counter()
            sent = fake.peers[-1].send_event("STOP", {})
            asyncio.run_coroutine_threadsafe(sent, peer.loop).result(10)
            while fake.peers[-1].commands.count("cont") == seen:
                time.sleep(0.0005)
            out.append(time.perf_counter() - start)
    return out


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as server:
        rates = []
        for run in range(3):
            state = Path(tmp) / f"state{run}"
            state.mkdir()
            rates.append(asyncio.run(publish_rate(server.url, state, run)))
        rows.append(Row(f"publish through the outbox ({EVENTS:,} events)",
                        f"{median(rates):,.0f} events/s", spread(rates)))  # fmt: skip
        lat = sorted(e2e_latencies(Path(tmp), server.url, 50))
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        rows.append(Row("host -> central rule -> command -> host (50 STOPs)",
                        f"{median(lat) * 1000:.1f} ms", f"p99 {p99 * 1000:.1f} ms"))  # fmt: skip
    print_table(rows)


if __name__ == "__main__":
    main()
