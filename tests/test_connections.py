"""The QMP connection layer against a fake QMP peer (tests/fakeqmp.py).

Real unix sockets and real QMP framing; the peer misbehaves on purpose (never
greets, sends garbage, an endless line, half an object) to show each bad
connection is dropped and retried while another VM's connection is untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from reactor.cli import main as cli_main
from reactor.cli.tail import json_line, text_line
from reactor.engine.replay import parse_event
from reactor.errors import ConfigError, PermanentActionError, TransientActionError
from reactor.model import Envelope
from reactor.sources import server as listen_mode
from reactor.sources.caused_by import Expectations
from reactor.sources.discovery import default_vm_name, is_loopback, parse_address
from reactor.sources.manager import ConnectionManager, VmConnection
from tests import fakeqmp
from tests.fakeqmp import FakeQmp, Peer

ENVELOPE_KEYS = {
    "event",
    "data",
    "timestamp",
    "vm",
    "host",
    "source",
    "seq",
    "received_at",
    "labels",
}
FAST: dict[str, Any] = {"greeting_timeout": 0.3, "backoff_max": 0.1}


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 108-byte limit of a unix socket path
    path = Path(tempfile.mkdtemp(prefix="qr-conn-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Recorder:
    """The on_envelope callback of a test: keeps every envelope, lets a test wait for one."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    def __call__(self, env: Envelope) -> None:
        self.envelopes.append(env)

    def of(self, vm: str, event: str | None = None) -> list[Envelope]:
        return [e for e in self.envelopes if e["vm"] == vm and event in (None, e["event"])]

    async def wait(self, vm: str, event: str, count: int = 1, timeout: float = 5.0) -> Envelope:
        async with asyncio.timeout(timeout):
            while len(self.of(vm, event)) < count:
                await asyncio.sleep(0.005)
        return self.of(vm, event)[count - 1]


@contextlib.asynccontextmanager
async def manager(rec: Recorder, **options: Any) -> AsyncIterator[ConnectionManager]:
    mgr = ConnectionManager(rec, **{**FAST, **options})
    try:
        yield mgr
    finally:
        await mgr.aclose()


# -- addresses -------------------------------------------------------------------------


def test_addresses_parse_into_paths_or_host_port() -> None:
    assert parse_address("/run/qemu/web-1.qmp") == "/run/qemu/web-1.qmp"
    assert parse_address("web-1.qmp") == "web-1.qmp"
    assert parse_address("localhost:4444") == ("localhost", 4444)
    assert parse_address("[::1]:4444") == ("::1", 4444)
    assert parse_address("./odd:123") == "./odd:123"
    with pytest.raises(ConfigError, match="out of range"):
        parse_address("localhost:70000")
    with pytest.raises(ConfigError):
        parse_address("")


def test_vm_names_come_from_socket_stems() -> None:
    assert default_vm_name("/run/qemu/web-1.qmp") == "web-1"
    assert default_vm_name("/var/run/qemu-server/101.reactor.qmp") == "101"
    assert default_vm_name("db.example.com.qmp") == "db.example.com"
    assert default_vm_name("127.0.0.1:4444") == "127.0.0.1:4444"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.0.0.1")


# -- envelopes -------------------------------------------------------------------------


