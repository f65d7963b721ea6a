"""Peers are trusted with nothing: names, sources, sockets, credentials, memory.

Against the listener (``--listen``) with fake QEMUs (tests/fakeqmp.py, and
tests/support/qmpclient.py in its own process where a second QEMU must be
another process): a peer that claims a name another source holds is refused,
an action goes only to the source that raised its event, the unix socket is
0600 and peers can be filtered by uid/gid; what a peer makes us hold is
bounded by bytes and the listener's connections by count. QEMU itself never
sends these, so a fake peer is the right tool here.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reactor.model import Envelope
from reactor.sources import server as listen_mode
from reactor.sources.manager import ConnectionManager
from reactor.sources.server import ListenPolicy
from tests.fakeqmp import Behaviour, FakeQmp, Peer, encode_event
from tests.support.ops import Sidecar, write_rules
from tests.test_connections import FAST, Recorder, _fake_qemu_client

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 108-byte limit of a unix socket path
    path = Path(tempfile.mkdtemp(prefix="qr-peer-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def listening(
    rec: Recorder, listen: str, policy: ListenPolicy | None = None
) -> AsyncIterator[ConnectionManager]:
    mgr = ConnectionManager(rec, **FAST)
    server = asyncio.create_task(mgr.listen(listen, policy))
    try:
        async with asyncio.timeout(10):
            while not os.path.exists(listen):
                await asyncio.sleep(0.01)
        yield mgr
    finally:
        server.cancel()
        await asyncio.wait([server])
        await mgr.aclose()


async def other_process(listen: str, name: str, *events: str, leave: bool = False) -> Any:
    """A fake QEMU in its own process (its own pid: another QEMU to the listener)."""
    argv = [sys.executable, "-m", "tests.support.qmpclient", listen, name, *events]
    return await asyncio.create_subprocess_exec(
        *([*argv, "--leave"] if leave else argv),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def commands_of(proc: Any, timeout: float = 30.0) -> list[str]:
    """The commands a fake QEMU process received after the handshake, once it has exited."""
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return list(out.decode().split())


# -- names belong to one source ---------------------------------------------------------


def test_a_peer_cannot_take_the_name_of_a_dialled_vm(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    listen, victim = str(sockdir / "reactor.sock"), str(sockdir / "victim.qmp")

    async def scenario() -> None:
        rec = Recorder()
        async with FakeQmp(victim), listening(rec, listen) as mgr:
            dialled = mgr.add(victim)
            await rec.wait("victim", "REACTOR_CONNECTED", timeout=10)
            with caplog.at_level(logging.WARNING):
                task, _ = await _fake_qemu_client(listen, "victim")
                await asyncio.wait_for(task, 10)  # hung up on after query-name
            assert "VM name 'victim' belongs to " + victim in caplog.text
            assert mgr.get("victim") is dialled and dialled.connected
            assert mgr.lookup("victim", victim) is dialled
            assert await dialled.execute("query-status") == {
                "status": "running", "singlestep": False, "running": True}  # fmt: skip
            assert {e["source"] for e in rec.of("victim")} == {victim}

    asyncio.run(scenario())


def test_a_second_qemu_claiming_a_live_peers_name_is_refused(sockdir: Path) -> None:
    listen = str(sockdir / "reactor.sock")

    async def scenario() -> None:
        rec = Recorder()
        async with listening(rec, listen) as mgr:
            first = await other_process(listen, "guest1")
            try:
                hello = await rec.wait("guest1", "REACTOR_CONNECTED", timeout=30)
                intruder = await other_process(listen, "guest1", "GUEST_PANICKED")
                assert await commands_of(intruder) == ["query-name"]
                conn = mgr.lookup("guest1", hello["source"])
                assert conn is not None and conn.connected
                assert rec.of("guest1", "GUEST_PANICKED") == []
            finally:
                first.terminate()
                await first.wait()

    asyncio.run(scenario())


def test_a_name_with_control_characters_or_too_long_is_refused(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    listen = str(sockdir / "reactor.sock")

    async def scenario() -> None:
        rec = Recorder()
        async with listening(rec, listen) as mgr:
            with caplog.at_level(logging.WARNING):
                for name in ("web\n2026-01-01 INFO forged line", "\x1b[2Jweb", "w" * 257):
                    task, _ = await _fake_qemu_client(listen, name)
                    await asyncio.wait_for(task, 10)  # hung up on after query-name
            assert caplog.text.count("cannot name a VM") == 3
            assert "forged" not in caplog.text and rec.envelopes == []
            fine, _ = await _fake_qemu_client(listen, "wéb-1 (prod)")
            await rec.wait("wéb-1 (prod)", "REACTOR_CONNECTED")
            assert mgr.get("wéb-1 (prod)") is not None
            fine.cancel()
            await asyncio.wait([fine])

    asyncio.run(scenario())


def test_actions_reach_only_the_source_that_raised_their_event(sockdir: Path) -> None:
    listen, dialled_path = str(sockdir / "reactor.sock"), str(sockdir / "web.qmp")

    async def scenario() -> None:
        rec = Recorder()
        async with listening(rec, listen) as mgr:
            liar = await other_process(listen, "victim", "GUEST_PANICKED", leave=True)
            panic = await rec.wait("victim", "GUEST_PANICKED", timeout=30)
            await commands_of(liar)
            await rec.wait("victim", "REACTOR_DISCONNECTED")
            real = await other_process(listen, "victim")
            try:
                hello = await rec.wait("victim", "REACTOR_CONNECTED", 2, timeout=30)
                assert hello["source"] != panic["source"]  # another process: another source
                assert hello["source"].startswith(f"{listen}#victim@pid-{real.pid}.")
                assert hello["seq"] > panic["seq"]  # seq still goes on per name
                assert mgr.lookup("victim", panic["source"]) is None
                conn = mgr.lookup("victim", hello["source"])
                assert conn is not None and conn is mgr.get("victim")
                assert mgr.lookup("victim", "reactor") is conn  # our own events: by name
                assert mgr.lookup("other", hello["source"]) is None
            finally:
                real.terminate()
                await real.wait()

            async with FakeQmp(dialled_path):  # a dialled VM is one source across reconnects
                web = mgr.add(dialled_path)
                await rec.wait("web", "REACTOR_CONNECTED", timeout=10)
            await rec.wait("web", "REACTOR_DISCONNECTED", timeout=10)
            async with FakeQmp(dialled_path):
                await rec.wait("web", "REACTOR_CONNECTED", 2, timeout=10)
                assert mgr.lookup("web", dialled_path) is web and web.connected

    asyncio.run(scenario())


# -- the socket and its peers -----------------------------------------------------------


def _a_group_we_may_give() -> int:
    """A group the socket may be given: any but our own as root, else one we are in."""
    if os.geteuid() == 0:
        return next((g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getgid()), 0)
    return (os.getgroups() or [os.getgid()])[-1]


def test_the_unix_socket_is_0600_or_0660_for_a_group(sockdir: Path) -> None:
    old = os.umask(0)  # the umask must not decide who may connect
    try:
        with listen_mode.bind(str(sockdir / "a.sock")):
            assert stat.S_IMODE(os.stat(sockdir / "a.sock").st_mode) == 0o600
        group = _a_group_we_may_give()
        with listen_mode.bind(str(sockdir / "b.sock"), ListenPolicy(group=group)):
            st = os.stat(sockdir / "b.sock")
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group
    finally:
        os.umask(old)


def test_peers_outside_the_allowed_uids_and_gids_are_hung_up_on(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    listen = str(sockdir / "reactor.sock")
    me, mine = os.getuid(), os.getgid()

    async def scenario() -> None:
        rec = Recorder()
        deny = ListenPolicy(uids=frozenset({me + 1}), gids=frozenset({mine + 1}))
        async with listening(rec, listen, deny):
            with caplog.at_level(logging.WARNING):
                stranger = await other_process(listen, "guest1", "GUEST_PANICKED")
                assert await commands_of(stranger) == []  # not even greeted to
            assert f"uid {me}, gid {mine}): not in listener.allow" in caplog.text
        assert rec.envelopes == []
        for allow in (ListenPolicy(uids=frozenset({me})), ListenPolicy(gids=frozenset({mine}))):
            rec = Recorder()
            async with listening(rec, listen, allow):
                friend = await other_process(listen, "guest1", "GUEST_PANICKED", leave=True)
                await rec.wait("guest1", "GUEST_PANICKED", timeout=30)
                await commands_of(friend)

    asyncio.run(scenario())


def test_listener_settings_are_checked_where_they_are_written(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("listen: /run/r.sock\nlistener:\n  allow_users: [root, no-such-user-xy]\n"
                   "  max_handshakes: 0\n")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "reactor", "check", "--config", str(cfg)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{cfg}:3:23: error: 'listener.allow_users.1': no user 'no-such-user-xy'" in proc.stderr
    assert f"{cfg}:4:19: error: 'listener.max_handshakes'" in proc.stderr


# -- the whole sidecar ------------------------------------------------------------------


def test_a_restart_raised_by_an_impostor_never_reaches_the_real_vm(
    tmp_path: Path, sockdir: Path
) -> None:
    """The issue's attack: claim "victim", panic, leave; the retried restart must not follow.

    Nor may the REACTOR_ACTION_FAILED its failure raises: it belongs to the impostor's
    connection too, so the rule it fires finds no VM either.
    """
    listen = str(sockdir / "reactor.sock")
    fast = {"attempts": 6, "initial": "0.3s", "max": "0.5s", "jitter": 0}
    rules = write_rules(tmp_path / "rules.yaml", {
        "name": "panic-restart", "on": "GUEST_PANICKED",
        "actions": [{"type": "restart_vm", "with": {"method": "reset", "timeout": "1s"},
                     "retry": fast}],
    }, {
        "name": "failed-cont", "on": "REACTOR_ACTION_FAILED",
        "actions": [{"type": "qmp", "with": {"command": "cont"}, "retry": fast}],
    })  # fmt: skip
    base = [sys.executable, "-m", "tests.support.qmpclient", listen, "victim"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with Sidecar(tmp_path, {"rules": [str(rules)], "listen": listen}, env=env) as sidecar:
        sidecar.start().wait_log("ready")
        subprocess.run([*base, "GUEST_PANICKED", "--leave"], cwd=ROOT, env=env, timeout=60,
                       check=True, capture_output=True)  # fmt: skip
        sidecar.wait_log("victim: disconnected")
        real = subprocess.Popen(base, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert real.stdout is not None
            seen = [real.stdout.readline().strip() for _ in range(3)]  # announced
            assert seen == ["query-name", "query-version", "query-status"]
            sidecar.wait_metric(lambda s: s.value("qmp_reactor_dead_letters") == 2,
                                what="the impostor's restart and cont dead-lettered",
                                timeout=60)  # fmt: skip
        finally:
            real.terminate()
            out, _ = real.communicate(timeout=30)
        assert sidecar.stop() == 0
    assert out.split() == []  # not a single command after the opening queries
    assert "Traceback" not in sidecar.log_text()


def test_a_dialled_vm_survives_a_peer_that_claims_its_name(tmp_path: Path, sockdir: Path) -> None:
    """Before: the peer took over the name and, leaving, orphaned the dialled VM."""
    listen, victim = str(sockdir / "reactor.sock"), str(sockdir / "victim.qmp")
    rules = write_rules(tmp_path / "rules.yaml", {
        "name": "stop-cont", "on": "STOP",
        "actions": [{"type": "qmp", "with": {"command": "cont"}}],
    })  # fmt: skip
    cfg = {"rules": [str(rules)], "listen": listen, "qmp": [victim]}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    qemu = quiet_vm(victim, 1, 1.0)
    try:
        wait_for_socket(victim)
        with Sidecar(tmp_path, cfg, env=env) as sidecar:
            sidecar.start().wait_log("victim: connected")
            subprocess.run([sys.executable, "-m", "tests.support.qmpclient", listen, "victim",
                            "STOP", "--leave"], cwd=ROOT, env=env, timeout=60, check=True,
                           capture_output=True)  # fmt: skip
            sidecar.wait_log("refused .*: VM name 'victim' belongs to ")
            out, _ = qemu.communicate(timeout=120)  # the dialled VM's STOP gets its cont
            samples = sidecar.scrape()
            assert sidecar.stop() == 0
    finally:
        qemu.kill()
        qemu.wait()
    assert len(out.split()) == 1 and "lost" not in out
    assert samples.value("qmp_reactor_actions_total", action="qmp", outcome="ok") == 1
    assert samples.value("qmp_reactor_dead_letters") == 0


def quiet_vm(path: str, count: int, interval: float) -> subprocess.Popen[str]:
    """tests/support/quietvm.py serving ``path``: ``count`` STOPs each waiting for a cont."""
    argv = [sys.executable, "-m", "tests.support.quietvm", path, str(count), str(interval)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def wait_for_socket(path: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_the_sidecar_passes_the_listener_settings_on(tmp_path: Path, sockdir: Path) -> None:
    listen = str(sockdir / "reactor.sock")
    rules = write_rules(
        tmp_path / "rules.yaml",
        {"name": "log", "on": "STOP", "actions": [{"type": "log", "with": {"message": "x"}}]},
    )
    cfg = {"rules": [str(rules)], "listen": listen,
           "listener": {"allow_users": [os.getuid() + 1]}}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with Sidecar(tmp_path, cfg, env=env) as sidecar:
        sidecar.start().wait_log("ready")
        assert stat.S_IMODE(os.stat(listen).st_mode) == 0o600
        subprocess.run([sys.executable, "-m", "tests.support.qmpclient", listen, "guest1"],
                       cwd=ROOT, env=env, timeout=60, check=True, capture_output=True)  # fmt: skip
        sidecar.wait_log(f"uid {os.getuid()}, gid {os.getgid()}\\): not in listener.allow")
        assert sidecar.stop() == 0
    assert yaml.safe_load(sidecar.config_path.read_text())["listener"]


# -- memory is bounded by bytes ---------------------------------------------------------

BIG = 930 * 1024


class Slim(Recorder):
    """A recorder that keeps envelopes without their data (the test's memory is not ours)."""

    def __call__(self, env: Envelope) -> None:
        self.envelopes.append({**env, "data": {}})


def withholding(events: int, size: int = BIG) -> Behaviour:
    """Greet, then withhold the query-version reply while streaming ``events`` huge events."""
    line = encode_event("BLOCK_IO_ERROR", {"device": "d" * size, "operation": "write"})

    async def behave(peer: Peer) -> None:
        await peer.handshake()
        query_version = await peer.read_command()
        assert query_version is not None
        for _ in range(events):
            await peer.send_raw(line)
        await peer.answer(query_version)
        await peer.serve_commands()

    return behave


def test_a_peer_that_withholds_its_reply_while_streaming_cannot_grow_us(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(sockdir / "bomb.qmp")
    events = 60  # 53 MiB; before, every one was held until the reply came

    async def scenario() -> int:
        rec = Slim()
        async with FakeQmp(path, withholding(events)) as qemu:
            mgr = ConnectionManager(rec, greeting_timeout=120, backoff_max=0.1)
            try:
                mgr.add(path)
                hello = await rec.wait("bomb", "REACTOR_CONNECTED", timeout=120)
                await qemu.peers[0].send_event("STOP")
                await rec.wait("bomb", "STOP", timeout=30)
            finally:
                await mgr.aclose()
            held = rec.of("bomb", "BLOCK_IO_ERROR")
            assert 1 <= len(held) <= 9  # the newest 8 MiB, after the connected event
            assert all(e["seq"] > hello["seq"] for e in held)
            return qemu.peers[0].sent

    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING):
            sent = asyncio.run(scenario())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent > events * BIG
    # The 8 MiB held, one event being parsed and the fake peer's own buffers (in this process
    # too, and larger when the machine is busy); everything held would be over 53 MiB.
    assert peak < 32 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB"
    assert "events dropped while connecting" in caplog.text


@contextlib.contextmanager
def descriptors(wanted: int) -> Iterator[int]:
    """Raise RLIMIT_NOFILE's soft limit up to the hard one; how many we may hold (<= wanted)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else max(soft, wanted + 1000)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield min(wanted, limit - 1000)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_ten_thousand_idle_connections_cost_a_bounded_number_of_descriptors(
    tmp_path: Path, sockdir: Path
) -> None:
    listen, quiet = str(sockdir / "reactor.sock"), str(sockdir / "quiet.qmp")
    rules = write_rules(tmp_path / "rules.yaml", {
        "name": "stop-cont", "on": "STOP",
        "actions": [{"type": "qmp", "with": {"command": "cont"}}]})  # fmt: skip
    cfg = {"rules": [str(rules)], "listen": listen, "qmp": [quiet]}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    held: list[socket.socket] = []
    with descriptors(10_000) as wanted:
        vm = quiet_vm(quiet, 20, 0.5)
        try:
            wait_for_socket(quiet)
            with Sidecar(tmp_path, cfg, env=env) as sidecar:
                sidecar.start().wait_log("quiet: connected")
                assert sidecar.proc is not None
                most, health, tried = 0, set(), 0
                while vm.poll() is None:  # the quiet VM's STOPs go on meanwhile
                    if len(held) < wanted:
                        tried += wanted - len(held)
                        held += idle_connections(listen, wanted - len(held))
                    most = max(most, open_fds(sidecar.proc.pid))
                    health.add(sidecar.healthz()[0])
                    time.sleep(0.2)
                assert sidecar.stop() == 0
                log = sidecar.log_text()
            out, _ = vm.communicate(timeout=60)
        finally:
            vm.kill()
            vm.wait()
            for sock in held:
                sock.close()
    assert tried >= wanted and len(held) > 64  # refused by the kernel's backlog, not by us
    assert most < 64 + 150, f"the sidecar held {most} descriptors"
    assert health == {200}
    assert len(out.split()) == 20 and "lost" not in out  # every STOP got its cont
    full = [line for line in log.splitlines() if "not accepting until one ends" in line]
    assert sum(" WARNING " in line for line in full) == 1  # once a minute at most
    assert "Traceback" not in log


def idle_connections(path: str, count: int) -> list[socket.socket]:
    """``count`` tries to connect to ``path``: those that got in (and never greet)."""
    made = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        if sock.connect_ex(path) == 0:
            made.append(sock)
        else:  # EAGAIN: the listener's backlog is full
            sock.close()
    return made


def test_past_max_sessions_the_next_qemu_waits_until_one_leaves(sockdir: Path) -> None:
    listen = str(sockdir / "reactor.sock")

    async def scenario() -> None:
        rec = Recorder()
        async with listening(rec, listen, ListenPolicy(max_sessions=2)):
            first, _ = await _fake_qemu_client(listen, "a")
            second, _ = await _fake_qemu_client(listen, "b")
            await rec.wait("a", "REACTOR_CONNECTED")
            await rec.wait("b", "REACTOR_CONNECTED")
            third, peer = await _fake_qemu_client(listen, "c")
            await asyncio.sleep(0.5)  # in the backlog: not accepted, not greeted to
            assert peer.commands == [] and rec.of("c") == []
            first.cancel()
            await asyncio.wait([first])
            await rec.wait("c", "REACTOR_CONNECTED", timeout=10)  # a slot came free
            for task in (second, third):
                task.cancel()
            await asyncio.wait([second, third])

    asyncio.run(scenario())
