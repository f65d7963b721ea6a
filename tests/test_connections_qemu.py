"""The QMP connection layer against real QEMU 7.2 (reactor.demo.machine.ThrowawayQemu).

Each QEMU gets an extra QMP socket for the connection under test while the
sandbox's driver socket provokes events (QEMU sends every event to every
monitor). QEMUs run ``-machine none``: no guest is needed for run-state events.
Blocking sandbox calls run in a worker thread so the event loop keeps reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reactor.demo.machine import ThrowawayQemu
from reactor.sources import server as listen_mode
from reactor.sources.manager import ConnectionManager, VmConnection
from tests.test_connections import ENVELOPE_KEYS, Recorder

pytestmark = pytest.mark.qemu

LIGHT = ["-machine", "none"]
T = TypeVar("T")


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


@contextlib.asynccontextmanager
async def qemu(*extra: str, **options: Any) -> AsyncIterator[ThrowawayQemu]:
    options.setdefault("extra_qmp", ["reactor"])
    vm = await blocking(ThrowawayQemu, extra_args=[*LIGHT, *extra], memory_mb=16, **options)
    try:
        yield vm
    finally:
        await blocking(vm.close)


@contextlib.asynccontextmanager
async def watching(rec: Recorder, **options: Any) -> AsyncIterator[ConnectionManager]:
    mgr = ConnectionManager(rec, **options)
    try:
        yield mgr
    finally:
        await mgr.aclose()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qr-qemu-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def connected(rec: Recorder, mgr: ConnectionManager, q: ThrowawayQemu, name: str) -> Any:
    vm = mgr.add(str(q.qmp_socket("reactor")), name=name)
    return vm, await rec.wait(name, "REACTOR_CONNECTED", timeout=10)


def test_stop_cont_reset_arrive_as_envelopes() -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with qemu() as q, watching(rec) as mgr:
            _, hello = await connected(rec, mgr, q, "vm1")
            for command in ("stop", "cont", "system_reset"):
                await blocking(q.qmp.execute, command)
            reset = await rec.wait("vm1", "RESET", timeout=10)
            driver_reset = await blocking(q.qmp.wait_event, "RESET")
        assert hello["data"]["status"] == "running" and hello["data"]["running"] is True
        assert hello["data"]["qemu"].startswith("7.2.")
        assert hello["data"]["version"]["qemu"]["major"] == 7
        events = [e["event"] for e in rec.of("vm1")]
        assert events[:4] == ["REACTOR_CONNECTED", "STOP", "RESUME", "RESET"]
        assert set(reset) == ENVELOPE_KEYS
        assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        assert reset["timestamp"] == driver_reset["timestamp"]  # as QEMU sent it
        assert reset["source"] == str(q.qmp_socket("reactor")) and reset["vm"] == "vm1"
        assert rec.of("vm1", "STOP")[0]["data"] == {}

    asyncio.run(scenario())


def test_connected_reports_a_vm_that_was_not_running_before_we_came() -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with qemu("-S") as frozen, qemu() as stopped, watching(rec) as mgr:
            await blocking(stopped.qmp.execute, "stop")
            _, prelaunch = await connected(rec, mgr, frozen, "frozen")
            _, paused = await connected(rec, mgr, stopped, "stopped")
        # -S is QEMU's "prelaunch" state; a stopped VM is "paused"; neither is running
        assert prelaunch["data"]["status"] == "prelaunch"
        assert prelaunch["data"]["running"] is False
        assert paused["data"]["status"] == "paused" and paused["data"]["running"] is False

    asyncio.run(scenario())


def test_sigkill_ends_without_shutdown_and_quit_with_it() -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with qemu() as killed, qemu() as quitted, watching(rec) as mgr:
            await connected(rec, mgr, killed, "killed")
            await connected(rec, mgr, quitted, "quitted")
            killed.kill()
            crash = await rec.wait("killed", "REACTOR_DISCONNECTED", timeout=10)
            with contextlib.suppress(Exception):  # QEMU may hang up before the reply
                await blocking(quitted.qmp.execute, "quit")
            clean = await rec.wait("quitted", "REACTOR_DISCONNECTED", timeout=10)
        assert crash["data"]["shutdown_seen"] is False
        assert rec.of("killed", "SHUTDOWN") == []
        assert clean["data"]["shutdown_seen"] is True
        shutdown = rec.of("quitted", "SHUTDOWN")[0]
        assert shutdown["data"]["reason"] == "host-qmp-quit"
        assert shutdown["seq"] < clean["seq"]

    asyncio.run(scenario())


def test_reconnects_within_two_seconds_of_a_restart_after_kill() -> None:
    async def scenario() -> float:
        rec = Recorder()
        async with qemu() as q, watching(rec) as mgr:
            vm, _ = await connected(rec, mgr, q, "vm")
            q.kill()
            await blocking(q.wait)
            await rec.wait("vm", "REACTOR_DISCONNECTED", timeout=10)
            await asyncio.sleep(2.5)  # let failed attempts push the backoff to its cap
            before = time.monotonic()  # the socket reappears after this moment
            await blocking(q.start)
            await rec.wait("vm", "REACTOR_CONNECTED", 2, timeout=10)
            took = time.monotonic() - before
            await blocking(q.qmp.execute, "stop")
            stop = await rec.wait("vm", "STOP", timeout=10)
            assert vm.connected and stop["seq"] > rec.of("vm", "REACTOR_DISCONNECTED")[0]["seq"]
            return took

    assert asyncio.run(scenario()) < 2.0


def test_caused_by_marks_our_reset_and_not_the_drivers() -> None:
    async def scenario() -> None:
        rec = Recorder()
        async with qemu() as q, watching(rec) as mgr:
            vm, _ = await connected(rec, mgr, q, "vm")
            await blocking(q.qmp.execute, "system_reset")
            await rec.wait("vm", "RESET", timeout=10)
            assert isinstance(vm, VmConnection)
            await vm.execute("system_reset", cause=("guest-hung", "restart_vm"))
            await rec.wait("vm", "RESET", 2, timeout=10)
            await blocking(q.qmp.execute, "system_reset")
            await rec.wait("vm", "RESET", 3, timeout=10)
        first, ours, third = rec.of("vm", "RESET")
        assert "caused_by" not in first and "caused_by" not in third
        assert ours["caused_by"] == {"rule": "guest-hung", "action": "restart_vm"}

    asyncio.run(scenario())


def test_glob_watcher_picks_up_new_qemus_and_drops_vanished_ones() -> None:
    token = uuid.uuid4().hex[:8]
    pattern = f"{tempfile.gettempdir()}/qmp-reactor-qemu-*/g{token}-*.qmp"

    async def scenario() -> None:
        rec = Recorder()
        async with watching(rec) as mgr:
            watcher = asyncio.create_task(mgr.watch_globs([pattern], interval=0.2))
            async with qemu(extra_qmp=[f"g{token}-a"]) as a:
                await rec.wait(f"g{token}-a", "REACTOR_CONNECTED", timeout=10)
                async with qemu(extra_qmp=[f"g{token}-b"]) as b:
                    await rec.wait(f"g{token}-b", "REACTOR_CONNECTED", timeout=10)
                    await blocking(b.close)  # QEMU exits and its socket goes with it
                    await rec.wait(f"g{token}-b", "REACTOR_DISCONNECTED", timeout=10)
                async with asyncio.timeout(10):
                    while mgr.get(f"g{token}-b") is not None:
                        await asyncio.sleep(0.05)
                await blocking(a.qmp.execute, "stop")
                await rec.wait(f"g{token}-a", "STOP", timeout=10)
                assert [vm.name for vm in mgr.connections()] == [f"g{token}-a"]
            watcher.cancel()
            await asyncio.wait([watcher])
        assert rec.of(f"g{token}-a", "REACTOR_DISCONNECTED")[0]["seq"] > 0

    asyncio.run(scenario())


def test_listen_mode_with_qemu_connecting_to_us(sockdir: Path) -> None:
    listen = str(sockdir / "reactor.sock")
    chardev = [
        "-chardev",
        f"socket,id=r,path={listen},reconnect=1",
        "-mon",
        "chardev=r,mode=control",
    ]

    async def scenario() -> None:
        rec = Recorder()
        async with watching(rec) as mgr:
            server = asyncio.create_task(mgr.listen(listen))
            async with qemu(*chardev, name="lsn-vm", extra_qmp=[]) as q:
                hello = await rec.wait("lsn-vm", "REACTOR_CONNECTED", timeout=10)
                first = f"{listen}#lsn-vm@pid-{q.pid}.{listen_mode.process_start(q.pid or 0)}"
                await blocking(q.qmp.execute, "stop")
                stop = await rec.wait("lsn-vm", "STOP", timeout=10)
                vm = mgr.get("lsn-vm")
                assert vm is not None and await vm.execute("query-name") == {"name": "lsn-vm"}
                q.kill()
                gone = await rec.wait("lsn-vm", "REACTOR_DISCONNECTED", timeout=10)
                await blocking(q.wait)
                await blocking(q.start)
                again = await rec.wait("lsn-vm", "REACTOR_CONNECTED", 2, timeout=10)
                assert mgr.lookup("lsn-vm", first) is None  # another QEMU process: another source
                assert mgr.lookup("lsn-vm", again["source"]) is mgr.get("lsn-vm")
            server.cancel()
            await asyncio.wait([server])
        assert hello["data"]["status"] == "running"
        assert stop["source"] == first and again["source"] != first
        assert gone["data"]["shutdown_seen"] is False

    asyncio.run(scenario())


def test_fifty_vms_at_once() -> None:
    count = 50
    names = [f"vm{i:02d}" for i in range(count)]

    # Fifty QEMUs on a busy 2-core machine: started a few at a time, and every
    # deadline (a QEMU's start, its greeting, each event) wide enough for a slow one.
    room = asyncio.Semaphore(8)

    async def start() -> ThrowawayQemu:
        async with room:
            return await blocking(
                ThrowawayQemu, extra_qmp=["reactor"], extra_args=LIGHT, memory_mb=16,
                start_timeout=120.0,
            )  # fmt: skip

    async def scenario() -> None:
        rec = Recorder()
        started = await asyncio.gather(*(start() for _ in range(count)), return_exceptions=True)
        machines = [q for q in started if isinstance(q, ThrowawayQemu)]
        try:
            assert len(machines) == count, [e for e in started if isinstance(e, BaseException)]
            async with watching(rec, greeting_timeout=60.0) as mgr:
                for name, q in zip(names, machines, strict=True):
                    mgr.add(str(q.qmp_socket("reactor")), name=name)
                for name in names:
                    await rec.wait(name, "REACTOR_CONNECTED", timeout=180)
                await asyncio.gather(
                    *(blocking(q.qmp.execute, "stop", timeout=60.0) for q in machines)
                )
                for name in names:
                    await rec.wait(name, "STOP", timeout=180)
                assert all(vm.connected for vm in mgr.connections())
        finally:
            await asyncio.gather(*(blocking(q.close) for q in machines))
        stops = [e for e in rec.envelopes if e["event"] == "STOP"]
        assert sorted(e["vm"] for e in stops) == names
        assert all(rec.of(name, "REACTOR_DISCONNECTED") for name in names)

    asyncio.run(scenario())


def test_a_tcp_address_is_dialed_and_names_the_vm() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"

    async def scenario() -> None:
        rec = Recorder()
        tcp = ["-qmp", f"tcp:{address},server=on,wait=off"]
        async with qemu(*tcp, extra_qmp=[]) as q, watching(rec) as mgr:
            vm = mgr.add(address)
            await rec.wait(address, "REACTOR_CONNECTED", timeout=10)
            await blocking(q.qmp.execute, "stop")
            stop = await rec.wait(address, "STOP", timeout=10)
            assert mgr.get(address) is vm and stop["source"] == address

    asyncio.run(scenario())