def test_events_become_envelopes_after_a_connected_event(sockdir: Path) -> None:
    path = str(sockdir / "web-1.qmp")

    async def scenario() -> None:
        rec = Recorder()
        paused = fakeqmp.normal(status="paused")
        async with FakeQmp(path, default=paused) as fake, manager(rec) as mgr:
            vm = mgr.add(path)
            connected = await rec.wait("web-1", "REACTOR_CONNECTED")
            assert mgr.get("web-1") is vm and vm.connected
            peer = fake.peers[-1]
            before = time.time()
            await peer.send_event("STOP")
            await peer.send_event("BLOCK_JOB_READY", {"device": "d0", "len": 1})
            ready = await rec.wait("web-1", "BLOCK_JOB_READY")
            after = time.time()
        stop = rec.of("web-1", "STOP")[0]
        assert connected["data"] == {
            "version": fakeqmp.GREETING["QMP"]["version"],
            "qemu": "7.2.22",
            "status": "paused",
            "running": False,
            "address": path,
        }
        assert set(connected["timestamp"]) == {"seconds", "microseconds"}
        assert set(stop) == ENVELOPE_KEYS
        assert stop["data"] == {} and ready["data"] == {"device": "d0", "len": 1}
        assert stop["vm"] == "web-1" and stop["source"] == path
        assert stop["host"] == socket.gethostname()
        assert before <= stop["received_at"] <= after
        assert isinstance(stop["timestamp"]["seconds"], int)
        assert [e["seq"] for e in rec.envelopes] == list(range(1, len(rec.envelopes) + 1))
        assert [e["event"] for e in rec.envelopes] == [
            "REACTOR_CONNECTED",
            "STOP",
            "BLOCK_JOB_READY",
            "REACTOR_DISCONNECTED",
        ]

    run(scenario())


def test_events_sent_during_the_opening_queries_follow_the_connected_event(
    sockdir: Path,
) -> None:
    path = str(sockdir / "early.qmp")

    async def eager(peer: Peer) -> None:
        await peer.handshake()
        await peer.send_event("STOP")  # before query-version is even answered
        await peer.answer_intro()
        await peer.serve_commands()

    async def scenario() -> None:
        rec = Recorder()
        async with FakeQmp(path, eager), manager(rec) as mgr:
            mgr.add(path)
            await rec.wait("early", "STOP")
        assert [e["event"] for e in rec.envelopes[:2]] == ["REACTOR_CONNECTED", "STOP"]

    run(scenario())


def test_configured_names_win_over_socket_stems(sockdir: Path) -> None:
    path = str(sockdir / "x.qmp")

    async def scenario() -> None:
        rec = Recorder()
        async with FakeQmp(path), manager(rec, names={path: "web-1"}) as mgr:
            vm = mgr.add(path)
            await rec.wait("web-1", "REACTOR_CONNECTED")
            assert mgr.get("web-1") is vm and mgr.get("x") is None
            assert mgr.add(path) is vm
            assert mgr.connections() == [vm]

    run(scenario())


