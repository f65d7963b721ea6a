"""The central's windows are durable: a threshold across hosts survives a kill -9 of the central.

Real ``qmp-reactor run`` subprocesses (two hosts, the central) and a real
``nats-server -js``; the central keeps its engine state in its state directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.support.natsserver import NatsServer
from tests.support.ops import Receiver
from tests.test_faults import PeerThread
from tests.test_fleet import central, host, io_error, published, send, server, wait, webhook_rule

__all__ = ["server"]  # the fixture


def test_a_count_3_threshold_across_hosts_survives_a_kill9_of_the_central(
    tmp_path: Path, server: NatsServer
) -> None:
    receiver = Receiver()
    rule = webhook_rule("storage-down", "BLOCK_IO_ERROR", receiver.url,
                        threshold={"count": 3, "window": "10m", "key": "$.event"})  # fmt: skip
    peers = [PeerThread(tmp_path / f"h{i}.qmp") for i in (1, 2)]
    try:
        with peers[0] as f1, peers[1] as f2:
            fakes = [(peers[0], f1), (peers[1], f2)]
            hosts = [
                host(tmp_path, f"h{i}", server.url, [str(tmp_path / f"h{i}.qmp")]) for i in (1, 2)
            ]
            with hosts[0].start(), hosts[1].start(), central(tmp_path, server.url, rule) as c:
                c.start().wait_log("central, consuming QMP")
                wait(lambda: f1.accepted and f2.accepted, 20, "connections")
                for n, (peer, fake) in enumerate(fakes, 1):
                    send(peer, fake, "BLOCK_IO_ERROR", io_error(n))
                    wait(lambda n=n: len(published(server, "BLOCK_IO_ERROR")) == n, 20, "stored")
                stored = len(server.messages())
                wait(lambda: c.healthz()[1]["fleet"]["nats_acked"] == stored, 30, "caught up")
                c.kill9()
                send(*fakes[0], "BLOCK_IO_ERROR", io_error(3))
                c.start().wait_log(r"engine state: \d+ parts restored")
                receiver.wait(lambda r: len(r.delivered) == 1, 60, "the firing after the restart")
                time.sleep(1.0)
                assert len(receiver.delivered) == 1
                assert c.healthz()[1]["fleet"]["nats_redelivered"] == 0
    finally:
        receiver.close()
    body = json.loads(receiver.requests[-1][1])
    assert body["event"]["host"] == "h1" and body["event"]["data"]["device"] == "disk3"
    assert "Traceback" not in c.log_text()
