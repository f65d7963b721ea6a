"""The fleet over a real ``nats-server -js``: sidecars publish, a central runs rules, commands.

Sidecars and the central are real ``qmp-reactor run`` subprocesses; VMs are the
fake QMP peer or a real QEMU; the server is a child on a free loopback port
with a temporary store (``tests/support/natsserver.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest

from reactor.demo.machine import ThrowawayQemu
from reactor.dispatch.invocation import ActionSpecData, Invocation
from reactor.dispatch.journal import Journal
from reactor.fleet.commands import CommandService
from reactor.fleet.subjects import derived_id, event_subject, token, untoken
from reactor.model import RetryPolicy
from reactor.plugins.hookspecs import ActionOutcome
from reactor.service.config import NatsConfig
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
    """``event`` from the fake VM's latest connection, once its session is open (the
    sidecar sent a command after ``qmp_capabilities``: QEMU sends no event before that)."""
    wait(lambda: bool(fake.peers) and len(fake.peers[-1].commands) >= 2, 20, "the QMP session")
    coro = fake.peers[-1].send_event(event, data)
    asyncio.run_coroutine_threadsafe(coro, peer_thread.loop).result(10)


def io_error(n: int) -> dict[str, Any]:
    # Each its own qom-path: QEMU rate-limits BLOCK_IO_ERROR per qom-path, and so does
    # a central that has not seen the VM's REACTOR_CONNECTED (it follows the newest QEMU).
    return {"device": f"disk{n}", "node-name": "n", "qom-path": f"/machine/peripheral/disk{n}",
            "operation": "write", "action": "report",
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
            wait(lambda: len(published(server, "BLOCK_IO_ERROR")) == 1, 20, "h1's event stored")
            stored = len(server.messages())
            wait(
                lambda: c.healthz()[1]["fleet"]["nats_acked"] == stored, 20, "the central caught up"
            )
            assert not receiver.attempts  # one host is no outage
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


def test_nats_down_then_back_and_a_server_restart_publish_every_event_once(
    tmp_path: Path,
) -> None:
    nats_server = NatsServer(tmp_path)  # not started: NATS is down when the host starts
    peer = PeerThread(tmp_path / "h1.qmp")
    sent = 0

    def burst(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            sent += 1
            send(peer, fake, "BLOCK_IO_ERROR", io_error(sent))

    def outbox() -> float:
        return float(sidecar.healthz()[1]["fleet"]["nats_outbox_events"])

    with peer as fake, host(tmp_path, "h1", nats_server.url, [str(tmp_path / "h1.qmp")]) as sidecar:
        sidecar.start()
        sidecar.wait_log("nats .*: cannot connect")
        wait(lambda: fake.accepted == 1, 20, "a connection")
        burst(20)
        wait(lambda: outbox() >= 20, 20, "a backlog while NATS is down")
        assert sidecar.healthz()[1]["fleet"]["nats_connected"] == 0
        try:
            nats_server.start()
            wait(lambda: outbox() == 0, 60, "the backlog published")
            burst(20)
            nats_server.stop()  # a server restart mid-run
            burst(20)
            wait(lambda: outbox() >= 20, 20, "a backlog while the server restarts")
            nats_server.start()
            burst(20)
            wait(lambda: outbox() == 0, 60, "the backlog published again")
            events = published(nats_server, "BLOCK_IO_ERROR")
        finally:
            nats_server.stop()
    devices = Counter(e["data"]["device"] for _, e in events)
    assert devices == Counter(f"disk{n}" for n in range(1, sent + 1))
    ids = [i for i, _ in events]
    assert len(set(ids)) == len(ids) == 80
    assert "Traceback" not in sidecar.log_text()


def test_central_kill9_mid_stream_delivers_every_firing_once_by_key(
    tmp_path: Path, server: NatsServer
) -> None:
    def slow(path: str, headers: dict[str, str], body: bytes) -> None:
        time.sleep(0.02)  # the central's webhooks run one after another: it is mid-stream
        return None

    receiver = Receiver(answer=slow)
    peer = PeerThread(tmp_path / "h1.qmp")
    rule = webhook_rule("each", "BLOCK_IO_ERROR", receiver.url)
    total = 150
    try:
        with peer as fake, host(tmp_path, "h1", server.url, [str(tmp_path / "h1.qmp")]) as h1:
            h1.start().wait_log("nats .*: connected")
            wait(lambda: fake.accepted == 1, 20, "a connection")
            with central(tmp_path, server.url, rule) as c:
                c.start().wait_log("central, consuming")
                for n in range(1, total // 2 + 1):
                    send(peer, fake, "BLOCK_IO_ERROR", io_error(n))
                receiver.wait(lambda r: len(r.delivered) >= 20, 60, "deliveries")
                c.kill9()
                for n in range(total // 2 + 1, total + 1):  # published while the central is away
                    send(peer, fake, "BLOCK_IO_ERROR", io_error(n))
                c.start()
                receiver.wait(lambda r: len(r.delivered) >= total, 120, "every firing")
                assert c.stop() == 0
            # Every message again, to a new consumer on the same journal: as a redelivery
            # would, it makes the same firings with the same keys, nothing new.
            again = central(tmp_path, server.url, rule)
            again.args = [*again.args, "--durable", "replayed"]
            with again.start():
                every = total + 1  # and REACTOR_CONNECTED
                again.wait_metric(lambda s: s.value("qmp_reactor_nats_acked") == every, 60,
                                  "every message consumed again")  # fmt: skip
                time.sleep(1.0)
    finally:
        receiver.close()
    keys = receiver.keys_delivered()
    devices: dict[str, set[str]] = {}
    for headers, body in receiver.requests:
        devices.setdefault(json.loads(body)["event"]["data"]["device"], set()).add(
            headers["Idempotency-Key"]
        )
    assert len(keys) == total
    assert sorted(devices) == sorted(f"disk{n}" for n in range(1, total + 1))
    assert all(len(k) == 1 for k in devices.values()), "a firing delivered under two keys"
    assert "Traceback" not in c.log_text()


@pytest.mark.qemu
def test_a_central_restart_vm_reaches_the_right_hosts_real_qemu(
    tmp_path: Path, server: NatsServer
) -> None:
    action = {"type": "restart_vm", "with": {"method": "reset", "timeout": "30s"}}
    restart = {"name": "restart-stopped", "on": "STOP", "actions": [action]}
    peer = PeerThread(tmp_path / "h1.qmp")
    with peer as fake, ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
        h1 = host(tmp_path, "h1", server.url, [str(tmp_path / "h1.qmp")])
        h2 = host(tmp_path, "h2", server.url, [str(q.qmp_socket("vm1"))])
        with h1.start(), h2.start(), central(tmp_path, server.url, restart).start() as c:
            c.wait_log("central, consuming")
            h2.wait_log("REACTOR_CONNECTED")
            wait(lambda: fake.accepted == 1, 20, "h1's connection")
            q.qmp.execute("stop")
            q.qmp.wait_event("RESET", timeout=60)
            wait(lambda: q.qmp.execute("query-status")["status"] == "running", 60, "running")
            c.wait_log("restart_vm ok rule=restart-stopped vm=vm1", timeout=60)
            assert "system_reset" not in fake.peers[-1].commands  # h1's vm1 is another VM
            health = h2.healthz()[1]["fleet"]
            assert health["nats_commands_answered"] >= 1
    assert "Traceback" not in c.log_text() + h2.log_text()


def test_a_repeat_right_after_the_outcome_is_answered_from_it_not_from_the_journal(
    tmp_path: Path,
) -> None:
    # The outcome reaches the service a moment before the group commit marks the journal
    # row done: a repeat in between reads a running row and must not wait for an outcome
    # that was already given (it would hang until command_timeout).
    service = CommandService(NatsConfig(command_timeout=30), "h1")
    journal = Journal(tmp_path / "journal.sqlite3")
    inv_id = derived_id("command", "h1", "k1")
    spec = ActionSpecData("qmp", {"command": "cont"}, RetryPolicy(), 5.0)
    journal.add_many([Invocation(inv_id, inv_id, "nats-command:qmp", 0, spec, "parallel",
                                 "vm1", "REACTOR_COMMAND", None, {}, {}, time.time(),
                                 status="running")])  # fmt: skip
    daemon = SimpleNamespace(reactor=SimpleNamespace(journal=journal), conns={})
    service._daemon = daemon  # type: ignore[assignment]
    request = {"command": "qmp", "vm": "vm1", "with": {"command": "cont"}, "key": "k1"}

    async def repeat() -> dict[str, Any]:
        service.outcome(ActionOutcome(inv_id, "nats-command:qmp", "qmp", "vm1",
                                      "REACTOR_COMMAND", "ok", 1, None, 0.01))  # fmt: skip
        async with asyncio.timeout(10):
            return await service.answer(json.dumps(request).encode())

    try:
        assert asyncio.run(repeat()) == {"status": "ok", "error": None, "duplicate": True}
        assert journal.get(inv_id).status == "running"  # type: ignore[union-attr]
    finally:
        journal.close()


def test_commands_are_checked_allowlisted_and_answered_once_per_key(
    tmp_path: Path, server: NatsServer
) -> None:
    async def ask(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nc = await nats.connect(server.url)
        try:
            replies = []
            for req in requests:
                msg = await nc.request("qmp.h1.cmd", json.dumps(req).encode(), timeout=30)
                replies.append(json.loads(msg.data))
            return replies
        finally:
            await nc.close()

    peer = PeerThread(tmp_path / "h1.qmp")
    with peer as fake, host(tmp_path, "h1", server.url, [str(tmp_path / "h1.qmp")]) as h1:
        h1.start().wait_log("nats: answering commands on qmp.h1.cmd")
        wait(lambda: fake.accepted == 1, 20, "a connection")
        cont = {"command": "qmp", "vm": "vm1", "with": {"command": "cont"}, "key": "k1"}
        replies = asyncio.run(ask([
            {"command": "exec", "vm": "vm1", "with": {}, "key": "k0"},
            {**cont, "with": {"command": "cont", "arguments": {"x": "{{ data }}"}}, "key": "k2"},
            {**cont, "with": {"command": "quit"}, "key": "k3"},
            {**cont, "vm": "nobody", "key": "k4"},
            cont,
            cont,
        ]))  # fmt: skip
    statuses = [(r["status"], r["duplicate"]) for r in replies]
    assert statuses[:2] == [("refused", False), ("refused", False)]
    assert statuses[2][0] in ("failed", "dead") and "allowlist" in replies[2]["error"]
    assert statuses[3:] == [("refused", False), ("ok", False), ("ok", True)]
    assert fake.peers[-1].commands.count("cont") == 1  # the second request ran nothing
    assert "quit" not in fake.peers[-1].commands
