"""The fleet over a real ``nats-server -js``: sidecars publish, a central runs rules, commands.

Sidecars and the central are real ``qmp-reactor run`` subprocesses; VMs are the
fake QMP peer or a real QEMU; the server is a child on a free loopback port
with a temporary store (``tests/support/natsserver.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reactor.fleet.subjects import event_subject, token, untoken
from tests import fakeqmp
from tests.support.natsserver import NatsServer
from tests.support.ops import Receiver, Sidecar, webhook_rule, write_rules
from tests.test_faults import PeerThread


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path) as s:
        yield s


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def host(tmp_path: Path, name: str, url: str, qmp: list[str], **nats_cfg: Any) -> Sidecar:
    """A host's sidecar publishing to ``url`` as ``name``."""
    workdir = tmp_path / name
    workdir.mkdir()
    rules = write_rules(workdir / "rules.yaml", {"name": "quiet", "on": "POWERDOWN",
                                                 "actions": [{"type": "log"}]})  # fmt: skip
    vms = [{"address": a, "name": "vm1"} for a in qmp]
    config = {"rules": [str(rules)], "qmp": qmp, "host": name, "vms": vms,
              "nats": {"url": url, **nats_cfg}}  # fmt: skip
    return Sidecar(workdir, config)


def central(tmp_path: Path, url: str, *rules: dict[str, Any], name: str = "central") -> Sidecar:
    """A central instance over the stream at ``url``."""
    workdir = tmp_path / name
    workdir.mkdir(exist_ok=True)
    path = write_rules(workdir / "rules.yaml", *rules)
    config = {"rules": [str(path)], "nats": {"url": url, "central": True, "ack_wait": 2}}
    return Sidecar(workdir, config)


def send(peer_thread: PeerThread, fake: fakeqmp.FakeQmp, event: str, data: dict[str, Any]) -> None:
    """``event`` from the fake VM's latest connection."""
    coro = fake.peers[-1].send_event(event, data)
    asyncio.run_coroutine_threadsafe(coro, peer_thread.loop).result(10)


def io_error(n: int) -> dict[str, Any]:
    return {"device": f"disk{n}", "node-name": "n", "operation": "write", "action": "report",
            "nospace": False, "fatal": False, "reason": "Input/output error"}  # fmt: skip


def published(server: NatsServer, event: str) -> list[tuple[str, dict[str, Any]]]:
    return [(i, e) for i, e in server.messages() if e["event"] == event]


def test_subject_tokens_escape_every_name_and_come_back() -> None:
    for name in ("vm1", "web.example.com", "", "a b*>", "%41", "é", "x-y_z"):
        assert untoken(token(name)) == name
        assert all(c not in token(name) for c in ". *>\t")
    assert event_subject("qmp", "h.1", "vm*", "STOP") == "qmp.h%2E1.vm%2A.STOP"


def test_two_hosts_publish_and_a_central_rule_across_hosts_fires_once(
    tmp_path: Path, server: NatsServer, receiver: Receiver
) -> None:
    across = webhook_rule("storage-down", "BLOCK_IO_ERROR", receiver.url,
                          threshold={"count": 2, "window": "60s", "key": "$.event"})  # fmt: skip
    peers = [PeerThread(tmp_path / f"h{i}.qmp") for i in (1, 2)]
    with peers[0] as f1, peers[1] as f2:
        hosts = [host(tmp_path, f"h{i}", server.url, [str(tmp_path / f"h{i}.qmp")]) for i in (1, 2)]
        with hosts[0].start(), hosts[1].start(), central(tmp_path, server.url, across).start() as c:
            c.wait_log("central, consuming QMP")
            for h in hosts:
                h.wait_log("nats .*: connected")
            wait(lambda: f1.accepted and f2.accepted, 20, "connections")
            send(peers[0], f1, "BLOCK_IO_ERROR", io_error(1))
            receiver.wait(lambda r: len(r.attempts) == 0, 5, "quiet")  # one host is no outage
            send(peers[1], f2, "BLOCK_IO_ERROR", io_error(2))
            receiver.wait(lambda r: len(r.delivered) == 1, 30, "the firing")
            time.sleep(1.0)
            assert len(receiver.delivered) == 1
            body = json.loads(receiver.requests[-1][1])
            assert body["event"]["host"] == "h2" and body["event"]["vm"] == "vm1"
    events = published(server, "BLOCK_IO_ERROR")
    assert sorted(e["host"] for _, e in events) == ["h1", "h2"]
    ids = [i for i, _ in server.messages()]
    assert len(ids) == len(set(ids)) and all(i.startswith(("h1:", "h2:")) for i in ids)
    assert "Traceback" not in c.log_text()
