"""Metrics and /healthz: what is counted, what is read at scrape time, the HTTP listener.

The figures are checked through the exposition text (parsed back with
prometheus_client's parser) and over real HTTP: in-process against
``MetricsServer`` on a loopback port, and from a running ``qmp-reactor run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from reactor.demo.machine import ThrowawayQemu
from reactor.errors import ConfigError
from reactor.plugins.hookspecs import ActionOutcome
from reactor.service import metrics as metrics_mod
from reactor.service.config import MetricsConfig
from reactor.service.metrics import (
    MAX_EVENTS_PER_VM,
    Metrics,
    MetricsServer,
    Snapshot,
    parse_listen,
    start_metrics_server,
)
from tests.support.ops import Receiver, Sidecar, parse_metrics, webhook_rule, write_rules


def outcome(status: str, action: str = "webhook", duration: float = 0.2) -> ActionOutcome:
    return ActionOutcome("id", "rule", action, "vm1", "STOP", status, 1, None, duration)  # type: ignore[arg-type]


# -- counting ---------------------------------------------------------------------------


def test_events_are_counted_by_vm_and_type() -> None:
    m = Metrics()
    for _ in range(3):
        m.event("vm1", "STOP")
    m.event("vm1", "RESUME")
    m.event("vm2", "STOP")
    s = parse_metrics(m.exposition().decode())
    assert s.series("qmp_reactor_events_total") == {
        frozenset({("vm", "vm1"), ("event", "STOP")}): 3,
        frozenset({("vm", "vm1"), ("event", "RESUME")}): 1,
        frozenset({("vm", "vm2"), ("event", "STOP")}): 1,
    }


def test_a_peer_inventing_event_names_cannot_grow_the_series_without_bound() -> None:
    m = Metrics()
    for n in range(MAX_EVENTS_PER_VM + 100):
        m.event("vm1", f"MADE_UP_{n}")
        m.event("vm1", f"MADE_UP_{n}")
    counts = m.event_counts()
    assert len(counts) == MAX_EVENTS_PER_VM + 1
    assert counts[("vm1", "_other")] == 200  # nothing is lost, only lumped
    assert sum(counts.values()) == 2 * (MAX_EVENTS_PER_VM + 100)


def test_vms_gone_are_forgotten_only_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_mod, "MAX_VMS", 3)
    present = {"vm0": True}
    m = Metrics(lambda: Snapshot(rules=1, vms=present))
    for n in range(3):
        m.event(f"vm{n}", "STOP")
    m.exposition()
    assert len(m.event_counts()) == 3  # at the cap: kept
    m.event("vm3", "STOP")
    m.exposition()
    assert set(m.event_counts()) == {("vm0", "STOP")}


def test_outcomes_retries_dead_letters_and_latency() -> None:
    m = Metrics()
    for status in ("retry", "retry", "ok", "failed", "dead", "suppressed", "cancelled"):
        m.outcome(outcome(status, duration=0.3))
    m.outcome(outcome("ok", action="log", duration=0.002))
    s = parse_metrics(m.exposition().decode())
    for status in ("ok", "failed", "suppressed", "cancelled"):
        assert s.value("qmp_reactor_actions_total", action="webhook", outcome=status) == 1
    assert s.value("qmp_reactor_actions_total", action="webhook", outcome="retry") is None
    assert s.value("qmp_reactor_action_retries_total", action="webhook") == 2
    assert s.value("qmp_reactor_dead_lettered_total", action="webhook") == 1
    assert s.value("qmp_reactor_action_latency_seconds_count", action="webhook") == 2  # ok+failed
    assert s.value("qmp_reactor_action_latency_seconds_sum", action="webhook") == pytest.approx(0.6)
    assert s.value("qmp_reactor_action_latency_seconds_bucket", action="log", le="0.01") == 1
    assert s.value("qmp_reactor_action_latency_seconds_bucket", action="webhook", le="0.25") == 0


def test_state_is_read_from_the_snapshot_at_each_scrape() -> None:
    state = {"snap": Snapshot(rules=2, vms={"a": True, "b": False}, backlog=7, dead_letters=1)}
    m = Metrics(lambda: state["snap"])
    first = parse_metrics(m.exposition().decode())
    state["snap"] = Snapshot(
        rules=2, vms={"a": True}, journal_healthy=False, stage_holds=9, stage_replaced=4
    )
    second = parse_metrics(m.exposition().decode())
    assert first.value("qmp_reactor_vm_connected", vm="b") == 0
    assert first.value("qmp_reactor_journal_backlog") == 7
    assert first.value("qmp_reactor_dead_letters") == 1
    assert first.value("qmp_reactor_journal_healthy") == 1
    assert second.value("qmp_reactor_vm_connected", vm="b") is None  # the series is gone
    assert second.value("qmp_reactor_journal_healthy") == 0
    assert second.value("qmp_reactor_qemu_stage_holds_total") == 9
    assert second.value("qmp_reactor_qemu_stage_replaced_total") == 4
    assert second.value("qmp_reactor_rules") == 2


def test_each_instance_has_its_own_registry_and_not_the_global_one() -> None:
    a, b = Metrics(), Metrics()
    a.event("vm1", "STOP")
    assert parse_metrics(b.exposition().decode()).series("qmp_reactor_events_total") == {}
    assert REGISTRY.get_sample_value("qmp_reactor_events_total", {"vm": "vm1"}) is None


def test_health_is_503_when_the_journal_fails_or_no_rules_are_loaded() -> None:
    ok = Snapshot(rules=3, vms={"a": True, "b": False}, backlog=2, dead_letters=1)
    assert Metrics(lambda: ok).health() == (
        200,
        {"status": "ok", "rules_loaded": True, "rules": 3, "vms": 2, "vms_connected": 1,
         "journal_healthy": True, "backlog": 2, "in_flight": 0, "dead_letters": 1,
         "problems": []},
    )  # fmt: skip
    status, doc = Metrics(lambda: Snapshot(rules=0, journal_healthy=False)).health()
    assert (status, doc["status"], doc["rules_loaded"]) == (503, "unhealthy", False)
    assert doc["problems"] == [
        "the journal cannot be written; new work waits in memory",
        "no rules are loaded",
    ]


# -- the HTTP listener ------------------------------------------------------------------


async def request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


def serve(snapshot: Snapshot, scenario: object) -> object:
    async def main() -> object:
        server = MetricsServer(Metrics(lambda: snapshot))
        await server.start("127.0.0.1:0")
        assert server.address is not None
        try:
            return await scenario(server.address[1])  # type: ignore[operator]
        finally:
            await server.close()

    return asyncio.run(main())


def test_metrics_and_healthz_over_http() -> None:
    async def scenario(port: int) -> list[bytes]:
        return [
            await request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            await request(port, b"GET /healthz?verbose=1 HTTP/1.1\r\n\r\n"),
            await request(port, b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            await request(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            await request(port, b"GET /secret HTTP/1.1\r\n\r\n"),
        ]

    got = serve(Snapshot(rules=1, vms={"vm1": True}), scenario)
    metrics, health, head, post, missing = got  # type: ignore[misc]
    header, body = metrics.split(b"\r\n\r\n", 1)
    assert header.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: text/plain; version=" in header
    assert parse_metrics(body.decode()).value("qmp_reactor_vm_connected", vm="vm1") == 1
    assert health.startswith(b"HTTP/1.1 200 ")
    assert json.loads(health.split(b"\r\n\r\n", 1)[1])["vms_connected"] == 1
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ")
    assert missing.startswith(b"HTTP/1.1 404 ")


def test_healthz_answers_503_when_unhealthy() -> None:
    async def scenario(port: int) -> bytes:
        return await request(port, b"GET /healthz HTTP/1.0\r\n\r\n")

    got = serve(Snapshot(rules=1, journal_healthy=False), scenario)
    assert got.startswith(b"HTTP/1.1 503 ")  # type: ignore[union-attr]


def test_rude_clients_get_nothing_and_do_not_hurt(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(metrics_mod, "REQUEST_TIMEOUT", 0.2)
    caplog.set_level(logging.DEBUG)

    async def scenario(port: int) -> list[bytes]:
        silent = await asyncio.open_connection("127.0.0.1", port)  # says nothing at all
        answers = [
            await request(port, b"\x00\xff garbage\r\n\r\n"),
            await request(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"),
            await request(port, b"GET /metrics HTTP/1.1\r\n"),  # never ends its head
        ]
        answers.append(await silent[0].read())
        silent[1].close()
        await silent[1].wait_closed()
        answers.append(await request(port, b"GET /healthz HTTP/1.1\r\n\r\n"))
        return answers

    *rude, fine = serve(Snapshot(rules=1), scenario)  # type: ignore[misc]
    assert rude == [b"", b"", b"", b""]
    assert fine.startswith(b"HTTP/1.1 200 ")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9105") == ("127.0.0.1", 9105)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9105") == ("", 9105)
    for bad in ("9105", "/run/metrics.sock", "host:99999", "host:http"):
        with pytest.raises(ConfigError, match="is not host:port"):
            parse_listen(bad)
    assert MetricsConfig().listen == "127.0.0.1:9105"  # loopback by default


def test_a_chosen_address_must_work_the_default_may_be_taken(
    caplog: pytest.LogCaptureFixture,
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = f"127.0.0.1:{taken.getsockname()[1]}"

    async def main() -> object:
        with pytest.raises(ConfigError, match=f"metrics.listen {address}: cannot listen: "):
            await start_metrics_server(Metrics(), MetricsConfig(listen=address))
        default = MetricsConfig.model_construct(_fields_set=set(), listen=address)
        assert await start_metrics_server(Metrics(), default) is None
        assert await start_metrics_server(Metrics(), MetricsConfig(listen=None)) is None
        everywhere = await start_metrics_server(Metrics(), MetricsConfig(listen="0.0.0.0:0"))
        assert everywhere is not None
        await everywhere.close()
        return None

    with caplog.at_level(logging.WARNING, "reactor.service.metrics"), taken:
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert any("running without metrics" in m for m in messages)
    assert any("0.0.0.0:0: not loopback" in m for m in messages)


# -- from the running sidecar -----------------------------------------------------------


@contextlib.contextmanager
def _stopped_vm(tmp_path: Path, rules: Path) -> Iterator[Sidecar]:
    """A sidecar with ``rules`` on a real QEMU VM ``vm1`` that was just stopped."""
    with ThrowawayQemu(name="vm1", extra_qmp=["vm1"]) as q:
        cfg = {"rules": [str(rules)], "qmp": [str(q.qmp_socket("vm1"))]}
        with Sidecar(tmp_path, cfg) as sidecar:
            sidecar.start().wait_log("vm1: connected")
            q.qmp.execute("stop")
            yield sidecar


@pytest.mark.qemu
def test_sidecar_counts_a_dead_letter_and_a_success(tmp_path: Path) -> None:
    receiver = Receiver()
    rules = write_rules(
        tmp_path / "rules.yaml",
        webhook_rule("ok", "STOP", receiver.url),
        webhook_rule("dead", "STOP", "http://127.0.0.1:9/", action={"retry": {
            "attempts": 2, "initial": 0.01}}),
    )  # fmt: skip
    try:
        with _stopped_vm(tmp_path, rules) as sidecar:
            s = sidecar.wait_metric(lambda s: s.value("qmp_reactor_dead_letters") == 1)
            status, health = sidecar.healthz()
            assert sidecar.stop() == 0
    finally:
        receiver.close()
    assert s.value("qmp_reactor_actions_total", action="webhook", outcome="ok") == 1
    assert s.value("qmp_reactor_actions_total", action="webhook", outcome="failed") == 1
    assert s.value("qmp_reactor_dead_lettered_total", action="webhook") == 1
    assert s.value("qmp_reactor_action_retries_total", action="webhook") == 1
    assert s.value("qmp_reactor_action_latency_seconds_count", action="webhook") == 2
    assert s.value("qmp_reactor_events_total", vm="vm1", event="STOP") == 1
    assert s.value("qmp_reactor_events_total", vm="vm1", event="REACTOR_ACTION_FAILED") == 1
    assert s.value("qmp_reactor_rules") == 2
    assert s.value("qmp_reactor_info", version="0.1.0") == 1
    assert (status, health["dead_letters"], health["rules"]) == (200, 1, 2)


@pytest.mark.qemu
def test_a_silenced_firing_is_counted_as_suppressed_by_a_silence(tmp_path: Path) -> None:
    receiver = Receiver()
    rules = write_rules(
        tmp_path / "rules.yaml",
        webhook_rule("heard", "STOP", receiver.url),
        webhook_rule("quiet", "STOP", receiver.url),
    )
    add = [sys.executable, "-m", "reactor", "silence", "add", "--state-dir", tmp_path / "state"]
    add += ["--vm", "vm1", "--rule", "quiet", "--for", "1h", "--comment", "maintenance"]
    added = subprocess.run(add, capture_output=True, timeout=60)
    assert added.returncode == 0, added.stderr
    suppressed = "qmp_reactor_firings_suppressed_total"
    try:
        with _stopped_vm(tmp_path, rules) as sidecar:
            s = sidecar.wait_metric(lambda s: s.value(suppressed, reason="silence") == 1)
            receiver.wait(lambda r: len(r.delivered) == 1, 30, "the unsilenced webhook")
            assert sidecar.stop() == 0
    finally:
        receiver.close()
    assert s.value("qmp_reactor_firings_silenced_total") == 1  # as before, beside it
    assert s.value(suppressed, reason="guard") == 0
    assert len(receiver.requests) == 1


def test_sidecar_without_rules_is_unhealthy_and_metrics_can_be_off(tmp_path: Path) -> None:
    rules = tmp_path / "empty.yaml"
    rules.write_text("rules: []\n")
    (tmp_path / "a").mkdir()
    with Sidecar(tmp_path / "a", {"rules": [str(rules)]}) as sidecar:
        sidecar.start()
        status, health = sidecar.healthz()
        assert sidecar.stop() == 0
    assert (status, health["rules_loaded"], health["problems"]) == (
        503, False, ["no rules are loaded"]
    )  # fmt: skip
    (tmp_path / "b").mkdir()
    with Sidecar(tmp_path / "b", {"rules": [str(rules)], "metrics": {"listen": None}}) as off:
        off.start().wait_log("ready: 0 rules")
        assert off.stop() == 0
    assert "metrics on" not in off.log_text()


def test_listeners_that_cannot_bind_stop_the_sidecar_before_it_is_ready(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules.yaml", webhook_rule("s", "STOP", "http://127.0.0.1:9/"))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    results = []
    with taken:
        for name, settings in (
            ("qmp-listen", {"listen": address, "metrics": {"listen": "127.0.0.1:0"}}),
            ("metrics", {"metrics": {"listen": address}}),
        ):
            (tmp_path / name).mkdir()
            config = tmp_path / name / "c.yaml"
            config.write_text(json.dumps({"rules": [str(rules)], "state_dir": str(tmp_path / name),
                                          "plugin_dirs": [], **settings}))  # fmt: skip
            argv = [sys.executable, "-m", "reactor", "run", "--config", str(config)]
            results.append(subprocess.run(argv, capture_output=True, text=True, timeout=30))
    for result in results:
        assert result.returncode == 1
        assert "ready:" not in result.stderr and "Traceback" not in result.stderr
    assert (
        results[0]
        .stderr.splitlines()[-1]
        .startswith(f"qmp-reactor: error: {address}: cannot listen: ")
    )
    assert results[1].stderr.splitlines()[-1] == (
        f"qmp-reactor: error: metrics.listen {address}: cannot listen: Address already in use"
    )