def test_a_consumer_that_raises_does_not_cost_the_connection(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(sockdir / "vm.qmp")
    seen: list[str] = []

    def picky(env: Envelope) -> None:
        seen.append(env["event"])
        if env["event"] == "STOP":
            raise RuntimeError("consumer bug")

    async def scenario() -> None:
        async with FakeQmp(path) as fake:
            mgr = ConnectionManager(picky, **FAST)
            vm = mgr.add(path)
            async with asyncio.timeout(5):
                while not vm.connected:
                    await asyncio.sleep(0.005)
                await fake.peers[-1].send_event("STOP")
                await fake.peers[-1].send_event("RESUME")
                while "RESUME" not in seen:
                    await asyncio.sleep(0.005)
            assert vm.connected and fake.accepted == 1
            await mgr.aclose()

    run(scenario())
    assert seen == ["REACTOR_CONNECTED", "STOP", "RESUME", "REACTOR_DISCONNECTED"]
    assert "consumer bug" in caplog.text


# -- commands and caused_by ------------------------------------------------------------


def test_caused_by_marks_the_event_our_command_provoked_only(sockdir: Path) -> None:
    path = str(sockdir / "vm.qmp")

    async def scenario() -> None:
        rec = Recorder()
        async with FakeQmp(path) as fake, manager(rec) as mgr:
            vm = mgr.add(path)
            await rec.wait("vm", "REACTOR_CONNECTED")
            peer = fake.peers[-1]
            await peer.send_event("RESET", {"guest": True, "reason": "guest-reset"})
            await rec.wait("vm", "RESET")
            assert await vm.execute("system_reset", cause=("panic", "restart_vm")) == {}
            await rec.wait("vm", "RESET", 2)
            await peer.send_event("RESET", {"guest": True, "reason": "guest-reset"})
            await rec.wait("vm", "RESET", 3)
            await vm.execute("stop")
            await rec.wait("vm", "STOP")
        resets = rec.of("vm", "RESET")
        assert "caused_by" not in resets[0]
        assert resets[1]["caused_by"] == {"rule": "panic", "action": "restart_vm"}
        assert "caused_by" not in resets[2]
        assert "caused_by" not in rec.of("vm", "STOP")[0]

    run(scenario())


def test_expectations_expire_and_can_be_withdrawn() -> None:
    exp = Expectations()
    assert not exp
    exp.add("system_powerdown", "r", "a", now=100.0)
    assert exp.match("POWERDOWN", now=106.0) is None  # past the few-second window
    assert exp.match("SHUTDOWN", now=120.0) == {"rule": "r", "action": "a"}  # guest took 20 s
    assert not exp
    withdrawn = exp.add("cont", "r", "a", now=0.0)
    exp.cancel(withdrawn)
    assert exp.match("RESUME", now=0.5) is None
    exp.add("stop", "r1", "a", now=0.0)
    exp.add("stop", "r2", "a", now=0.1)
    assert exp.match("STOP", now=1.0) == {"rule": "r1", "action": "a"}
    assert exp.match("STOP", now=1.0) == {"rule": "r2", "action": "a"}
    assert exp.match("STOP", now=1.0) is None
    assert exp.add("query-status", "r", "a", now=0.0) == []


def test_execute_maps_errors_to_transient_and_permanent(sockdir: Path) -> None:
    path = str(sockdir / "vm.qmp")

    async def scenario() -> None:
        rec = Recorder()
        async with FakeQmp(path), manager(rec) as mgr:
            vm = mgr.add(path)
            with pytest.raises(TransientActionError, match="not connected"):
                await vm.execute("query-status")
            await rec.wait("vm", "REACTOR_CONNECTED")
            assert (await vm.execute("query-status"))["status"] == "running"
            with pytest.raises(PermanentActionError, match="CommandNotFound"):
                await vm.execute("no-such-command", {"x": 1}, cause=("r", "a"))
            await mgr.remove(path)
            with pytest.raises(TransientActionError):
                await vm.execute("query-status")

    run(scenario())


def test_quit_ends_with_shutdown_seen_and_a_dead_peer_without(sockdir: Path) -> None:
    path = str(sockdir / "vm.qmp")

    states: list[tuple[str, bool]] = []

    async def scenario() -> None:
        rec = Recorder()

        def tell(vm: str, up: bool) -> None:
            states.append((vm, up))

        async with FakeQmp(path) as fake, manager(rec, on_state=tell) as mgr:
            vm = mgr.add(path)
            await rec.wait("vm", "REACTOR_CONNECTED")
            assert await vm.execute("quit", cause=("r", "a")) == {}
            first = await rec.wait("vm", "REACTOR_DISCONNECTED")
            await rec.wait("vm", "REACTOR_CONNECTED", 2)
            transport = fake.peers[-1].writer.transport
            assert isinstance(transport, asyncio.WriteTransport)
            transport.abort()  # QEMU killed: the socket closes with no SHUTDOWN
            second = await rec.wait("vm", "REACTOR_DISCONNECTED", 2)
        shutdown = rec.of("vm", "SHUTDOWN")[0]
        assert shutdown["caused_by"] == {"rule": "r", "action": "a"}
        assert first["data"]["shutdown_seen"] is True
        assert "end of file" in first["data"]["reason"]
        assert second["data"]["shutdown_seen"] is False
        assert first["data"]["address"] == path
        seqs = [e["seq"] for e in rec.envelopes]
        assert seqs == list(range(1, len(seqs) + 1))  # one counter across reconnects

    run(scenario())
    assert states[:4] == [("vm", True), ("vm", False), ("vm", True), ("vm", False)]


# -- misbehaving peers -----------------------------------------------------------------


async def _bystander(rec: Recorder, mgr: ConnectionManager, path: str) -> VmConnection:
    vm = mgr.add(path)
    await rec.wait("bystander", "REACTOR_CONNECTED")
    return vm


async def _still_untouched(rec: Recorder, vm: VmConnection, fake: FakeQmp, link: object) -> None:
    await fake.peers[-1].send_event("RESUME")
    await rec.wait("bystander", "RESUME")
    assert vm.connected and vm._link is link and fake.accepted == 1
    assert len(rec.of("bystander", "REACTOR_CONNECTED")) == 1
    assert rec.of("bystander", "REACTOR_DISCONNECTED") == []


def test_a_peer_that_never_greets_times_out_and_is_retried(sockdir: Path) -> None:
    bad, good = str(sockdir / "mute.qmp"), str(sockdir / "bystander.qmp")

    async def scenario() -> None:
        rec = Recorder()
        async with (
            FakeQmp(bad, fakeqmp.silent, fakeqmp.silent) as mute,
            FakeQmp(good) as other,
            manager(rec) as mgr,
        ):
            bystander = await _bystander(rec, mgr, good)
            link = bystander._link
            mgr.add(bad)
            await rec.wait("mute", "REACTOR_CONNECTED")  # on the third try
            assert mute.accepted == 3
            assert rec.of("mute", "REACTOR_DISCONNECTED") == []  # attempts are not sessions
            await _still_untouched(rec, bystander, other, link)

    run(scenario())


MALFORMED = {
    "garbage": (fakeqmp.garbage, "not JSON"),
    "oversized": (fakeqmp.huge_line(), "longer than 1048576 bytes"),
    "half-object": (fakeqmp.half_object, "not JSON"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_input_is_disconnected_and_retried(sockdir: Path, kind: str) -> None:
    behaviour, reason = MALFORMED[kind]
    bad, good = str(sockdir / "bad.qmp"), str(sockdir / "bystander.qmp")

    async def scenario() -> int:
        rec = Recorder()
        async with (
            FakeQmp(bad, behaviour) as peer,
            FakeQmp(good) as other,
            manager(rec) as mgr,
        ):
            bystander = await _bystander(rec, mgr, good)
            link = bystander._link
            mgr.add(bad)
            dropped = await rec.wait("bad", "REACTOR_DISCONNECTED")
            await rec.wait("bad", "REACTOR_CONNECTED", 2)
            assert reason in dropped["data"]["reason"]
            assert dropped["data"]["shutdown_seen"] is False
            await _still_untouched(rec, bystander, other, link)
            return peer.peers[0].sent

    tracemalloc.start()
    try:
        sent = asyncio.run(scenario())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the 100 MB line: hung up on after a few MB, never buffered whole
    assert sent < 16 * 1024 * 1024
    assert peak < 24 * 1024 * 1024


# -- reconnecting ----------------------------------------------------------------------


def test_reconnects_as_soon_as_the_socket_is_recreated(sockdir: Path) -> None:
    path = str(sockdir / "vm.qmp")

    async def scenario() -> None:
        rec = Recorder()
        # a long backoff cap: only noticing the new socket file can reconnect in time
        async with manager(rec, backoff_max=30.0) as mgr:
            async with FakeQmp(path):
                mgr.add(path)
                await rec.wait("vm", "REACTOR_CONNECTED")
            await rec.wait("vm", "REACTOR_DISCONNECTED")
            await asyncio.sleep(1.5)  # several failed attempts: the backoff has grown
            async with FakeQmp(path):
                reappeared = time.monotonic()
                await rec.wait("vm", "REACTOR_CONNECTED", 2, timeout=10)
                assert time.monotonic() - reappeared < 2.0

    run(scenario())


def test_glob_watcher_follows_sockets_that_come_and_go(sockdir: Path) -> None:
    path = str(sockdir / "late.qmp")
    (sockdir / "plain-file.qmp").write_text("not a socket")

    async def scenario() -> None:
        rec = Recorder()
        async with manager(rec) as mgr:
            watcher = asyncio.create_task(mgr.watch_globs([str(sockdir / "*.qmp")], 0.05))
            await asyncio.sleep(0.2)
            assert mgr.connections() == []  # the regular file is not dialed
            async with FakeQmp(path):
                await rec.wait("late", "REACTOR_CONNECTED")
            async with asyncio.timeout(5):
                while mgr.connections():
                    await asyncio.sleep(0.01)
            assert mgr.get("late") is None
            count = len(rec.envelopes)
            await asyncio.sleep(0.3)
            assert len(rec.envelopes) == count  # nothing more for a dropped socket
            async with FakeQmp(path):
                again = await rec.wait("late", "REACTOR_CONNECTED", 2)
            watcher.cancel()
            await asyncio.wait([watcher])
        assert again["seq"] > rec.of("late", "REACTOR_DISCONNECTED")[0]["seq"]

    run(scenario())


def test_remove_ends_the_session_with_a_disconnected_event(sockdir: Path) -> None:
    path = str(sockdir / "vm.qmp")

    async def scenario() -> None:
        rec = Recorder()
        async with FakeQmp(path) as fake, manager(rec) as mgr:
            mgr.add(path)
            await rec.wait("vm", "REACTOR_CONNECTED")
            await mgr.remove(path)
            assert mgr.connections() == [] and mgr.get("vm") is None
            with contextlib.suppress(ConnectionError):
                await fake.peers[-1].send_event("STOP")
            await asyncio.sleep(0.1)
            await mgr.remove(path)  # a second remove is a no-op
        assert [e["event"] for e in rec.envelopes] == ["REACTOR_CONNECTED", "REACTOR_DISCONNECTED"]
        assert rec.envelopes[-1]["data"]["reason"] == "removed"

    run(scenario())


# -- server mode -----------------------------------------------------------------------


async def _fake_qemu_client(listen: str, name: str | None) -> tuple[asyncio.Task[None], Peer]:
    """A fake QEMU that connects to us, as ``-chardev socket,...`` without server=on does."""
    reader, writer = await asyncio.open_unix_connection(listen)
    peer = Peer(reader, writer)

    async def behave() -> None:
        try:
            await fakeqmp.normal(name=name)(peer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return asyncio.create_task(behave()), peer


def test_listen_mode_names_vms_by_query_name_or_peer(sockdir: Path) -> None:
    listen = str(sockdir / "reactor.sock")

    async def scenario() -> None:
        rec = Recorder()
        async with manager(rec) as mgr:
            server = asyncio.create_task(mgr.listen(listen))
            async with asyncio.timeout(5):
                while not os.path.exists(listen):
                    await asyncio.sleep(0.01)
            mute_reader, mute = await asyncio.open_unix_connection(listen)  # never greets
            alpha_task, alpha = await _fake_qemu_client(listen, "alpha")
            anon_task, _ = await _fake_qemu_client(listen, None)
            anon_name = f"pid-{os.getpid()}"
            await rec.wait("alpha", "REACTOR_CONNECTED")
            await rec.wait(anon_name, "REACTOR_CONNECTED")
            await alpha.send_event("STOP")
            stop = await rec.wait("alpha", "STOP")
            start = listen_mode.process_start(os.getpid())
            assert stop["source"] == f"{listen}#alpha@pid-{os.getpid()}.{start}"
            vm = mgr.get("alpha")
            assert vm is not None and await vm.execute("query-name") == {"name": "alpha"}
            alpha_task.cancel()
            await asyncio.wait([alpha_task])
            await rec.wait("alpha", "REACTOR_DISCONNECTED")
            async with asyncio.timeout(5):
                while mgr.get("alpha") is not None:
                    await asyncio.sleep(0.01)
            again_task, _ = await _fake_qemu_client(listen, "alpha")
            again = await rec.wait("alpha", "REACTOR_CONNECTED", 2)
            assert again["seq"] > stop["seq"]  # seq continues for the same VM
            assert rec.of(anon_name, "REACTOR_DISCONNECTED") == []
            assert await mute_reader.read() == b""  # given up on after the greeting timeout
            mute.close()
            await mute.wait_closed()
            server.cancel()
            await asyncio.wait([server, anon_task, again_task])
            assert not os.path.exists(listen)
        assert rec.of(anon_name, "REACTOR_DISCONNECTED")  # closing the server ends sessions

    run(scenario())


def test_listen_refuses_taken_addresses_and_warns_off_loopback(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    taken = str(sockdir / "taken.sock")
    with listen_mode.bind(taken), pytest.raises(ConfigError, match="another process"):
        listen_mode.bind(taken)
    stale = listen_mode.bind(taken)  # the old one left its file behind: replaced
    stale.close()
    (sockdir / "file").write_text("")
    with pytest.raises(ConfigError, match="not a socket"):
        listen_mode.bind(str(sockdir / "file"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with caplog.at_level(logging.WARNING), listen_mode.bind(f"127.0.0.1:{port}"):
        assert "not loopback" not in caplog.text
    with caplog.at_level(logging.WARNING), listen_mode.bind(f"0.0.0.0:{port}"):
        assert "not loopback" in caplog.text


# -- qmp-reactor tail ------------------------------------------------------------------


def _envelope(event: str, data: dict[str, Any]) -> Envelope:
    ts = {"seconds": 1_700_000_000, "microseconds": 5}
    return {"event": event, "data": data, "timestamp": ts, "vm": "web-1", "seq": 1}


def test_tail_lines_are_readable_and_json_lines_replay_back() -> None:
    env = _envelope("BLOCK_IO_ERROR", {"device": "d0", "nospace": True})
    text = text_line(env)
    assert text.endswith('.000005 web-1 BLOCK_IO_ERROR {"device":"d0","nospace":true}')
    assert text_line(_envelope("STOP", {})).endswith(" web-1 STOP")
    parsed = parse_event(json_line(env), default_vm="other")
    assert parsed["event"] == "BLOCK_IO_ERROR" and parsed["vm"] == "web-1"
    assert parsed["data"] == env["data"] and parsed["timestamp"] == env["timestamp"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tail", "/nonexistent/web-1.qmp"], "no such socket"),
        (["tail", "localhost:99999"], "out of range"),
        (["tail"], "at least one ADDR"),
    ],
)
def test_tail_rejects_bad_addresses_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_tail_prints_live_events_until_sigterm(sockdir: Path) -> None:
    path = str(sockdir / "web-1.qmp")

    async def read_json(stream: asyncio.StreamReader) -> dict[str, Any]:
        async with asyncio.timeout(10):
            line = await stream.readline()
        record: dict[str, Any] = json.loads(line)
        return record

    async def scenario() -> tuple[int, list[dict[str, Any]]]:
        async with FakeQmp(path) as fake:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "reactor",
                "tail",
                "--json",
                path,
                stdout=asyncio.subprocess.PIPE,
                cwd=Path(__file__).resolve().parent.parent,
            )
            assert proc.stdout is not None
            first = await read_json(proc.stdout)
            await fake.peers[-1].send_event("STOP")
            second = await read_json(proc.stdout)
            proc.send_signal(signal.SIGTERM)
            rest = await proc.stdout.read()
            code = await proc.wait()
        lines = [first, second] + [json.loads(x) for x in rest.splitlines()]
        return code, lines

    code, lines = asyncio.run(scenario())
    assert code == 0
    assert [x["event"] for x in lines] == [
        "REACTOR_CONNECTED",
        "STOP",
        "REACTOR_DISCONNECTED",
    ]
    assert lines[1] == {
        "timestamp": lines[1]["timestamp"],
        "event": "STOP",
        "data": {},
        "vm": "web-1",
    }
