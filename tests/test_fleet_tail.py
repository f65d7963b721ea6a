"""``tail --from-nats`` and ``replay`` of a stream's export, against a real ``nats-server -js``.

The hosts and the central are real ``qmp-reactor run`` subprocesses; the tails
and the replay are real ``qmp-reactor`` commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.natsserver import NatsServer
from tests.support.ops import Receiver, webhook_rule, write_rules
from tests.test_faults import PeerThread
from tests.test_fleet import central, host, io_error, published, send, server, wait

__all__ = ["server"]  # the fixture


def qmp_reactor(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reactor", *args], capture_output=True,
                          text=True, timeout=120, **kwargs)  # fmt: skip


def test_tail_prints_the_fleet_live_and_its_export_replays_to_the_centrals_firings(
    tmp_path: Path, server: NatsServer
) -> None:
    receiver = Receiver()
    rules = (
        webhook_rule("per-host", "BLOCK_IO_ERROR", receiver.url,
                     threshold={"count": 2, "window": "60s", "key": "$.host"}),
        webhook_rule("across", "BLOCK_IO_ERROR", receiver.url,
                     threshold={"count": 2, "window": "60s", "key": "$.event"}),
    )  # fmt: skip
    peers = [PeerThread(tmp_path / f"h{i}.qmp") for i in (1, 2)]
    live, errors = tmp_path / "live.txt", tmp_path / "live-errors.txt"
    try:
        with peers[0] as f1, peers[1] as f2, live.open("w") as out, errors.open("w") as err:
            fakes = {"h1": (peers[0], f1), "h2": (peers[1], f2)}
            hosts = [host(tmp_path, h, server.url, [str(tmp_path / f"{h}.qmp")]) for h in fakes]
            with hosts[0].start(), hosts[1].start(), central(tmp_path, server.url, *rules).start():
                for h in hosts:
                    h.wait_log("nats .*: connected")
                wait(lambda: f1.accepted and f2.accepted, 20, "connections")
                wait(lambda: len(server.messages()) == 2, 30, "both REACTOR_CONNECTED stored")
                tail = subprocess.Popen(
                    [sys.executable, "-m", "reactor", "tail", "--from-nats", server.url],
                    stdout=out, stderr=err, text=True,
                )  # fmt: skip
                wait(lambda: "new" in server.consumers(), 30, "the tail's consumer")
                # h1, h2, h1: one firing per rule, each at another event (if hosts are kept)
                for n, name in enumerate(("h1", "h2", "h1"), 1):
                    send(*fakes[name], "BLOCK_IO_ERROR", io_error(n))
                    wait(lambda n=n: len(published(server, "BLOCK_IO_ERROR")) == n, 20, "stored")
                receiver.wait(lambda r: len(r.delivered) == 2, 60, "the central's firings")
                wait(lambda: live.read_text().count("BLOCK_IO_ERROR") == 3, 30, errors.read_text())
                tail.send_signal(signal.SIGTERM)
                assert tail.wait(30) == 0, errors.read_text()
        export = qmp_reactor("tail", "--from-nats", server.url, "--json", "--from-start",
                             "--until-caught-up")  # fmt: skip
    finally:
        receiver.close()
    assert export.returncode == 0, export.stderr
    lines = [line for line in live.read_text().splitlines() if "BLOCK_IO_ERROR" in line]
    assert [line.split()[2] for line in lines] == ["h1/vm1", "h2/vm1", "h1/vm1"]
    records = [json.loads(line) for line in export.stdout.splitlines()]
    assert len(records) == 5 and records[0]["event"] == "REACTOR_CONNECTED"
    assert [r["host"] for r in records[2:]] == ["h1", "h2", "h1"]

    path = tmp_path / "fleet.jsonl"
    path.write_text(export.stdout)
    rule_file = write_rules(tmp_path / "replay-rules.yaml", *rules)
    replayed = qmp_reactor("replay", str(path), "--rules", str(rule_file))
    assert replayed.returncode == 0, replayed.stderr
    devices = [r["data"].get("device") for r in records]
    would = {
        (f["rule"], devices[f["seq"] - 1]) for f in map(json.loads, replayed.stdout.splitlines())
    }
    saw = {
        (body["rule"], body["event"]["data"]["device"])
        for body in (json.loads(b) for _, b in receiver.requests)
    }
    assert would == saw == {("across", "disk2"), ("per-host", "disk3")}


def test_a_durable_tail_resumes_where_it_stopped_and_errors_are_one_line(
    tmp_path: Path, server: NatsServer
) -> None:
    peer = PeerThread(tmp_path / "h1.qmp")
    with peer as fake, host(tmp_path, "h1", server.url, [str(tmp_path / "h1.qmp")]) as h1:
        h1.start().wait_log("nats .*: connected")
        wait(lambda: fake.accepted == 1, 20, "a connection")
        durable = ("tail", "--from-nats", server.url, "--durable", "archive", "--json",
                   "--from-start", "--until-caught-up")  # fmt: skip
        send(peer, fake, "BLOCK_IO_ERROR", io_error(1))
        wait(lambda: len(server.messages()) == 2, 20, "stored")
        first = qmp_reactor(*durable)
        send(peer, fake, "BLOCK_IO_ERROR", io_error(2))
        wait(lambda: len(server.messages()) == 3, 20, "stored")
        second = qmp_reactor(*durable)
        third = qmp_reactor(*durable)
    got = [[json.loads(line).get("data", {}).get("device") for line in run.stdout.splitlines()]
           for run in (first, second, third)]  # fmt: skip
    assert got == [[None, "disk1"], ["disk2"], []]
    env = {**os.environ, "NATS_PW": "s3cret-never-shown"}
    refused = qmp_reactor("tail", "--from-nats", "nats://u:${env:NATS_PW}@127.0.0.1:1",
                          "--until-caught-up", env=env)  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.startswith("qmp-reactor: error: tail: nats nats://127.0.0.1:1: ")
    assert len(refused.stderr.splitlines()) == 1 and "s3cret" not in refused.stderr
    mixed = qmp_reactor("tail", "vm.qmp", "--from-nats", server.url)
    assert mixed.returncode == 1 and "Traceback" not in mixed.stderr
